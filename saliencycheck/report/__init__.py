"""Views of stored results: CSV tables and PNG figures."""
