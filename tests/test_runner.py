"""Runner behaviour: units stored as they finish, interruption loses nothing finished."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from saliencycheck.config import load_config
from saliencycheck.runner import prepare, run_check
from saliencycheck.runner.plan import plan_units
from tests.test_cli import project  # noqa: F401  (fixture)


def test_plan_units_covers_every_image_once() -> None:
    units = plan_units(7, batch_size=3)
    assert [u.image_indices for u in units] == [(0, 1, 2), (3, 4, 5), (6,)]
    assert len({u.id for u in units}) == 3


def test_interrupt_keeps_finished_units(project: Path) -> None:  # noqa: F811
    config = project / "config.yaml"
    setup = prepare(load_config(config, ["runtime.batch_size=2", "output.figures=false"]))
    calls = {"n": 0}
    per_unit = setup.steps_per_unit

    def progress(steps: int, total: int, text: str) -> None:
        calls["n"] += steps
        if calls["n"] > per_unit:  # the second unit has started
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_check(setup, progress=progress)
    out = project / "out"
    with (out / "report.csv").open() as fh:
        images = {row["image"] for row in csv.DictReader(fh)}
    # The first unit (files broken.png, img0.png) survived, its unreadable file recorded.
    assert images == {"img0.png"}
    info = json.loads((out / "run.json").read_text())
    assert (info["units_done"], info["units_total"]) == (1, 3)
    assert [Path(s["path"]).name for s in info["skipped_images"]] == ["broken.png"]


def test_recompute_target_explains_the_randomized_models_class(project: Path) -> None:  # noqa: F811
    data = yaml.safe_load((project / "config.yaml").read_text())
    data["tests"]["target_on_randomized"] = "recompute"
    data["methods"] = ["gradient"]
    (project / "config.yaml").write_text(yaml.safe_dump(data))
    setup = prepare(load_config(project / "config.yaml", ["output.figures=false"]))
    result = run_check(setup)
    with (result.output_dir / "report.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    changed = [r for r in rows if r["target"] != r["target_explained"]]
    assert changed, "randomized models predict other classes, so some targets must differ"
    assert all(r["stage_index"] != "0" for r in changed)


def test_progress_advances_exactly_to_its_total(project: Path) -> None:  # noqa: F811
    setup = prepare(load_config(project / "config.yaml", [
        "runtime.batch_size=2", "runtime.chunk_size=6", "runtime.repeats=2",
        "tests.random_logit.enabled=true", "output.figures=false"]))
    seen = {"done": 0.0, "total": None}

    def progress(steps: float, total: int, text: str) -> None:
        seen["done"] += steps
        seen["total"] = total

    run_check(setup, progress=progress)
    assert seen["total"] == setup.steps_per_unit * 3  # 3 units of 2 image files
    assert seen["done"] == pytest.approx(seen["total"])


def test_stage_logits_from_the_passes_equal_those_of_own_forwards(project: Path) -> None:  # noqa: F811
    # Gradient's passes push the images through every stage: their logits are read there
    # instead of from a no-grad forward per stage; stages.csv's numbers must not move.
    from saliencycheck.runner.executor import UnitExecutor

    setup = prepare(load_config(project / "config.yaml", ["output.figures=false",
                                                          "tests.independent.enabled=true"]))
    unit = plan_units(len(setup.images), batch_size=setup.config.runtime.batch_size)[0]
    observations = []
    for from_passes in (True, False):
        executor = UnitExecutor(setup)
        assert executor.logits_from_passes  # the default: target_on_randomized 'original'
        if not from_passes:
            executor.logits_from_passes, executor.forward_refs = False, executor.stages
        observations.append(executor.run(unit, lambda *_: None).stages)
    passes, forwards = observations
    assert [(o.test, o.stage_index, o.n) for o in passes] == \
        [(o.test, o.stage_index, o.n) for o in forwards]
    for a, b in zip(passes, forwards):
        assert a.relative_l2_sum == pytest.approx(b.relative_l2_sum, rel=1e-5, abs=1e-6)
        assert a.top1_agreement_sum == b.top1_agreement_sum
