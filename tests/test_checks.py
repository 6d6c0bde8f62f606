"""The registry of sanity checks: it drives the config, the tables, `compare` and the verdicts,
and a new test is one file plus one registration line (the README's example, run as written)."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import yaml

from saliencycheck.checks import CHECKS, get_check
from saliencycheck.compare import _worse_when
from saliencycheck.config import BaselinesConfig, Config
from saliencycheck.config import TestsConfig as SectionOfTests  # (not a pytest class)

REPO = Path(__file__).resolve().parents[1]


def test_the_config_sections_are_the_registrys_in_its_order() -> None:
    tests = [c.config_key for c in CHECKS if not c.baseline]
    assert list(SectionOfTests.model_fields)[:len(tests)] == tests
    assert list(BaselinesConfig.model_fields) == [c.config_key for c in CHECKS if c.baseline]
    judged = get_args(get_args(Config.model_fields["thresholds"].annotation)[0])
    assert set(judged) == {c.name for c in CHECKS if not c.baseline and c.thresholds}
    assert "completeness" not in judged  # judged by its tolerance instead


def test_the_floor_is_a_reference_exactly_where_the_docs_say() -> None:
    """Threshold.max_above_floor's documentation: cascading, independent, label_randomization
    and random_logit (they score plain maps); sMPRT, input invariance, eMPRT do not."""
    assert {c.name for c in CHECKS if c.against_floor} == {
        "cascading", "independent", "label_randomization", "random_logit"}
    assert {c.name for c in CHECKS if c.higher_is_better} == {"input_invariance",
                                                               "entropy_mprt"}


def test_every_check_declares_itself() -> None:
    names = [c.name for c in CHECKS]
    assert len(set(names)) == len(names)
    for check in CHECKS:
        assert check.title and check.description, check.name
        assert (check.section is None) == check.baseline, check.name
        if check.section is not None:
            undocumented = [f for f, info in check.section.model_fields.items()
                            if not info.description]
            assert not undocumented, (check.name, undocumented)
        assert type(check).__module__.startswith("saliencycheck.checks."), check.name
    assert get_check("no_such_test") is None


@pytest.mark.parametrize(("test", "metric", "stage", "expected"), [
    ("cascading", "spearman", "layer4", 1),  # a rise of similarity after randomization: worse
    ("independent", "ssim", "fc", 1),
    ("smooth_mprt", "spearman", "fc", 1),
    ("random_logit", "spearman", "random_class", 1),
    ("label_randomization", "spearman", "random_labels", 1),
    ("label_randomization", "spearman", "control", 0),  # the reference, not judged
    ("input_invariance", "spearman", "shifted_input", -1),  # must stay alike: a fall is worse
    ("entropy_mprt", "entropy_rise", "fully_randomized", -1),
    ("entropy_mprt", "entropy", "fully_randomized", 0),  # the raw entropies describe
    ("completeness", "relative_error", "trained", 1),
    ("random_floor", "spearman", "random_vs_random", 0),
    ("edge_similarity", "spearman", "sobel_edges", 0),
    ("a_test_from_a_newer_version", "spearman", "x", 1),
])
def test_compare_reads_each_checks_direction(test: str, metric: str, stage: str,
                                             expected: int) -> None:
    assert _worse_when(test, metric, stage) == expected


def test_the_executor_names_no_test() -> None:
    """The executor only orchestrates: every test name lives in its check's module."""
    source = (REPO / "saliencycheck" / "runner" / "executor.py").read_text()
    for check in CHECKS:
        assert not re.search(rf"\b{check.name}\b", source), check.name


def _readme_block(after: str) -> str:
    """The first ```python block of the README's "Adding a sanity test" after ``after``."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Adding a sanity test"):]
    section = section[section.index(after):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_a_new_check_is_one_file_and_one_registration_line(tmp_path: Path) -> None:
    """The README's example check, added to a copy of the package as the README says (its
    file, one line in checks/__init__.py), runs end to end from the CLI: configured, scored,
    tabled, drawn, judged and compared, with nothing else changed."""
    work = tmp_path / "copy"
    shutil.copytree(REPO / "saliencycheck", work / "saliencycheck",
                    ignore=shutil.ignore_patterns("__pycache__"))
    module = _readme_block("## Adding a sanity test")
    assert module.startswith("# saliencycheck/checks/input_noise.py")
    (work / "saliencycheck" / "checks" / "input_noise.py").write_text(module)
    line = _readme_block("and in `saliencycheck/checks/__init__.py`").strip()
    registry = work / "saliencycheck" / "checks" / "__init__.py"
    text = registry.read_text()
    anchor = "from saliencycheck.checks import edges  # noqa: F401\n"
    registry.write_text(text.replace(anchor, anchor + line + "\n"))
    config = tmp_path / "noise.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "resnet18", "num_classes": 10},
        "images": {"path": str(REPO / "sample_images" / "digits"), "size": 32, "limit": 2},
        "methods": ["gradient", "gradient_x_input"],
        "metrics": ["spearman", "ssim"],
        "tests": {"cascading": {"enabled": False}, "input_noise": {"enabled": True}},
        "thresholds": {"input_noise": {"metric": "spearman", "min": -1.0}},
        "baselines": {"random_floor": False},
        "runtime": {"device": "cpu", "bootstrap": 200},
        "output": {"figure_images": 1},
    }))
    env = {**os.environ, "PYTHONPATH": str(work), "COLUMNS": "200"}
    which = subprocess.run([sys.executable, "-c", "import saliencycheck; print(saliencycheck."
                            "__file__)"], cwd=work, env=env, capture_output=True, text=True)
    assert which.stdout.startswith(str(work))  # the copy runs, not the installed package
    done = subprocess.run([sys.executable, "-m", "saliencycheck", "run", str(config), "-o",
                           str(tmp_path / "out")], cwd=work, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    with (out / "report.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["test"] == "input_noise"]
    # 2 images × 2 methods × 2 metrics, at the trained model and the noisy input
    assert {(r["stage_index"], r["stage"]) for r in rows} == {("0", "trained"),
                                                              ("1", "noisy_input")}
    assert len(rows) == 2 * 2 * 2 * 2
    noisy = [float(r["value"]) for r in rows if r["stage"] == "noisy_input"]
    assert all(-1 <= v < 1 for v in noisy)  # the noise changed the maps, not beyond the scale
    with (out / "verdicts.csv").open() as fh:
        verdicts = list(csv.DictReader(fh))
    assert [(v["test"], v["verdict"], v["min"]) for v in verdicts] == [
        ("input_noise", "PASS", "-1.0")] * 2
    assert (out / "figures" / "bars_input_noise.png").is_file()
    assert (out / "figures" / "digit0_1615" / "input_noise.png").is_file()
    shown = " ".join(done.stdout.split())  # the table's title, however rich wrapped it
    assert "input_noise: similarity to the trained model's maps" in shown
    compared = subprocess.run([sys.executable, "-m", "saliencycheck", "compare", str(out),
                               str(out)], cwd=work, env=env, capture_output=True, text=True)
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert "no regression" in compared.stdout.lower()
