"""The CI job summary: what a reviewer sees on a GitHub Actions run's page without downloading.

Appended to ``$GITHUB_STEP_SUMMARY`` (or ``--summary-md PATH``) by ``run`` and ``merge``: the
outcome, the verdict matrix, each judged test's scores at its judged stage, and where the full
page is (report.html, to upload as an artifact). Built from the output folder's files, as
report.html is.
"""

from __future__ import annotations

from pathlib import Path

from saliencycheck.report.files import read_rows, read_run_json
from saliencycheck.report.html import REPORT_HTML, number_text, outcome

MARKS = {"PASS": "✅ PASS", "FAIL": "❌ FAIL", "INVALID": "⚪ INVALID"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def job_summary(folder: Path) -> str:
    """Markdown for the run stored in ``folder``."""
    info = read_run_json(folder)
    verdicts = read_rows(folder / "verdicts.csv")
    summary = read_rows(folder / "summary.csv", required=True)
    _, sentence = outcome(verdicts, info)
    model = ((info.get("config") or {}).get("model") or {}).get("label") or "model"
    lines = [f"## saliencycheck: {model}", "", f"**{sentence}**", ""]
    if verdicts:
        tests = list(dict.fromkeys(v["test"] for v in verdicts))
        methods = list(dict.fromkeys(v["method"] for v in verdicts))
        cells = {(v["method"], v["test"]): v for v in verdicts}
        lines += ["| method | " + " | ".join(tests) + " |",
                  "|---|" + "---|" * len(tests)]
        for method in methods:
            row = []
            for test in tests:
                v = cells.get((method, test))
                row.append(f"{MARKS.get(v['verdict'], v['verdict'])} {v['metric']} "
                           f"{number_text(v['statistic'])} [{number_text(v['ci_low'])}, "
                           f"{number_text(v['ci_high'])}]" if v else "-")
            lines.append(f"| {_cell(method)} | " + " | ".join(_cell(c) for c in row) + " |")
        lines.append("")
        judged = {(v["test"], v["stage_index"]) for v in verdicts}
        rows = [r for r in summary if (r["test"], r["stage_index"]) in judged]
        if rows:
            lines += ["<details><summary>Scores at the judged stages</summary>", "",
                      "| test | stage | method | metric | mean | interval |",
                      "|---|---|---|---|---:|---|"]
            lines += [f"| {r['test']} | {_cell(r['stage'])} | {_cell(r['method'])} | "
                      f"{r['metric']} | {number_text(r['mean'])} | [{number_text(r['ci_low'])}, "
                      f"{number_text(r['ci_high'])}] |" for r in rows]
            lines += ["", "</details>", ""]
    lines += [f"The whole report: `{REPORT_HTML}` in `{folder}` (upload it as an artifact; "
              "it opens offline), with summary.csv, verdicts.csv and run.json beside it.", ""]
    return "\n".join(lines)


def append_job_summary(folder: Path, path: Path) -> None:
    """Append :func:`job_summary` to ``path`` (GitHub appends every step's summary)."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write(job_summary(folder) + "\n")
