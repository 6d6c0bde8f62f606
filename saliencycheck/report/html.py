"""report.html: one self-contained page per run, the verdict first, then the evidence.

Built from an output folder's files alone (run.json, summary.csv, verdicts.csv, stages.csv,
skipped.csv, figures/), so ``saliencycheck report`` regenerates it from any stored run, this
version's or an earlier one's, without recomputing. Offline by construction: figures are
embedded as ``data:`` URIs (lossless WebP of the PNGs, enlarged in place on click by CSS
``:target``), styles inline,
no URL outside the page; the only script opens the collapsed sections before printing.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections import defaultdict
from html import escape
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from saliencycheck.atomic import atomic_write_text
from saliencycheck.checks import get_check
from saliencycheck.errors import DataError
from saliencycheck.report.files import read_rows, read_run_json
from saliencycheck.results import RANDOM_MAP
from saliencycheck.verdicts import FAIL, INVALID, PASS

REPORT_HTML = "report.html"
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1200px;padding:0 1.2em 3em;color:#1b1b1b}
h1{font-size:1.6em;margin:.8em 0 .3em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right;vertical-align:top}
th[scope=row],td.name{text-align:left}thead th{background:#f3f3f3;text-align:center}
.banner{padding:.8em 1em;border-radius:6px;font-size:1.15em;margin:.6em 0}
.passed{background:#e3f4e4;border:2px solid #4caf50}.failed{background:#fde4e4;
border:2px solid #e53935}.neutral{background:#eef1f5;border:2px solid #90a4ae}
td.PASS{background:#e3f4e4}td.FAIL{background:#fde4e4}td.INVALID{background:#eeeeee}
td.verdict{text-align:left;min-width:12em}td.verdict b{display:block}
.dim{color:#666}figure{margin:.6em 0}figcaption{color:#555;font-size:.9em}
img.zoom{max-width:100%;cursor:zoom-in;border:1px solid #eee}
img.zoom:target{position:fixed;inset:0;margin:auto;max-width:96vw;max-height:96vh;
z-index:10;background:#fff;box-shadow:0 0 0 100vmax rgba(0,0,0,.6);cursor:default}
a.closer{display:none;position:fixed;top:.5em;right:1em;z-index:11;background:#fff;
padding:.2em .6em;border-radius:4px;font-size:1.4em;text-decoration:none}
body:has(img.zoom:target) a.closer{display:block}
.grids{display:flex;flex-wrap:wrap;gap:.8em}.grids figure{flex:1 1 45%}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.85em}
details>summary{cursor:pointer;font-weight:600;margin:.4em 0}
@media print{img.zoom:target{position:static;box-shadow:none}a.closer{display:none}
section#verdicts{break-after:page}body{max-width:none}}
"""
PRINT_SCRIPT = ("<script>addEventListener('beforeprint',()=>document.querySelectorAll("
                "'details').forEach(d=>d.open=true))</script>")


def write_html_report(folder: Path, path: Path | None = None,
                      info: dict[str, Any] | None = None) -> Path:
    """Write the page for the run in ``folder`` to ``path`` (default ``folder/report.html``);
    ``info``: the run.json content when it is not on disk yet (the run writes it last)."""
    path = path or folder / REPORT_HTML
    atomic_write_text(path, render(folder, info))
    return path


def render(folder: Path, info: dict[str, Any] | None = None) -> str:
    """The page's HTML for the run stored in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; give the output folder of a run "
                        "(output.dir, or run's -o)")
    info = info if info is not None else read_run_json(folder)
    summary = read_rows(folder / "summary.csv", required=True)
    verdicts = read_rows(folder / "verdicts.csv")
    stages = read_rows(folder / "stages.csv")
    skipped = read_rows(folder / "skipped.csv")
    figures = _Figures(folder)
    config = info.get("config") or {}
    model = (config.get("model") or {}).get("label") or (config.get("model") or {}).get(
        "name") or "model"
    tests = list(dict.fromkeys(r["test"] for r in summary))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>saliencycheck: {escape(str(model))}</title><style>{STYLE}</style>",
        f"{PRINT_SCRIPT}</head><body>",
        '<a class="closer" href="#top" aria-label="close the enlarged figure">×</a>',
        f'<header id="top"><h1>saliencycheck report: {escape(str(model))}</h1>',
        f'<p class="dim">{escape(_facts(info))}</p></header>',
        '<main id="main">',
        _verdict_section(verdicts, info),
        *(_test_section(test, summary, verdicts, figures) for test in tests),
        _stages_section(stages),
        _validity_section(info),
        _provenance_section(info, skipped),
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p)


# -- reading ----------------------------------------------------------------------------------

def _webp(path: Path) -> bytes:
    """The PNG at ``path`` as lossless WebP: the same pixels in 42 % of the bytes (the
    quickstart's 16 figures: 6.4 MB of PNG, 2.7 MB of WebP; 2.7 s on 2 cores), which keeps its
    page under 5 MB once base64-encoded."""
    with Image.open(path) as image:
        out = io.BytesIO()
        image.save(out, "WEBP", lossless=True, method=2)
    return out.getvalue()


class _Figures:
    """The folder's PNG figures, embedded once each as data URIs with a stable anchor."""

    def __init__(self, folder: Path, anchors: str = "fig") -> None:
        self.folder = folder
        self.anchors = anchors  # the prefix of the figures' anchors (two runs on one page)
        self.count = 0

    def figure(self, relative: str, caption: str, alt: str) -> str:
        path = self.folder / relative
        if not path.is_file():
            return ""
        try:
            data = base64.b64encode(_webp(path)).decode("ascii")
        except OSError:  # not an image now (a file the user replaced): left out, said so
            return (f"<p class=dim>{escape(relative)}: not a readable image; left out of "
                    "this page</p>")
        self.count += 1
        anchor = f"{self.anchors}-{self.count}"
        return (f'<figure><a href="#{anchor}"><img class="zoom" id="{anchor}" '
                f'src="data:image/webp;base64,{data}" alt="{escape(alt)}"></a>'
                f"<figcaption>{escape(caption)} (click to enlarge)</figcaption></figure>")

    def grids(self, test: str) -> list[tuple[str, str]]:
        """(image folder, relative path) of each per-image grid of ``test``."""
        base = self.folder / "figures"
        if not base.is_dir():
            return []
        return [(p.parent.name, p.relative_to(self.folder).as_posix())
                for p in sorted(base.glob(f"*/{test}.png"))]


# -- sections ---------------------------------------------------------------------------------

def number_text(text: str | None, digits: int = 3) -> str:
    """A CSV number as the page shows it: ``digits`` decimals, n/a when undefined."""
    try:
        value = float(text) if text not in (None, "") else math.nan
    except ValueError:
        return escape(str(text))
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _facts(info: dict[str, Any]) -> str:
    bits = [f"device {info.get('device_name') or info.get('device', '?')}",
            f"{len(info.get('images') or [])} images",
            f"{len(info.get('methods') or [])} methods",
            f"units {info.get('units_done', '?')} of {info.get('units_total', '?')}"]
    versions = info.get("versions") or {}
    if versions.get("saliencycheck"):
        bits.insert(0, f"saliencycheck {versions['saliencycheck']}")
    return "; ".join(bits)


def outcome(verdicts: list[dict[str, str]], info: dict[str, Any]) -> tuple[str, str]:
    """(css class, sentence) of what ``run``'s exit code says about this report."""
    if info.get("complete") is False:
        return "failed", (f"Incomplete: {info.get('units_done')} of {info.get('units_total')} "
                          "work units are in this report; finish it with `saliencycheck run "
                          "CONFIG --resume`.")
    if not verdicts:
        return "neutral", "No thresholds were set: nothing was judged (exit code 0)."
    fail_on = (info.get("config") or {}).get("fail_on", "all")
    failed = [v for v in verdicts if v["verdict"] == FAIL and fail_on != "none"
              and (fail_on == "all" or v["method"] in fail_on)]
    counts = {word: sum(v["verdict"] == word for v in verdicts) for word in (PASS, FAIL,
                                                                               INVALID)}
    tally = f"{counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[INVALID]} INVALID"
    if failed:
        names = ", ".join(f"{v['method']} ({v['test']})" for v in failed)
        return "failed", f"FAILED (exit code 1): gated methods failed: {names}. {tally}."
    if fail_on == "none":
        return "neutral", f"Not gated (fail_on: none; exit code 0). {tally}."
    return "passed", (f"PASSED (exit code 0): every gated method passed (fail_on: "
                      f"{fail_on if isinstance(fail_on, str) else ', '.join(fail_on)}). "
                      f"{tally}.")


def _verdict_section(verdicts: list[dict[str, str]], info: dict[str, Any]) -> str:
    css, sentence = outcome(verdicts, info)
    parts = ['<section id="verdicts"><h2>Verdicts</h2>',
             f'<div class="banner {css}" role="status">{escape(sentence)}</div>']
    if verdicts:
        methods = list(dict.fromkeys(v["method"] for v in verdicts))
        tests = list(dict.fromkeys(v["test"] for v in verdicts))
        cells = {(v["method"], v["test"]): v for v in verdicts}
        parts.append('<table class="matrix"><caption>Methods × tests: verdict, mean [interval]'
                     ", the limit applied, and the reason</caption><thead><tr>"
                     '<th scope="col">method</th>'
                     + "".join(f'<th scope="col">{escape(t)}</th>' for t in tests)
                     + "</tr></thead><tbody>")
        for method in methods:
            row = [f'<th scope="row">{escape(method)}</th>']
            for test in tests:
                v = cells.get((method, test))
                row.append(_verdict_cell(v) if v else "<td>-</td>")
            parts.append("<tr>" + "".join(row) + "</tr>")
        parts.append("</tbody></table>")
    parts.append("</section>")
    return "\n".join(parts)


def _verdict_cell(v: dict[str, str]) -> str:
    evidence = [f"{v['metric']} at {v['stage']}: {number_text(v['statistic'])} "
                f"[{number_text(v['ci_low'])}, {number_text(v['ci_high'])}]"]
    limit = (f"≤ {number_text(v['max'])}" if number_text(v.get("max")) != "n/a"
             else f"≥ {number_text(v['min'])}" if number_text(v.get("min")) != "n/a" else "")
    if limit:
        evidence.append(f"limit {limit}")
    for key in ("floor", "control"):
        if number_text(v.get(key)) != "n/a":
            evidence.append(f"{key} {number_text(v[key])}")
    return (f'<td class="verdict {escape(v["verdict"])}" data-method="{escape(v["method"])}" '
            f'data-test="{escape(v["test"])}"><b>{escape(v["verdict"])}</b>'
            f"{escape('; '.join(evidence))}<br><span class=dim>{escape(v['reason'])}</span>"
            "</td>")


def _test_section(test: str, summary: list[dict[str, str]], verdicts: list[dict[str, str]],
                  figures: _Figures) -> str:
    check = get_check(test)
    title = check.title if check else test
    rows = [r for r in summary if r["test"] == test]
    judged = {int(v["stage_index"]) for v in verdicts if v["test"] == test}
    stage = max(judged) if judged else max(int(r["stage_index"]) for r in rows)
    at_stage = [r for r in rows if int(r["stage_index"]) == stage]
    name = at_stage[0]["stage"] if at_stage else str(stage)
    parts = [f'<section id="test-{escape(test)}"><h2>{escape(title)} '
             f'<span class="dim">({escape(test)})</span></h2>']
    kind = (check.figure if check else None) or "curves"
    parts.append(figures.figure(f"figures/{kind}_{test}.png",
                                f"{test}: each metric per method, mean and interval",
                                f"{kind} of {test}: similarity per stage and method"))
    parts.append(_summary_table(at_stage, f"{test} at stage {stage} ({name})",
                                "final" if not judged else "judged"))
    if len({r["stage_index"] for r in rows}) > 1:
        parts.append(f"<details><summary>Every stage of {escape(test)} "
                     f"({len(rows)} rows)</summary>"
                     + _summary_table(rows, f"{test}, every stage", "all") + "</details>")
    grids = figures.grids(test)
    if grids:
        parts.append(f"<details><summary>Per-image grids of {escape(test)} ({len(grids)} "
                     'images)</summary><div class="grids">'
                     + "".join(figures.figure(rel, f"{image}: input, then each method's maps "
                                              "per stage", f"{test} grid of {image}")
                               for image, rel in grids) + "</div></details>")
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _summary_table(rows: list[dict[str, str]], caption: str, kind: str) -> str:
    head = ("<th scope=\"col\">method</th><th scope=\"col\">stage</th><th scope=\"col\">"
            "metric</th><th scope=\"col\">mean</th><th scope=\"col\">interval</th>"
            "<th scope=\"col\">n</th><th scope=\"col\">floor</th><th scope=\"col\">"
            "Δ above floor</th>")
    body = []
    for r in rows:
        label = f"{r['method']} (control)" if r["method"] == RANDOM_MAP else r["method"]
        body.append(
            f'<tr data-method="{escape(r["method"])}" data-stage-index="{r["stage_index"]}" '
            f'data-metric="{escape(r["metric"])}"><td class="name">{escape(label)}</td>'
            f'<td class="name">{escape(r["stage"])}</td><td class="name">'
            f'{escape(r["metric"])}</td><td class="mean">{number_text(r["mean"])}</td>'
            f'<td class="interval">[{number_text(r["ci_low"])}, {number_text(r["ci_high"])}]</td>'
            f'<td>{escape(r.get("n", ""))}</td><td class="floor">{number_text(r.get("floor"))}'
            f'</td><td class="above">{number_text(r.get("above_floor"))}</td></tr>')
    return (f'<table class="summary" data-kind="{kind}"><caption>{escape(caption)}'
            f"</caption><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _stages_section(stages: list[dict[str, str]]) -> str:
    if not stages:
        return ""
    columns = [c for c in ("test", "stage_index", "stage", "blocks_randomized",
                           "fraction_randomized", "logit_relative_l2", "top1_agreement")
               if c in stages[0]]
    by_test: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in stages:
        by_test[row["test"]].append(row)
    head = "".join(f'<th scope="col">{escape(c)}</th>' for c in columns)
    body = "".join("<tr>" + "".join(
        f'<td class="name">{escape(row.get(c, ""))}</td>' if c in ("test", "stage",
                                                                   "blocks_randomized")
        else f"<td>{escape(row.get(c, ''))}</td>" for c in columns) + "</tr>"
        for rows in by_test.values() for row in rows)
    return ('<section id="stages"><h2>Stages</h2><details><summary>What each stage '
            f"randomized and how far the logits moved ({len(stages)} stages)</summary>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></details>"
            "</section>")


def _validity_section(info: dict[str, Any]) -> str:
    entries = {k: v for k, v in info.items()
               if isinstance(v, dict) and "valid" in v}
    if not entries:
        return ""
    items = "".join(f"<li><b>{escape(k)}</b>: {'valid' if v.get('valid') else 'INVALID'}"
                    f"{': ' + escape(str(v.get('reason'))) if v.get('reason') else ''}"
                    f"<pre>{escape(json.dumps(v, indent=1, default=str))}</pre></li>"
                    for k, v in entries.items())
    return f'<section id="validity"><h2>Validity</h2><ul>{items}</ul></section>'


def _provenance_section(info: dict[str, Any], skipped: list[dict[str, str]]) -> str:
    config = info.get("config")
    source = info.get("config_file") or "CONFIG"
    facts = [("config SHA-256", info.get("config_sha256")),
             ("model SHA-256", info.get("model_sha256")),
             ("weights", info.get("weights")), ("device", info.get("device")),
             ("device name", info.get("device_name")), ("python", info.get("python")),
             ("precision", info.get("precision")), ("chunk size", info.get("chunk_size")),
             ("seeds", json.dumps(info.get("seeds"), default=str) if info.get("seeds")
              else None),
             ("versions", ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {})
                                    .items())),
             ("timings (s)", ", ".join(f"{k} {v}" for k, v in (info.get("timings_s") or {})
                                       .items()))]
    rows = "".join(f'<tr><th scope="row">{escape(k)}</th><td class="name">{escape(str(v))}'
                   "</td></tr>" for k, v in facts if v not in (None, ""))
    parts = ['<section id="provenance"><h2>Provenance</h2>',
             f"<p>Reproduce: <code>saliencycheck run {escape(str(source))}</code></p>",
             f"<table><tbody>{rows}</tbody></table>"]
    if skipped:
        parts.append("<h3>Skipped images</h3><table><thead><tr><th scope=\"col\">path</th>"
                     "<th scope=\"col\">reason</th></tr></thead><tbody>"
                     + "".join(f'<tr><td class="name">{escape(s.get("path", ""))}</td>'
                               f'<td class="name">{escape(s.get("reason", ""))}</td></tr>'
                               for s in skipped) + "</tbody></table>")
    if config:
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        parts.append(f"<details><summary>The config as run (YAML)</summary><pre>"
                     f"{escape(text)}</pre></details>")
    parts.append("</section>")
    return "\n".join(parts)



# -- compare --html ---------------------------------------------------------------------------

def render_diff(baseline: Path, new: Path, comparison: Any, tolerance: float) -> str:
    """The page of ``saliencycheck compare BASE NEW --html``: what moved beyond the tolerance,
    the verdicts that changed, and each test's figures of both runs side by side."""
    regressions, improvements = comparison.regressions, comparison.improvements
    css = "failed" if regressions else "passed"
    sentence = (f"{len(regressions)} regression(s) beyond tolerance {tolerance} (exit code 1)"
                if regressions else f"No regression beyond tolerance {tolerance} (exit code 0)")
    sentence += (f"; {comparison.compared} scores compared, {len(improvements)} improved.")
    old_verdicts = {(v["method"], v["test"]): v for v in read_rows(baseline / "verdicts.csv")}
    new_verdicts = {(v["method"], v["test"]): v for v in read_rows(new / "verdicts.csv")}
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>saliencycheck compare</title><style>{STYLE}</style></head><body>",
             '<a class="closer" href="#top" aria-label="close the enlarged figure">×</a>',
             '<header id="top"><h1>saliencycheck compare</h1>',
             f'<p class="dim">baseline {escape(str(baseline))}; new {escape(str(new))}</p>'
             "</header><main>",
             f'<section id="outcome"><h2>Outcome</h2><div class="banner {css}" role="status">'
             f"{escape(sentence)}</div></section>"]
    for title, changes, kind in (("Regressions", regressions, "FAIL"),
                                 ("Improvements", improvements, "PASS")):
        if not changes:
            continue
        body = "".join(
            f'<tr><td class="name">{escape(c.method)}</td><td class="name">{escape(c.test)}</td>'
            f'<td class="name">{escape(c.stage)}</td><td class="name">{escape(c.metric)}</td>'
            f"<td>{escape(c.baseline)}</td><td class=\"{kind}\">{escape(c.new)}</td>"
            f"<td>{'' if c.delta is None else f'{c.delta:+.3f}'}</td></tr>" for c in changes)
        parts.append(f'<section><h2>{title}</h2><table><thead><tr>'
                     + "".join(f'<th scope="col">{h}</th>' for h in (
                         "method", "test", "stage", "metric", "baseline", "new", "change"))
                     + f"</tr></thead><tbody>{body}</tbody></table></section>")
    keys = list(dict.fromkeys([*old_verdicts, *new_verdicts]))
    if keys:
        rows = []
        for key in keys:
            old, now = old_verdicts.get(key), new_verdicts.get(key)
            before, after = (old or {}).get("verdict", "missing"), (now or {}).get(
                "verdict", "missing")
            changed = " changed" if before != after else ""
            rows.append(f'<tr class="{changed.strip()}"><td class="name">{escape(key[0])}</td>'
                        f'<td class="name">{escape(key[1])}</td><td class="{before}">{before}'
                        f'</td><td class="{after}">{after}{" (changed)" if changed else ""}'
                        "</td></tr>")
        parts.append('<section><h2>Verdicts</h2><table><thead><tr><th scope="col">method</th>'
                     '<th scope="col">test</th><th scope="col">baseline</th><th scope="col">'
                     f"new</th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>")
    old_figures, new_figures = _Figures(baseline, "baseline"), _Figures(new, "new")
    tests = list(dict.fromkeys(r["test"] for r in read_rows(new / "summary.csv")))
    for test in tests:
        check = get_check(test)
        kind = (check.figure if check else None) or "curves"
        name = f"figures/{kind}_{test}.png"
        pair = [old_figures.figure(name, f"baseline: {test}", f"{test} of the baseline run"),
                new_figures.figure(name, f"new: {test}", f"{test} of the new run")]
        if any(pair):
            parts.append(f"<section><h2>{escape(check.title if check else test)}</h2>"
                         f'<div class="grids">{"".join(pair)}</div></section>')
    parts.append("</main></body></html>")
    return "\n".join(parts)
