"""Views of stored results: CSV tables, PNG figures, report.html and the CI job summary."""
