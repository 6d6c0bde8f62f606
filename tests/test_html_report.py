"""report.html read back with a real HTML parser (html5lib) and rendered in headless Chromium:
the verdicts and numbers are the CSVs', every figure decodes, nothing points outside the page,
and `saliencycheck report` regenerates it from any stored run or says in one line why not."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import html5lib
import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from saliencycheck.cli import app

runner = CliRunner()


def constant_map(model, inputs, targets):  # noqa: ANN001, ANN201
    """A map that never changes: every rank score is undefined, so its verdicts are INVALID."""
    return inputs.new_ones((len(inputs), 1, *inputs.shape[2:]))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run with figures, verdicts of every kind (INVALID: a constant map's rank
    scores are undefined) and a skipped image."""
    root = tmp_path_factory.mktemp("html")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            images / f"img{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG but not really")
    config = {
        "model": {"factory": "tests.test_cli:tiny_cnn", "num_classes": 4},
        "images": {"path": "images", "size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        "methods": ["gradient", "guided_backprop", {"name": "gradcam", "layer": "5"},
                    {"name": "custom", "callable": "tests.test_html_report:constant_map",
                     "label": "flat"}],
        "tests": {"cascading": {"enabled": True}, "random_logit": {"enabled": True}},
        "metrics": ["spearman_abs", "spearman", "ssim"],
        "thresholds": {"cascading": {"metric": "spearman", "max": 0.3},
                       "random_logit": {"metric": "ssim", "max": 0.0}},
        "fail_on": ["gradient"],
        "runtime": {"device": "cpu", "bootstrap": 200},
        "output": {"dir": "out", "figure_images": 2},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "step-summary.md").write_text("## an earlier step\n")
    result = runner.invoke(app, ["run", str(root / "config.yaml")],
                           env={"GITHUB_STEP_SUMMARY": str(root / "step-summary.md")})
    assert result.exit_code in (0, 1), result.output
    (root / "run-output.txt").write_text(result.output)
    return root / "out"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _shown(text: str) -> str:
    value = float(text)
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _page(path: Path):  # noqa: ANN202
    return html5lib.parse(path.read_text(encoding="utf-8"), namespaceHTMLElements=False)


def test_every_verdict_cell_is_the_csvs_and_the_banner_says_the_outcome(run_dir: Path) -> None:
    page = _page(run_dir / "report.html")
    verdicts = _rows(run_dir / "verdicts.csv")
    assert {v["verdict"] for v in verdicts} == {"PASS", "FAIL", "INVALID"}
    cells = {(td.get("data-method"), td.get("data-test")): td
             for td in page.iter("td") if "verdict" in (td.get("class") or "").split()}
    assert len(cells) == len(verdicts)
    for v in verdicts:
        cell = cells[(v["method"], v["test"])]
        assert cell.find("b").text == v["verdict"]
        text = "".join(cell.itertext())
        assert v["reason"] in text
        assert f"{_shown(v['statistic'])} [{_shown(v['ci_low'])}, {_shown(v['ci_high'])}]" \
            in text
    banner = next(div for div in page.iter("div") if "banner" in (div.get("class") or ""))
    failed = [v for v in verdicts if v["verdict"] == "FAIL" and v["method"] == "gradient"]
    sentence = "".join(banner.itertext())
    assert sentence.startswith("FAILED (exit code 1)" if failed else "PASSED (exit code 0)")
    # the matrix is the first table of the page: the verdict comes first
    assert next(page.iter("table")).get("class") == "matrix"


def test_every_number_in_the_summary_tables_is_summary_csvs(run_dir: Path) -> None:
    page = _page(run_dir / "report.html")
    summary = {(r["test"], r["method"], r["stage_index"], r["metric"]): r
               for r in _rows(run_dir / "summary.csv")}
    checked = 0
    for table in page.iter("table"):
        if table.get("class") != "summary":
            continue
        test = table.find("caption").text.split(" ")[0].rstrip(",")
        for tr in table.iter("tr"):
            if tr.get("data-method") is None:
                continue
            row = summary[(test, tr.get("data-method"), tr.get("data-stage-index"),
                           tr.get("data-metric"))]
            cells = {td.get("class"): td.text for td in tr.iter("td")}
            assert cells["mean"] == _shown(row["mean"])
            assert cells["interval"] == f"[{_shown(row['ci_low'])}, {_shown(row['ci_high'])}]"
            assert cells["floor"] == _shown(row["floor"])
            assert cells["above"] == _shown(row["above_floor"])
            checked += 1
    # every row of the tests with stages appears in its full table, plus the judged stages
    assert checked >= len(summary)
    assert any(row["mean"] == "nan" for row in summary.values())  # n/a shown, not hidden


def test_the_page_is_one_offline_file_whose_figures_all_decode(run_dir: Path) -> None:
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    page = html5lib.parse(text, namespaceHTMLElements=False)
    images = list(page.iter("img"))
    grids = list((run_dir / "figures").glob("*/*.png"))
    assert len(images) >= 2 + len(grids)  # the curves and bars, every per-image grid
    for img in images:
        src = img.get("src")
        assert src.startswith("data:image/webp;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
        assert img.get("alt")
    for element in page.iter():
        for attribute in ("src", "href", "action", "data"):
            value = element.get(attribute) or ""
            assert not value.startswith(("http:", "https:", "//", "file:")), value
    assert element is not None and "<link" not in text and "@import" not in text
    assert all(script.get("src") is None for script in page.iter("script"))
    headings = [int(h.tag[1]) for h in page.iter() if h.tag in ("h1", "h2", "h3")]
    assert headings[0] == 1 and all(b - a <= 1 for a, b in zip(headings, headings[1:]))
    assert all(table.find("thead") is None or table.find("thead").find("tr").find("th")
               is not None for table in page.iter("table"))


def test_the_provenance_says_how_to_reproduce_the_run(run_dir: Path) -> None:
    page = _page(run_dir / "report.html")
    info = json.loads((run_dir / "run.json").read_text())
    text = "".join(page.find(".//section[@id='provenance']").itertext())
    assert f"saliencycheck run {info['config_file']}" in text
    assert info["config_sha256"] in text and info["model_sha256"] in text
    assert "broken.png" in text  # the skipped image and its reason
    config = next(pre.text for pre in page.iter("pre") if "methods:" in (pre.text or ""))
    assert yaml.safe_load(config) == info["config"]


def test_report_regenerates_the_same_page_from_the_folder(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.html"
    result = runner.invoke(app, ["report", str(run_dir), "-o", str(copy)])
    assert result.exit_code == 0, result.output
    assert copy.read_bytes() == (run_dir / "report.html").read_bytes()


def test_report_on_an_older_runs_folder_and_on_missing_files(run_dir: Path,
                                                             tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    # an earlier version's folder: no figures, no report.html, verdicts without 'control'
    shutil.rmtree(old / "figures")
    (old / "report.html").unlink()
    rows = _rows(old / "verdicts.csv")
    with (old / "verdicts.csv").open("w", newline="") as fh:
        fields = [f for f in rows[0] if f != "control"]
        writer = csv.DictWriter(fh, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    result = runner.invoke(app, ["report", str(old)])
    assert result.exit_code == 0, result.output
    assert (old / "report.html").is_file()
    (old / "run.json").unlink()
    result = runner.invoke(app, ["report", str(old)])
    assert result.exit_code == 2
    assert "no run.json" in result.output and len(result.output.strip().splitlines()) == 1
    (old / "run.json").write_text((run_dir / "run.json").read_text())
    (old / "summary.csv").unlink()
    result = runner.invoke(app, ["report", str(old)])
    assert result.exit_code == 2 and "summary.csv: not found" in result.output


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


def test_the_page_renders_in_chromium_with_the_verdict_on_the_first_screen(
        run_dir: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("SALIENCYCHECK_REQUIRE_BROWSER"):
            pytest.fail("Chromium is required here (.ci/run installs it with apt-get)")
        pytest.skip("Chromium is not installed (apt-get install chromium); CI runs this test")
    shot = tmp_path / "screen.png"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", "--window-size=1280,900",
                           f"--screenshot={shot}", (run_dir / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (900, 1280)
    assert pixels.std() > 10  # not a blank page
    banner = {(253, 228, 228), (227, 244, 228), (238, 241, 245)}  # failed, passed, neutral
    found = {tuple(p) for p in pixels.reshape(-1, 3)} & banner
    assert found, "the verdict banner is not on the first screen"


def test_compare_html_shows_what_moved_and_keeps_the_exit_code(run_dir: Path,
                                                               tmp_path: Path) -> None:
    new = tmp_path / "new"
    shutil.copytree(run_dir, new)
    rows = _rows(new / "summary.csv")
    moved = next(r for r in rows if r["test"] == "cascading" and r["stage_index"] != "0"
                 and r["method"] == "gradient" and r["mean"] != "nan")
    moved["mean"] = str(float(moved["mean"]) + 0.5)
    with (new / "summary.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    verdicts = _rows(new / "verdicts.csv")
    flipped = next(v for v in verdicts if v["verdict"] == "PASS")
    flipped["verdict"] = "FAIL"
    with (new / "verdicts.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(verdicts[0]))
        writer.writeheader()
        writer.writerows(verdicts)
    diff = tmp_path / "diff.html"
    result = runner.invoke(app, ["compare", str(run_dir), str(new), "--html", str(diff)])
    assert result.exit_code == 1, result.output
    page = html5lib.parse(diff.read_text(encoding="utf-8"), namespaceHTMLElements=False)
    banner = "".join(next(d for d in page.iter("div")
                          if "banner" in (d.get("class") or "")).itertext())
    assert banner.startswith("2 regression(s) beyond tolerance 0.05 (exit code 1)")
    cells = [[("".join(td.itertext())) for td in tr.iter("td")] for tr in page.iter("tr")]
    assert [moved["method"], "cascading", moved["stage"], moved["metric"]] in [
        c[:4] for c in cells]
    changed = [tr for tr in page.iter("tr") if tr.get("class") == "changed"]
    assert len(changed) == 1 and "".join(changed[0].itertext()).startswith(
        f"{flipped['method']}{flipped['test']}PASSFAIL")
    images = list(page.iter("img"))
    assert len(images) >= 4  # each test's figure, of both runs
    for img in images:
        Image.open(io.BytesIO(base64.b64decode(img.get("src").split(",", 1)[1]))).verify()
    same = runner.invoke(app, ["compare", str(run_dir), str(run_dir), "--html",
                               str(tmp_path / "same.html")])
    assert same.exit_code == 0
    assert "No regression" in (tmp_path / "same.html").read_text(encoding="utf-8")


def test_a_github_job_summary_is_appended_with_the_outcome_and_verdicts(run_dir: Path) -> None:
    text = (run_dir.parent / "step-summary.md").read_text(encoding="utf-8")
    assert text.startswith("## an earlier step\n## saliencycheck: ")  # appended, not replaced
    verdicts = _rows(run_dir / "verdicts.csv")
    failed = any(v["verdict"] == "FAIL" and v["method"] == "gradient" for v in verdicts)
    assert ("**FAILED (exit code 1)" if failed else "**PASSED (exit code 0)") in text
    for v in verdicts:
        assert f"| {v['method']} |" in text
        assert f"{v['metric']} {_shown(v['statistic'])}" in text
    assert "report.html" in text


def test_progress_in_a_log_is_plain_lines_at_most_every_30_seconds(run_dir: Path) -> None:
    from rich.console import Console

    from saliencycheck.cli import PlainProgress

    now = [0.0]
    out = io.StringIO()
    with PlainProgress(Console(file=out, width=200), clock=lambda: now[0]) as bar:
        task = bar.add_task("running", total=None)
        bar.update(task, description="label randomization: training")  # not a unit
        for step in range(10):
            now[0] += 10.0
            bar.update(task, advance=1, total=10, description=f"unit-0000{step // 5}: images")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # at 30 s, 60 s, 90 s, and the last
    assert lines[0].startswith("progress: 30% (3 of 10 steps), 0 work unit(s) done")
    assert "about 0:01:10 left" in lines[0]
    assert lines[-1].startswith("progress: 100% (10 of 10 steps), 2 work unit(s) done")
    # a run whose standard error is not a terminal (CliRunner) prints such lines
    assert "progress: 100%" in (run_dir.parent / "run-output.txt").read_text()


def test_report_written_into_a_run_folder_is_saliencychecks_own(tmp_path: Path) -> None:
    """A page `report` writes into the run's folder is recorded like the run's files: a later
    run there replaces it instead of refusing the folder; a file of the user's is never
    overwritten."""
    from tests.test_batch import run_cli, write_project

    config = write_project(tmp_path, images=2, output={"html": False})
    assert run_cli("run", config).exit_code == 0
    out = tmp_path / "out"
    assert not (out / "report.html").exists()
    assert run_cli("report", out).exit_code == 0
    result = run_cli("run", config)  # the same folder again: report.html is ours to replace
    assert result.exit_code == 0, result.output
    assert not (out / "report.html").exists()  # the new run writes none (output.html false)
    (out / "report.html").write_text("my notes")
    result = run_cli("report", out)
    assert result.exit_code == 2 and "was not written by saliencycheck" in result.output
    assert (out / "report.html").read_text() == "my notes"
