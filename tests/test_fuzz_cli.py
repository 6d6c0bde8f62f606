r"""End-to-end fuzzing of the command line (hypothesis): generated configs, file trees,
command lines and signals, with the CLI's promises checked after every command.

Run it (defaults sized for CI on 2 shared CPU cores: about a minute for the file):

    .venv/bin/python -m pytest tests/test_fuzz_cli.py
    SALIENCYCHECK_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest tests/test_fuzz_cli.py
    SALIENCYCHECK_FUZZ_SIGNAL_EXAMPLES=20 .venv/bin/python -m pytest tests/test_fuzz_cli.py \
        -k signals
    SALIENCYCHECK_FUZZ_COLLECT=/tmp/broken.jsonl SALIENCYCHECK_FUZZ_SEED=7 \
        SALIENCYCHECK_FUZZ_EXAMPLES=300 .venv/bin/python -m pytest tests/test_fuzz_cli.py

``SALIENCYCHECK_FUZZ_EXAMPLES`` (default 40): in-process examples (1-3 commands each, about
1 s per example here); ``SALIENCYCHECK_FUZZ_SIGNAL_EXAMPLES`` (default 3, or a fifteenth of the
former when larger): subprocess runs that get a signal (about 10 s each). Examples are
derandomized (the same every run) and not shrunk; ``SALIENCYCHECK_FUZZ_SEED=<int>`` draws
another set, ``SALIENCYCHECK_FUZZ_SHRINK=1`` shrinks a failing example to a minimal one,
``SALIENCYCHECK_FUZZ_COLLECT=<file>`` records every broken promise (JSON lines) and keeps going
instead of stopping at the first (for bug hunts; the module fails once at the end),
``SALIENCYCHECK_FUZZ_LOG=<file>`` logs every command with its exit code and error line, and
``--hypothesis-show-statistics`` counts exit codes per command. No ``.hypothesis`` folder is
written (``database=None``).

The tests:

* ``test_fuzzed_commands_keep_their_promises`` drives ``saliencycheck`` in this process (the
  real entry point, ``saliencycheck.cli.main``, which turns an escaped exception into exit 3,
  under ``CliRunner``'s isolation, stdout and stderr apart) through 1-3 commands per example
  (``run`` with random ``-o``/``--force``/``--resume``/``--shard``/``--junit``/``--json``/
  ``--set``, ``merge``, ``validate``, ``compare``, ``init``, and command lines click itself
  refuses) on a sandbox of 1-4 generated images (valid in many modes, corrupt, empty,
  truncated, under 8 px, NaN/inf float TIFFs, a folder and a dangling link with image
  suffixes, names with spaces and unicode, same names in sub-folders), a config built from a
  valid base (a random-init ``tests.test_cli:tiny_cnn``, 16-32 px) with random mutations in
  "wild" examples (dropped, mistyped, out-of-range and unknown fields, invalid YAML, duplicate
  keys, malformed ``--set``), the user's own files planted in and next to the output folder,
  and user actions between commands (planting or editing files, corrupting or deleting the
  manifest, changing an image, deleting run.json, truncating a unit). One example in ten
  names a ``fault_*`` model factory below: the only runs allowed to exit 3.
* ``test_signals_leave_a_report_that_is_complete_or_absent`` runs ``python -m saliencycheck
  run`` in a subprocess on a slow model (``tests.test_batch:slow_cnn``), sends SIGINT or
  SIGTERM at startup, after the folder is claimed, just after the first unit is stored or
  later, checks the same promises (exit 130/143, or 0 if it finished first; a process the
  signal killed before Python's handlers existed counts as the shell's 128+N), then that
  ``run --resume`` exits 0 with a complete report.
* ``test_pinned_scenarios_keep_their_promises``, ``test_sigterm_while_run_loads_its_modules_
  exits_143`` and ``test_interrupt_while_the_report_is_written_then_resume_finishes``:
  deterministic reproductions of what the fuzzer found (the ``bug_*`` cases: each failed
  before its fix) and plain sessions that must pass.

The promises, checked after every command (``check_command``, ``check_report``):

1. no Python traceback in stdout or stderr;
2. the exit code is 0, 1, 2, 3, 130 or 143 (130/143 only after a signal); 3 only when the
   harness injected a fault; exit 2 prints exactly one line starting with ``error:``, exit 3
   exactly one starting with ``internal error:`` or ``error:``;
3. the user's files are untouched: every file in the sandbox before the command that is not
   saliencycheck's (recorded in its folder's ``.saliencycheck/manifest.json`` with the SHA-256
   it has on disk, or under ``.saliencycheck/``) is still there byte for byte unless the
   manifest lists it after the command; a file the user planted must survive even then; a
   file saliencycheck wrote and the user then edited is left in place (ownership.py's
   promise); the ``--junit`` file is the user's request (exempt), but it never replaces
   saliencycheck's own files; every new file in an output folder is recorded in its manifest
   (or under ``.saliencycheck/``); ``validate`` writes nothing; and a refused command (exit 2)
   leaves nothing behind in an output folder it does not own (the next run would be refused
   as "not empty");
4. the report is complete or absent: if ``run.json`` (written by this command) exists it
   parses, every file in its ``report_files`` exists and is recorded in the manifest with the
   SHA-256 it has on disk (run.json too), and ``complete`` is true iff ``units_done ==
   units_total``; where run.json is absent or says ``complete: false``, ``saliencycheck
   compare OUT OUT`` exits 2 (never 0, "no regression"); a ``run`` (not a shard) or ``merge``
   (without ``--allow-partial``) that exits 0 or 1 leaves a complete run.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, event, given, seed, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from saliencycheck import cli
from tests.test_cli import tiny_cnn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("SALIENCYCHECK_FUZZ_EXAMPLES", "40"))
SIGNAL_EXAMPLES = int(os.environ.get("SALIENCYCHECK_FUZZ_SIGNAL_EXAMPLES",
                                     str(max(3, EXAMPLES // 15))))
COLLECT = os.environ.get("SALIENCYCHECK_FUZZ_COLLECT")
LOG = os.environ.get("SALIENCYCHECK_FUZZ_LOG")
PHASES = ([Phase.explicit, Phase.generate, Phase.shrink]
          if os.environ.get("SALIENCYCHECK_FUZZ_SHRINK") == "1"
          else [Phase.explicit, Phase.generate])
SEED = int(os.environ.get("SALIENCYCHECK_FUZZ_SEED", "0"))
FUZZ = settings(deadline=None, derandomize=not SEED, database=None, phases=PHASES,
                print_blob=False, suppress_health_check=[
                    HealthCheck.too_slow, HealthCheck.data_too_large,
                    HealthCheck.large_base_example, HealthCheck.filter_too_much])
ALLOWED_EXITS = {0, 1, 2, 3, 130, 143}
TRACEBACK = "Traceback (most recent call last)"
STATE = ".saliencycheck"
# Environment of every command: no Slurm array (--shard would default from it), no --debug.
CLEAN_ENV = {name: None for name in (
    "SALIENCYCHECK_DEBUG", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_JOB_ID")}


# ---------------------------------------------------------------------------------------------
# Faults the harness injects itself: the only runs allowed to exit 3.
# ---------------------------------------------------------------------------------------------

FAULT_PREFIX = "fault_"


def _raise_fault(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    raise RuntimeError("fault injected by tests/test_fuzz_cli.py: forward raises")


def fault_forward_raises(num_classes: int = 10) -> nn.Module:
    """INJECTED FAULT: `tiny_cnn` whose every forward raises RuntimeError (in its last
    layer, which every pass reaches, the prefix cache's too)."""
    model = tiny_cnn(num_classes)
    model[-1].register_forward_pre_hook(_raise_fault)
    return model


def fault_forward_raises_later(num_classes: int = 10) -> nn.Module:
    """INJECTED FAULT: `tiny_cnn` whose last layer raises RuntimeError from its 12th pass on
    (after set-up, usually while work units run)."""
    model = tiny_cnn(num_classes)
    calls = [0]

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        calls[0] += 1
        if calls[0] >= 12:
            _raise_fault(module, inputs)

    model[-1].register_forward_pre_hook(count)
    return model


def fault_factory_raises(num_classes: int = 10) -> nn.Module:
    """INJECTED FAULT: the factory itself raises RuntimeError."""
    raise RuntimeError("fault injected by tests/test_fuzz_cli.py: factory raises")


def fault_forward_exits(num_classes: int = 10) -> nn.Module:
    """INJECTED FAULT: `tiny_cnn` whose forward calls sys.exit(0) (must never pass as 0)."""
    model = tiny_cnn(num_classes)
    model[-1].register_forward_pre_hook(lambda module, inputs: sys.exit(0))
    return model


FAULT_FACTORIES = [f"tests.test_fuzz_cli:{name}" for name in (
    "fault_forward_raises", "fault_forward_raises_later", "fault_factory_raises",
    "fault_forward_exits")]


# ---------------------------------------------------------------------------------------------
# The sandbox: images, the user's files, the config.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageSpec:
    path: str  # relative to images/
    kind: str
    height: int
    width: int
    seed: int


VALID_KINDS = ["rgb", "rgb", "rgb", "rgb_jpeg", "gray", "rgba", "palette", "i16_tiff",
               "float_tiff", "constant", "bmp", "webp"]
BAD_KINDS = ["nan_tiff", "inf_tiff", "empty", "text", "truncated", "tiny", "folder",
             "dangling_link", "cmyk_jpeg"]
SUFFIX = {"rgb": ".png", "rgb_jpeg": ".jpg", "gray": ".png", "rgba": ".png", "palette": ".png",
          "i16_tiff": ".tif", "float_tiff": ".tiff", "constant": ".png", "bmp": ".bmp",
          "webp": ".webp", "nan_tiff": ".tif", "inf_tiff": ".tiff", "empty": ".png",
          "text": ".jpg", "truncated": ".png", "tiny": ".png", "folder": ".png",
          "dangling_link": ".png", "cmyk_jpeg": ".jpeg"}
STEMS = ["img", "img 1", "Ünïcødé 画像", "a", "x  y", "-dash", "UPPER"]
FOLDERS = ["", "", "", "sub", "sub dir ü"]


@st.composite
def image_sets(draw: st.DrawFn) -> list[ImageSpec]:
    specs: dict[str, ImageSpec] = {}
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(VALID_KINDS) if draw(st.integers(0, 3)) else
                    st.sampled_from(BAD_KINDS))
        folder, stem = draw(st.sampled_from(FOLDERS)), draw(st.sampled_from(STEMS))
        path = f"{folder}/{stem}{SUFFIX[kind]}" if folder else f"{stem}{SUFFIX[kind]}"
        specs.setdefault(path, ImageSpec(path, kind, draw(st.integers(16, 48)),
                                         draw(st.integers(16, 48)), draw(st.integers(0, 99))))
    return list(specs.values())


def write_image(path: Path, spec: ImageSpec) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    h, w = spec.height, spec.width
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    kind = spec.kind
    if kind in ("rgb", "bmp"):
        Image.fromarray(rgb).save(path)
    elif kind == "rgb_jpeg":
        Image.fromarray(rgb).save(path, format="JPEG")
    elif kind == "webp":
        Image.fromarray(rgb).save(path, format="WEBP")
    elif kind == "gray":
        Image.fromarray(rgb[..., 0]).save(path)
    elif kind == "rgba":
        Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(path)
    elif kind == "palette":
        Image.fromarray(rgb).convert("P").save(path)
    elif kind == "cmyk_jpeg":
        Image.fromarray(rgb).convert("CMYK").save(path, format="JPEG")
    elif kind == "i16_tiff":
        Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16)).save(path)
    elif kind in ("float_tiff", "nan_tiff", "inf_tiff"):
        pixels = rng.random((h, w)).astype(np.float32)
        if kind == "nan_tiff":
            pixels[rng.random((h, w)) < 0.3] = np.nan
        elif kind == "inf_tiff":
            pixels[0, 0], pixels[-1, -1] = np.inf, -np.inf
        Image.fromarray(pixels, mode="F").save(path, format="TIFF")
    elif kind == "constant":
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not an image, just a note with an image suffix\n")
    elif kind == "truncated":
        Image.fromarray(rgb).save(path, format="PNG")
        path.write_bytes(path.read_bytes()[: max(40, path.stat().st_size // 2)])
    elif kind == "tiny":
        Image.fromarray(rgb[:4, :4]).save(path)
    elif kind == "folder":
        path.mkdir()
        (path / "inside.txt").write_text("a folder with an image suffix\n")
    elif kind == "dangling_link":
        path.symlink_to(path.parent / "does-not-exist.png")
    else:  # pragma: no cover
        raise AssertionError(kind)


# The base config: valid, cheap (a random-init 8-channel CNN on 16-32 px images).
CHEAP_METHODS = ["gradient", "gradient_x_input", "guided_backprop", "deconvnet",
                 {"name": "integrated_gradients", "steps": 2}, {"name": "gradcam"},
                 {"name": "guided_gradcam"}, {"name": "smoothgrad", "samples": 2},
                 {"name": "vargrad", "samples": 2, "label": "vg"}]
METRICS = ["spearman_abs", "spearman", "ssim", "hog", "pearson"]
EXTRA_TESTS = {"independent": {"enabled": True}, "random_logit": {"enabled": True},
               "completeness": {"enabled": True}, "input_invariance": {"enabled": True},
               "entropy_mprt": {"enabled": True, "bins": 10},
               "smooth_mprt": {"enabled": True, "samples": 2}}


@st.composite
def base_configs(draw: st.DrawFn) -> dict[str, Any]:
    methods = draw(st.lists(st.sampled_from(range(len(CHEAP_METHODS))), min_size=1,
                            max_size=3, unique=True))
    metrics = draw(st.lists(st.sampled_from(METRICS), min_size=1, max_size=3, unique=True))
    tests: dict[str, Any] = {"cascading": {"enabled": draw(st.booleans()) or True}}
    for name in draw(st.lists(st.sampled_from(sorted(EXTRA_TESTS)), max_size=2, unique=True)):
        tests[name] = dict(EXTRA_TESTS[name])
    chosen = [CHEAP_METHODS[i] for i in methods]
    if "completeness" in tests and not any(
            m in ("gradient_x_input", CHEAP_METHODS[4]) for m in chosen):
        chosen.append("gradient_x_input")  # the test checks it (or integrated gradients)
    config: dict[str, Any] = {
        "model": {"factory": "tests.test_cli:tiny_cnn", "num_classes": 10},
        "images": {"path": "images", "size": draw(st.integers(16, 32))},
        "methods": chosen,
        "tests": tests,
        "metrics": metrics,
        "baselines": {"random_floor": draw(st.integers(0, 4)) == 0,
                      "edges": draw(st.booleans())},
        "runtime": {"device": "cpu", "bootstrap": 100, "batch_size": draw(st.integers(1, 2))},
        "output": {"dir": "out", "figures": draw(st.booleans()),
                   "figure_images": draw(st.integers(0, 2))},
    }
    if draw(st.booleans()):
        config["thresholds"] = {"cascading": {"metric": metrics[0], "stage": "final",
                                              "max": draw(st.sampled_from([0.25, 1.0, -1.0]))}}
        labels = [m if isinstance(m, str) else m.get("label", m["name"]) for m in chosen]
        config["fail_on"] = draw(st.sampled_from(["all", "none", labels[:1]]))
    return config


GENERIC_VALUES = [None, "", "x", -1, 0, 1.5, True, [], {}, [1, 2], "🙂", float("nan"),
                  float("inf"), 10**30, {"a": {"b": 1}}]
SPECIFIC_VALUES: dict[str, list[Any]] = {
    "model.name": ["vgg11", "nope", "resnet18 "],
    "model.weights": ["DEFAULT", "mine.txt", "missing.pt", "images", "IMAGENET1K_V1"],
    "model.num_classes": [0, -3, 1, 2, "10", 2.5],
    "model.factory": ["tests.test_cli:nope", "nope", "nope.module:f", "os:getcwd", "json:loads",
                      "tests.test_cli:tanh_cnn", "tests.test_cli", ":", "tests.test_cli:"]
    + FAULT_FACTORIES,
    "model.factory_kwargs": [{"bogus": 1}, {"num_classes": 3}, [1]],
    "images.path": ["missing", "images/*.png", "images/**/*", "list.txt", "mine.txt", "",
                    "images/sub", "/proc/saliencycheck-fuzz-missing", "out"],
    "images.size": [7, 8, 0, -16, 4097, "big", 16.5, 9],
    "images.mean": [[0.5], [0.5, 0.5, 0.5, 0.5], ["a", 0, 0], [float("nan")] * 3],
    "images.std": [[0, 0, 0], [-1, 1, 1], [1e-30] * 3, [float("inf")] * 3],
    "images.target": ["label", "predicted", 3, 9, 10, 1000, -1, "7", "x"],
    "images.labels": ["mine.txt", "missing.csv", "labels.csv"],
    "images.limit": [0, -1, 1, 2, "one"],
    "methods": [[], ["nope"], ["gradient", "gradient"], [{"name": "gradcam", "layer": "zzz"}],
                [{"name": "integrated_gradients", "steps": 0}],
                [{"name": "smoothgrad", "samples": 2, "noise": -1}],
                [{"name": "smoothgrad", "of": "smoothgrad", "samples": 2}],
                [{"name": "custom", "callable": "nope:nope"}],
                [{"name": "integrated_gradients", "steps": 2, "baseline": "blur",
                  "blur_sigma": 0}],
                [{"name": "gradient", "label": "a"}, {"name": "deconvnet", "label": "a"}],
                [{"name": "gradcam", "layer": "1"}], [{"nam": "gradient"}], "gradient"],
    "tests.cascading.enabled": [False, "yes", "no", 2],
    "tests.cascading.order": ["topdown", "bottom_up"],
    "tests.cascading.granularity": ["layer", "blocks"],
    "tests.init": ["normal", "shuffle", "zeros"],
    "tests.init_std": [0, 1e300, float("inf")],
    "tests.target_on_randomized": ["recompute", "other"],
    "tests.label_randomization": [{"checkpoint": "mine.txt"}, {"checkpoint": "missing.pt"},
                                  {}],
    "tests.input_invariance": [{"enabled": True, "shift": float("inf")},
                               {"enabled": True, "shift": 0}],
    "tests.completeness": [{"enabled": True, "tolerance": 0}],
    "tests.entropy_mprt": [{"enabled": True, "bins": 1}],
    "tests.smooth_mprt": [{"enabled": True, "samples": 1}, {"enabled": True, "samples": 2,
                                                            "noise": 0}],
    "metrics": [[], ["nope"], ["ssim", "ssim"], "ssim"],
    "postprocess.percentile": [0, 100, 101, float("nan")],
    "postprocess.ssim_data_range": [float("inf"), 1e-300, 0],
    "postprocess.abs_reduction": ["max_abs", "nope"],
    "runtime.device": ["cuda", "cuda:1", "tpu", "meta", "mps", "", "cpu:0", "CPU"],
    "runtime.batch_size": [0, -1, "two", 1.5, 3],
    "runtime.chunk_size": [0, 1, "auto", "big"],
    "runtime.seed": [-1, 2**32, 2**32 - 1, "x"],
    "runtime.repeats": [0, 2, -1],
    "runtime.ci_level": [0, 1, 0.5, float("nan")],
    "runtime.bootstrap": [99, 0, "many", 100.5],
    "runtime.precision": ["bf16", "fp8"],
    "runtime.backend": ["ray", "dask"],
    "runtime.max_retries": [-1],
    "runtime.device_memory_gib": [0, 1],
    "output.dir": ["", ".", "images", "mine.txt", "other dir/ü", "/proc/saliencycheck-fuzz",
                   "/dev/null", "out/"],
    "output.figures": ["maybe", False, True],
    "output.figure_images": [-1, 100],
    "output.save_maps": [True, "yes"],
    "baselines.random_floor": [True, "sometimes"],
    "thresholds": [{"cascading": {"metric": "nope", "max": 0.1}},
                   {"cascading": {"metric": "ssim", "stage": 99, "max": 0.1}},
                   {"cascading": {"metric": "ssim", "stage": "layer9", "max": 0.1}},
                   {"cascading": {"metric": "ssim"}},
                   {"nope": {"metric": "ssim", "max": 0.1}},
                   {"cascading": {"metric": "ssim", "max_above_floor": 0.1}},
                   {"cascading": {"metric": "ssim", "max": float("nan")}}],
    "fail_on": ["nope", ["nope"], "all", "none", 3],
    "preset": ["adebayo2018", "nope", []],
}
PATHS = sorted(SPECIFIC_VALUES)
DROPPABLE = ["images", "images.size", "images.path", "methods", "tests", "tests.cascading",
             "metrics", "runtime", "runtime.bootstrap", "output", "output.dir", "baselines",
             "model.num_classes", "thresholds"]
UNKNOWN_KEYS = [("", "modle"), ("runtime", "devise"), ("images", "sizee"), ("tests", "cascade"),
                ("output", "figure"), ("model", "weight"), ("tests.cascading", "orders"),
                ("", "Model")]


@st.composite
def mutations(draw: st.DrawFn) -> tuple:
    op = draw(st.sampled_from(["set", "set", "set", "drop", "unknown"]))
    if op == "set":
        path = draw(st.sampled_from(PATHS))
        value = draw(st.sampled_from(SPECIFIC_VALUES[path]) if draw(st.integers(0, 2))
                     else st.sampled_from(GENERIC_VALUES))
        return ("set", path, value)
    if op == "drop":
        return ("drop", draw(st.sampled_from(DROPPABLE)))
    section, key = draw(st.sampled_from(UNKNOWN_KEYS))
    return ("unknown", section, key)


def mutate(config: dict[str, Any], mutation: tuple) -> None:
    op, path = mutation[0], mutation[1]
    if op == "unknown":
        path = f"{path}.{mutation[2]}" if path else mutation[2]
    *parents, last = path.split(".")
    node: Any = config
    for part in parents:
        if not isinstance(node, dict):
            return
        node = node.setdefault(part, {})
    if not isinstance(node, dict):
        return
    if op == "drop":
        node.pop(last, None)
    elif op == "set":
        node[last] = mutation[2]
    else:
        node[last] = 1


# Text-level damage of the YAML file (a wild scenario's, now and then).
TEXT_DAMAGE = ["unclosed", "tab", "duplicate", "duplicate_nested", "non_mapping", "scalar",
               "empty", "bytes", "bom", "multi_document", "alias_bomb", "python_tag", "colon"]


def render(config: dict[str, Any], damage: str | None) -> bytes:
    text = yaml.safe_dump(config, allow_unicode=True, sort_keys=False)
    if damage is None:
        return text.encode()
    if damage == "unclosed":
        return (text + "extra: [1, 2\n").encode()
    if damage == "tab":
        return text.replace("  ", "\t", 1).encode()
    if damage == "duplicate":
        return (text + "runtime: {device: cpu}\n").encode()
    if damage == "duplicate_nested":
        return text.replace("model:\n", "model:\n  num_classes: 10\n", 1).encode()
    if damage == "non_mapping":
        return b"- model\n- images\n"
    if damage == "scalar":
        return b"42\n"
    if damage == "empty":
        return b""
    if damage == "bytes":
        return b"model: \xff\xfe\x00 broken\n" + text.encode()
    if damage == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if damage == "multi_document":
        return (text + "---\n" + text).encode()
    if damage == "alias_bomb":
        return (text + "bomb: &a [x, x]\nb2: &b [*a, *a, *a, *a]\nb3: [*b, *b, *b, *b]\n").encode()
    if damage == "python_tag":
        return (text + "evil: !!python/object/apply:os.system ['true']\n").encode()
    if damage == "colon":
        return (text + "a: b: c\n").encode()
    raise AssertionError(damage)  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# Command lines and what the user does between them.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    kind: str  # run, merge, validate, compare, init, click_usage
    output: str | None = None  # -o
    force: bool = False
    resume: bool = False
    shard: str | None = None
    junit: str | None = None
    as_json: bool = False
    sets: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()  # merge folders, init path, a click-level mistake


@dataclass(frozen=True)
class Step:
    action: str | None  # done before the command
    command: Command


# Each pool: the choices a careful user makes, then (in a "wild" scenario) the mistakes.
OUTPUTS = ([None, None, None, "out", "other", "deep/er/new", "out/"],
           ["", "  ", "mine.txt", "images", ".", "existing", "out/units", "images/sub"])
JUNITS = ([None, None, None, "junit.xml", "out/junit.xml", "reports/j ü.xml"],
          ["images", "mine.txt/j.xml", "/proc/saliencycheck-fuzz/j.xml", "existing",
           "mine.txt", "out/run.json", "out/report.csv", "out/units/plan.json",
           "out/.saliencycheck/manifest.json", "out"])
SHARDS = ([None], ["0/2", "1/2", "0/1", "2/2", "x", "0/0", "-1/2", "1/", " 0/2", "1/3"])
SETS = (["runtime.batch_size=1", "output.figures=false", "metrics=[ssim]", "images.size=16",
         "output.dir=other", "output.dir=out", "runtime.seed=7", "images.target=9",
         "tests.cascading.order=bottom_up", " runtime.batch_size = 2"],
        ["runtime.batch_size=two", "noequals", "=1", "runtime.=1", "runtime.batch_size=[",
         "runtime..x=1", "images.size=", "runtime=3", "model.factory.x=1", "runtime.seed=-1",
         "tests.cascading.enabled=no", "metrics=[ssim", "methods=[gradient, nope]",
         "images.path=missing", "unknown.key=1", "runtime.device=cuda", "output.dir=",
         "runtime.seed=!!python/name:os.system", "x=" + "[" * 3000, "images.target=10",
         "methods={}", "a.b.c.d=1", "runtime.batch_size=1=2", "images=", "output.dir=images"])
ACTIONS = ([None], ["plant", "edit_owned", "corrupt_manifest", "delete_manifest",
                    "change_image", "delete_run_json", "plant_in_units", "truncate_unit"])


def pick(draw: st.DrawFn, pools: tuple[list, list], wild: bool, odds: int = 3) -> Any:
    """A careful choice, or (wild, 1 time in ``odds``) a mistake."""
    careful, mistakes = pools
    if wild and draw(st.integers(1, odds)) == 1:
        return draw(st.sampled_from(mistakes))
    return draw(st.sampled_from(careful))


@st.composite
def run_commands(draw: st.DrawFn, wild: bool, *, resume: bool | None = None,
                 shard: str | None | bool = False) -> Command:
    return Command(
        "run",
        output=pick(draw, OUTPUTS, wild),
        force=draw(st.integers(0, 2)) == 0,
        resume=draw(st.integers(0, 3)) == 0 if resume is None else resume,
        shard=pick(draw, (["0/2", "1/2", None, None, None, None], SHARDS[1]), wild)
        if shard is False else shard or None,
        junit=pick(draw, JUNITS, wild),
        as_json=draw(st.booleans()),
        sets=tuple(pick(draw, SETS, wild, odds=2) for _ in range(draw(st.integers(0, 2))))
        if draw(st.integers(0, 3)) == 0 else (),
    )


@st.composite
def other_commands(draw: st.DrawFn, wild: bool) -> Command:
    kind = draw(st.sampled_from(["merge", "merge", "validate", "validate", "compare", "init"]
                                + ["click_usage"] * wild))
    if kind == "merge":
        folders = pick(draw, ([("out",), ("out", "other")],
                              [("missing",), ("images",), ("mine.txt",)]), wild)
        extra = (*folders, *draw(st.sampled_from([(), (), ("--allow-partial",)])))
        return Command("merge", output=pick(draw, ([None, None, "merged", "out"], ["", "mine.txt"]),
                                            wild),
                       force=draw(st.booleans()), junit=pick(draw, JUNITS, wild),
                       as_json=draw(st.booleans()), extra=extra)
    if kind == "validate":
        return Command("validate", sets=tuple(pick(draw, SETS, wild, odds=2)
                                              for _ in range(draw(st.integers(0, 1)))))
    if kind == "compare":
        return Command("compare", extra=draw(st.sampled_from([
            ("out", "out"), ("out", "other"), ("mine.txt", "out"), ("out", "out", "--tolerance",
                                                                    "-1")])))
    if kind == "init":
        return Command("init", extra=draw(st.sampled_from([("mine.txt",), ("images",),
                                                           ("new.yaml",), ("nope/x.yaml",)])))
    return Command("click_usage", extra=draw(st.sampled_from([
        ("run", "CONFIG", "--bogus"), ("run",), ("compare", "out", "out", "--tolerance", "x"),
        ("run", "CONFIG", "--shard")])))


@st.composite
def step_lists(draw: st.DrawFn, wild: bool) -> list[Step]:
    recipe = draw(st.sampled_from(["one", "twice", "resume", "shards", "shard_merge",
                                   "validate_run", "random", "random"]))
    first = Command("run") if draw(st.booleans()) else draw(run_commands(wild, resume=False,
                                                                         shard=None))
    if recipe == "one":
        commands = [draw(run_commands(wild))]
    elif recipe == "twice":
        commands = [first, draw(run_commands(wild, resume=False, shard=None))]
    elif recipe == "resume":
        commands = [first, Command("run", resume=True, force=draw(st.booleans()))]
    elif recipe == "shards":
        commands = [Command("run", shard="0/2"), Command("run", shard="1/2"),
                    Command("merge", extra=("out",))]
    elif recipe == "shard_merge":
        commands = [Command("run", shard="0/2"),
                    Command("merge", extra=draw(st.sampled_from([("out",), ("out",
                                                                          "--allow-partial")])))]
    elif recipe == "validate_run":
        commands = [Command("validate"), first]
    else:
        commands = draw(st.lists(st.one_of(run_commands(wild), other_commands(wild)),
                                 min_size=1, max_size=3))
    actions = [None] + [pick(draw, ACTIONS, True, odds=2) for _ in commands[1:]]
    return [Step(action, command) for action, command in zip(actions, commands)]


@dataclass
class Scenario:
    wild: bool  # mistakes allowed (mutated config, damaged YAML, bad options, planted files)
    images: list[ImageSpec]
    config: dict[str, Any]
    mutations: list[tuple]
    damage: str | None
    config_name: str
    planted: list[str]
    steps: list[Step]
    fault: bool = field(init=False)

    def __post_init__(self) -> None:
        text = repr(self.config) + repr(self.steps)
        self.fault = FAULT_PREFIX in text


PLANTABLE = ["out/notes.txt", "out/figures/mine.pdf", "out/.gitkeep", "out/report.csv",
             "out/units/mine.json", "out/run.json", "out/sub/deep.txt"]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    wild = draw(st.integers(0, 2)) > 0
    config = draw(base_configs())
    if draw(st.integers(0, 9)) == 0:  # the harness injects a fault: exit 3 allowed
        config["model"]["factory"] = draw(st.sampled_from(FAULT_FACTORIES))
    muts = (draw(st.one_of(st.just([]), st.lists(mutations(), min_size=1, max_size=3)))
            if wild else [])
    for mutation in muts:
        mutate(config, mutation)
    planted = (draw(st.lists(st.sampled_from(PLANTABLE), max_size=3, unique=True))
               if wild and draw(st.booleans()) else [])
    damage = draw(st.sampled_from(TEXT_DAMAGE)) if wild and not draw(st.integers(0, 3)) else None
    return Scenario(wild=wild, images=draw(image_sets()), config=config, mutations=muts,
                    damage=damage,
                    config_name=draw(st.sampled_from(["config.yaml", "config.yaml",
                                                      "my config ü.yml"])),
                    planted=planted, steps=draw(step_lists(wild)))


# ---------------------------------------------------------------------------------------------
# Invoking the CLI and checking its promises.
# ---------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    args: list[str]
    code: int
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout + self.stderr


def invoke(args: list[str], cwd: Path) -> Outcome:
    """``saliencycheck ARGS`` in this process through the real entry point (``cli.main``,
    which turns an escaped exception into exit 3), with stdout and stderr captured apart."""
    cli._error_log_dir = None  # a fresh process starts without one
    runner = CliRunner()
    old_argv, old_cwd = sys.argv, os.getcwd()
    with runner.isolation(env=CLEAN_ENV) as streams:
        sys.argv = ["saliencycheck", *args]
        os.chdir(cwd)
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            os.chdir(old_cwd)
            sys.argv = old_argv
        stdout = streams[0].getvalue().decode("utf-8", "replace")
        stderr = streams[1].getvalue().decode("utf-8", "replace")
    return Outcome(args, code, stdout, stderr)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[Path, str]:
    """Every file under root (symlinks by their target) → its content hash."""
    files: dict[Path, str] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_symlink():
                files[path] = "symlink:" + os.readlink(path)
            elif path.is_file():
                files[path] = sha256(path)
    return files


def folders_under(root: Path) -> set[Path]:
    return {Path(folder) / name for folder, names, _ in os.walk(root) for name in names}


def manifests(root: Path) -> dict[Path, dict[str, str] | None]:
    """Output folders under root (those holding .saliencycheck/manifest.json) → their
    recorded files (None: the manifest does not parse)."""
    found: dict[Path, dict[str, str] | None] = {}
    for path in root.rglob(f"{STATE}/manifest.json"):
        try:
            files = json.loads(path.read_text(encoding="utf-8"))["files"]
            found[path.parent.parent] = files if isinstance(files, dict) else None
        except (ValueError, KeyError, TypeError, OSError):
            found[path.parent.parent] = None
    return found


def owner(path: Path, folders: dict[Path, dict[str, str] | None]) -> tuple[Path, str] | None:
    """The output folder holding ``path`` (the innermost) and the path relative to it."""
    best = None
    for folder in folders:
        if folder in path.parents and (best is None or best in folder.parents):
            best = folder
    return None if best is None else (best, path.relative_to(best).as_posix())


class Violations:
    """Broken promises: raised at once, or (SALIENCYCHECK_FUZZ_COLLECT) recorded."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def check(self, ok: bool, what: str, context: str) -> None:
        if ok:
            return
        message = f"{what}\n{context}"
        if not COLLECT:
            raise AssertionError(message)
        self.found.append(message)
        with open(COLLECT, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"violation": what, "context": context}) + "\n")


def describe(sandbox: Path, outcome: Outcome, config_text: str | None) -> str:
    shown = outcome.text if len(outcome.text) < 6000 else (
        outcome.text[:2000] + "\n[...]\n" + outcome.text[-3000:])
    return (f"command: saliencycheck {' '.join(repr(a) for a in outcome.args)} "
            f"(cwd {sandbox})\nexit code: {outcome.code}\n"
            + (f"config:\n{config_text}\n" if config_text is not None else "")
            + f"output:\n{shown}")


def check_command(v: Violations, sandbox: Path, outcome: Outcome, before: dict[Path, str],
                  before_folders: dict[Path, dict[str, str] | None], *, fault: bool,
                  kind: str, expected_out: Path | None, junit: Path | None,
                  planted: set[Path], config_text: str | None,
                  allow_signal_exit: bool = False, before_dirs: set[Path] | None = None,
                  target: Path | None = None) -> None:
    context = describe(sandbox, outcome, config_text)
    # 1. no traceback
    v.check(TRACEBACK not in outcome.text, "a Python traceback was printed", context)
    # 2. exit codes
    v.check(outcome.code in ALLOWED_EXITS, f"exit code {outcome.code} is not one of "
            f"{sorted(ALLOWED_EXITS)}", context)
    if not allow_signal_exit:
        v.check(outcome.code not in (130, 143), "exit 130/143 without a signal", context)
    v.check(outcome.code != 3 or fault, "exit 3 (internal error) without an injected fault",
            context)
    lines = outcome.text.splitlines()
    if outcome.code == 2:
        errors = [line for line in lines if line.startswith("error:")]
        v.check(len(errors) == 1, f"exit 2 printed {len(errors)} lines starting with "
                "'error:' (expected exactly one)", context)
    if outcome.code == 3:
        errors = [line for line in lines if line.startswith(("error:", "internal error:"))]
        v.check(len(errors) == 1, f"exit 3 printed {len(errors)} error lines (expected one)",
                context)
    # 3. the user's files
    after = snapshot(sandbox)
    folders = manifests(sandbox)
    for path, digest in before.items():
        if junit is not None and path == junit:
            continue  # the file the user asked --junit to write
        was = owner(path, before_folders)
        if was is not None:
            folder, rel = was
            if rel.startswith(f"{STATE}/"):
                continue  # saliencycheck's bookkeeping
            recorded = before_folders[folder]
            if recorded is not None and recorded.get(rel) == digest and path not in planted:
                continue  # saliencycheck's own file, as it wrote it: it may replace it
        now = owner(path, folders)
        listed_after = (now is not None and folders[now[0]] is not None
                        and now[1] in folders[now[0]])
        if listed_after and path not in planted:
            continue  # the brief's rule: listed in the manifest after the command
        v.check(after.get(path) == digest,
                f"the user's file {path.relative_to(sandbox)} was "
                + ("deleted" if path not in after else "changed"), context)
    # ownership.py: "a listed file whose content changed since (a user edited or replaced it)
    # is left in place, with a warning"
    for folder, recorded in before_folders.items():
        for rel, digest in (recorded or {}).items():
            path = folder / rel
            if (path in before and before[path] != digest and path != junit
                    and not rel.startswith(f"{STATE}/")):
                v.check(after.get(path) == before[path],
                        f"{path.relative_to(sandbox)}, which saliencycheck wrote and the user "
                        "then edited, was " + ("deleted" if path not in after else
                                               "overwritten") + " (ownership: it is left in "
                        "place)", context)
    if kind == "validate":
        new = sorted(str(p.relative_to(sandbox)) for p in set(after) - set(before))
        v.check(not new, f"validate wrote files: {new}", context)
    for folder, recorded in folders.items():
        if recorded is None:
            continue
        for path in after:
            if folder not in path.parents or before.get(path) == after[path] or path == junit:
                continue
            rel = path.relative_to(folder).as_posix()
            inner = owner(path, folders)
            if rel.startswith(f"{STATE}/") or (inner is not None and inner[0] != folder):
                continue
            v.check(rel in recorded or path in planted, f"{path.relative_to(sandbox)} was "
                    "written into the output folder but is not recorded in its manifest", context)
    # --junit never replaces saliencycheck's own files (the report, its units, its manifest)
    if junit is not None and junit.is_file():
        inside = owner(junit, {**before_folders, **folders})
        if inside is not None and junit.read_bytes().startswith(b"<?xml") \
                and before.get(junit) != sha256(junit) \
                and inside[1] in own_files(inside[0], before_folders.get(inside[0])):
            v.check(False, f"--junit {junit.relative_to(sandbox)} overwrote saliencycheck's own "
                    f"{inside[1]} with the JUnit XML instead of refusing that path", context)
    # a refused command leaves nothing new inside its output folder unless it made that
    # folder its own (a manifest): a later run would find the folder not empty and refuse it
    if outcome.code == 2 and before_dirs is not None and target is not None \
            and target in before_dirs | (folders_under(sandbox) - before_dirs) \
            and folders.get(target) is None and not (target / STATE / "manifest.json").exists():
        new = sorted((folders_under(sandbox) - before_dirs) | (set(after) - set(before)))
        left = [p for p in new if target in p.parents]
        v.check(not left, f"exit 2 left {left[0].relative_to(sandbox) if left else ''} behind in "
                f"the output folder {target.relative_to(sandbox)}, which saliencycheck does not "
                "own, so the next run there is refused as 'not empty'", context)
    # 4. complete or absent (of what this command wrote: a report the user edited earlier is
    # the user's doing)
    touched = {path for path, digest in after.items() if before.get(path) != digest}
    touched |= set(before) - set(after)
    for folder in sorted(set(folders) | ({expected_out} if expected_out else set())):
        check_report(v, folder, folders.get(folder), context, touched)
    if kind in ("run", "merge") and outcome.code in (0, 1) and expected_out is not None \
            and "--allow-partial" not in outcome.args:  # (a partial merge says complete: false)
        run_json = expected_out / "run.json"
        v.check(run_json.is_file(), f"exit {outcome.code} but {run_json} is missing", context)
        if run_json.is_file():
            with contextlib.suppress(ValueError):
                v.check(json.loads(run_json.read_text()).get("complete") is True,
                        f"exit {outcome.code} but {run_json} is not complete", context)


def own_files(folder: Path, recorded_before: dict[str, str] | None) -> set[str]:
    """Paths (relative to ``folder``) that are saliencycheck's: recorded before the command,
    its bookkeeping, run.json and the report files run.json lists now."""
    names = set(recorded_before or {}) | {"run.json"}
    names |= {p.relative_to(folder).as_posix() for p in (folder / STATE).rglob("*")}
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        names |= set(json.loads((folder / "run.json").read_text())["report_files"])
    return names


def check_report(v: Violations, folder: Path, recorded: dict[str, str] | None,
                 context: str, touched: set[Path]) -> None:
    if not folder.is_dir():
        return
    run_json = folder / "run.json"
    complete = None  # unknown: a run.json saliencycheck did not record, or no manifest
    if run_json.is_file() and recorded is not None and "run.json" in recorded:
        # (a run.json the manifest does not record is the user's, e.g. planted)
        try:
            info = json.loads(run_json.read_text(encoding="utf-8"))
        except ValueError as exc:
            v.check(False, f"{run_json} does not parse: {exc}", context)
            return
        v.check(isinstance(info, dict), f"{run_json} is not a JSON object", context)
        if not isinstance(info, dict):
            return
        fresh = run_json in touched  # written by this command
        v.check(not fresh or recorded.get("run.json") == sha256(run_json),
                f"{run_json} differs from its manifest entry", context)
        for name in info.get("report_files", []):
            path = folder / name
            if not fresh and path not in touched:
                continue  # as before the command (the user may have edited it since)
            v.check(path.is_file(), f"run.json lists {name}, which does not exist", context)
            if path.is_file():
                v.check(name in recorded, f"run.json lists {name}, which the manifest does "
                        "not record", context)
                v.check(recorded.get(name) == sha256(path), f"run.json lists {name}, whose "
                        "SHA-256 differs from the manifest's", context)
        complete = info.get("complete")
        v.check(complete == (info.get("units_done") == info.get("units_total")),
                f"run.json: complete {complete!r} but units_done {info.get('units_done')} "
                f"of {info.get('units_total')}", context)
    if not run_json.exists() or complete is False:
        compared = invoke(["compare", str(folder), str(folder)], folder.parent)
        v.check(compared.code == 2, f"compare on {folder} (run.json absent or incomplete) "
                f"exited {compared.code}, not 2", context + "\ncompare said:\n" + compared.text)
        v.check(TRACEBACK not in compared.text, "compare printed a traceback", compared.text)


def command_line(command: Command, config: Path, sandbox: Path) -> tuple[list[str], Path | None]:
    """The argv of a command, and the --junit file it names (resolved)."""
    junit = None
    if command.kind == "click_usage":
        return [str(config) if a == "CONFIG" else a for a in command.extra], None
    if command.kind in ("compare", "init"):
        return [command.kind, *command.extra], None
    args = [command.kind]
    if command.kind == "merge":
        args += list(command.extra)
    else:
        args.append(str(config))
    for item in command.sets:
        args += ["--set", item]
    if command.kind == "validate":
        return args, None
    if command.output is not None:
        args += ["-o", command.output]
    if command.force:
        args.append("--force")
    if command.kind == "run":
        if command.resume:
            args.append("--resume")
        if command.shard is not None:
            args += ["--shard", command.shard]
    if command.junit is not None:
        args += ["--junit", command.junit]
        junit = (sandbox / command.junit).resolve()
    if command.as_json:
        args.append("--json")
    return args, junit


def expected_output(command: Command, config: dict[str, Any] | None, config_path: Path,
                    sandbox: Path, *, shards_too: bool = False) -> Path | None:
    """Where a run or merge that succeeded wrote its report (None: cannot tell);
    ``shards_too``: a shard's output folder as well."""
    if command.kind == "merge":
        if command.output:
            return (sandbox / command.output).resolve()
        return (sandbox / command.extra[0]).resolve()
    if command.kind != "run" or (command.shard is not None and not shards_too):
        return None
    if command.output is not None:
        return (sandbox / command.output).resolve() if command.output.strip() else None
    value: Any = None
    if isinstance(config, dict):
        output = config.get("output", {})
        value = output.get("dir", "runs/latest") if isinstance(output, dict) else None
        if "output" not in config:
            value = "runs/latest"
    for item in command.sets:
        key, _, raw = item.partition("=")
        if key.strip() == "output.dir":
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                return None
    if not isinstance(value, str) or not value:
        return None
    return (config_path.parent / value).resolve()


def do_action(action: str | None, sandbox: Path, images: list[ImageSpec]) -> set[Path]:
    """What the user does between two commands; returns the files they planted."""
    out = sandbox / "out"
    planted: set[Path] = set()
    if action == "plant":
        for name in ("figures/mine.pdf", "notes.txt"):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(b"the user's own file: " + name.encode())
            planted.add(out / name)
    elif action == "plant_in_units" and (out / "units").is_dir():
        (out / "units" / "mine.json").write_text('{"mine": true}')
        planted.add(out / "units" / "mine.json")
    elif action == "edit_owned":
        for name in ("report.csv", "summary.csv"):
            if (out / name).is_file():
                with (out / name).open("a") as fh:
                    fh.write("edited by the user\n")
    elif action == "corrupt_manifest" and (out / STATE / "manifest.json").is_file():
        (out / STATE / "manifest.json").write_text("{")
    elif action == "delete_manifest":
        (out / STATE / "manifest.json").unlink(missing_ok=True)
    elif action == "change_image":
        for spec in images:
            if spec.kind == "rgb":
                write_image_again(sandbox / "images" / spec.path, spec)
                break
    elif action == "delete_run_json":
        (out / "run.json").unlink(missing_ok=True)
    elif action == "truncate_unit" and (out / "units").is_dir():
        units = sorted((out / "units").glob("unit-*.json"))
        if units:
            units[0].write_text(units[0].read_text()[:20])
    return planted


def write_image_again(path: Path, spec: ImageSpec) -> None:
    path.unlink()
    write_image(path, ImageSpec(spec.path, spec.kind, spec.height, spec.width, spec.seed + 1))


def build_sandbox(root: Path, scenario: Scenario) -> tuple[Path, str, set[Path]]:
    """Images, the user's files, the config; returns the config's path, its text and the
    files the user planted."""
    for spec in scenario.images:
        write_image(root / "images" / spec.path, spec)
    (root / "mine.txt").write_text("the user's notes, next to the output folder\n")
    listed = [f"images/{spec.path}" for spec in scenario.images] + ["images/missing.png"]
    (root / "list.txt").write_text("# images\n" + "\n".join(listed) + "\n")
    (root / "labels.csv").write_text("image,label\n" + "".join(
        f"{spec.path},{i % 10}\n" for i, spec in enumerate(scenario.images)))
    planted = {root / "mine.txt"}
    for name in scenario.planted:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"the user's {name}\n" if name != "out/.gitkeep" else "")
        planted.add(path)
    (root / "existing").mkdir(exist_ok=True)
    (root / "existing" / "keep.txt").write_text("the user's file in an existing folder\n")
    planted.add(root / "existing" / "keep.txt")
    config = root / scenario.config_name
    text = render(scenario.config, scenario.damage)
    config.write_bytes(text)
    return config, text.decode("utf-8", "replace"), planted


@contextlib.contextmanager
def one_thread():
    """Torch on one thread: on 2 shared cores its default pool mostly waits on itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


COLLECTED: list[str] = []  # every promise broken in this session (collect mode)


def finish(v: Violations) -> None:
    COLLECTED.extend(v.found)


@pytest.fixture(scope="module", autouse=True)
def _collected_fail_at_the_end():  # noqa: ANN202
    """Collect mode: the examples ran on past broken promises; fail once at the end."""
    yield
    if COLLECTED:
        pytest.fail(f"{len(COLLECTED)} promise(s) broken (all in {COLLECT}); first:\n"
                    + COLLECTED[0])


def log_command(outcome: Outcome) -> None:
    """SALIENCYCHECK_FUZZ_LOG=<file>: one line per command (exit code, argv, error line)."""
    if LOG:
        said = next((line for line in outcome.text.splitlines()
                     if line.startswith(("error:", "internal error:"))), "")
        with open(LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"code": outcome.code, "args": outcome.args,
                                 "error": said}, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# The tests.
# ---------------------------------------------------------------------------------------------

def maybe_seed(test):  # noqa: ANN001, ANN201
    return seed(SEED)(test) if SEED else test


def run_scenario(scenario: Scenario, *, note: bool = True) -> None:
    """Build the scenario's sandbox, run its steps, check every promise after each."""
    v = Violations()
    with tempfile.TemporaryDirectory(prefix="scfuzz-") as tmp, one_thread():
        sandbox = Path(tmp).resolve()
        config_path, config_text, planted = build_sandbox(sandbox, scenario)
        config_dict = scenario.config if scenario.damage in (None, "bom") else None
        for step in scenario.steps:
            planted |= do_action(step.action, sandbox, scenario.images)
            args, junit = command_line(step.command, config_path, sandbox)
            before, before_folders = snapshot(sandbox), manifests(sandbox)
            before_dirs = folders_under(sandbox)
            outcome = invoke(args, sandbox)
            if note:
                event(f"{step.command.kind} exit {outcome.code}")
            log_command(outcome)
            check_command(v, sandbox, outcome, before, before_folders, fault=scenario.fault,
                          kind=step.command.kind,
                          expected_out=expected_output(step.command, config_dict, config_path,
                                                       sandbox),
                          junit=junit, planted=planted, config_text=config_text,
                          before_dirs=before_dirs,
                          target=expected_output(step.command, config_dict, config_path,
                                                 sandbox, shards_too=True))
    finish(v)


@maybe_seed
@settings(FUZZ, max_examples=EXAMPLES)
@given(scenario=scenarios())
def test_fuzzed_commands_keep_their_promises(scenario: Scenario) -> None:
    run_scenario(scenario)


# Pinned scenarios: what the fuzzer found (each a minimal reproduction, kept as a regression
# check), and plain sessions that must pass (the harness's own sanity).
PINNED_CONFIG: dict[str, Any] = {
    "model": {"factory": "tests.test_cli:tiny_cnn", "num_classes": 10},
    "images": {"path": "images", "size": 16}, "methods": ["gradient"],
    "tests": {"cascading": {"enabled": True}}, "metrics": ["ssim"],
    "baselines": {"random_floor": False, "edges": False},
    "runtime": {"device": "cpu", "bootstrap": 100, "batch_size": 1},
    "output": {"dir": "out", "figures": False},
}
PINNED_IMAGES = [ImageSpec("a.png", "rgb", 20, 24, 0), ImageSpec("sub/a.png", "rgb", 24, 20, 1),
                 ImageSpec("broken.png", "truncated", 20, 20, 2)]


def pinned(*steps: Step, planted: tuple[str, ...] = ()) -> Scenario:
    return Scenario(wild=False, images=PINNED_IMAGES, config=PINNED_CONFIG, mutations=[],
                    damage=None, config_name="config.yaml", planted=list(planted),
                    steps=list(steps))


PINNED = {
    # sanity: these keep every promise today
    "run_then_rerun_with_user_files": pinned(
        Step(None, Command("run", force=True, junit="out/junit.xml", as_json=True)),
        Step("plant", Command("run")), Step("delete_run_json", Command("run", resume=True)),
        planted=("out/notes.txt", "out/figures/mine.pdf")),
    "shards_then_merge": pinned(Step(None, Command("run", shard="0/2")),
                                Step(None, Command("merge", extra=("out",))),
                                Step(None, Command("run", shard="1/2")),
                                Step(None, Command("merge", extra=("out",)))),
    "refusals": pinned(Step(None, Command("run")), Step(None, Command("run", output="mine.txt")),
                       Step("change_image", Command("run", resume=True)),
                       Step("corrupt_manifest", Command("run", force=True))),
    # found (fixed): click's own usage errors print a box, no 'error:' line
    "bug_click_usage_error_has_no_error_line": pinned(
        Step(None, Command("click_usage", extra=("run", "CONFIG", "--bogus")))),
    # found (fixed): --junit into the output folder replaces a report file with the JUnit XML
    "bug_junit_overwrites_report_csv": pinned(Step(None, Command("run", junit="out/report.csv"))),
    # found (fixed): --junit onto the manifest: the run ends with exit 2 and a corrupt manifest
    "bug_junit_overwrites_manifest": pinned(
        Step(None, Command("run")),
        Step(None, Command("run", junit="out/.saliencycheck/manifest.json"))),
    # found (fixed): --junit in a sub-folder of a new output folder: the folder is made before it is
    # claimed, so the run refuses its own output folder (and every later run does too)
    "bug_junit_subfolder_blocks_new_output_folder": pinned(
        Step(None, Command("run", junit="out/reports/junit.xml"))),
    # found (fixed): a report file the user edited is "kept" (warning) and then overwritten
    "bug_user_edited_report_overwritten": pinned(Step(None, Command("run")),
                                                  Step("edit_owned", Command("run"))),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_scenarios_keep_their_promises(name: str) -> None:
    run_scenario(PINNED[name], note=False)


def test_sigterm_while_run_loads_its_modules_exits_143(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    """SIGTERM while `run` imports the runner (torch: the first seconds of every run) must
    exit 143 like any other SIGTERM, not 130. Simulated deterministically: the CLI's own
    SIGTERM handler (``cli._terminate``) fires while ``run`` imports ``runner.shards``."""

    class Terminating(type(sys)):
        def __getattr__(self, name: str) -> Any:
            cli._terminate(signal.SIGTERM, None)

    monkeypatch.setitem(sys.modules, "saliencycheck.runner.shards",
                        Terminating("saliencycheck.runner.shards"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(PINNED_CONFIG))
    outcome = invoke(["run", str(tmp_path / "config.yaml")], tmp_path)
    assert TRACEBACK not in outcome.text, outcome.text
    assert outcome.code == 143, f"exit {outcome.code} after SIGTERM (expected 143)\n{outcome.text}"


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_interrupt_while_the_report_is_written_then_resume_finishes(
        monkeypatch: pytest.MonkeyPatch, stop: str) -> None:
    """The signal test's finding, made deterministic: SIGINT/SIGTERM after the last unit,
    while write_outputs writes the report (here: right after report.csv), must leave the
    folder complete-or-absent and resumable: `run --resume` then exits 0 with a complete
    report (the CLI itself says so: '--resume finishes the run and writes it')."""
    from saliencycheck.errors import Terminated
    from saliencycheck.runner import run as run_module

    calls = [0]
    original = run_module.write_summary

    def interrupted_once(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:  # the signal arrives here: report.csv is written, the rest not
            raise Terminated() if stop == "SIGTERM" else KeyboardInterrupt()
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "write_summary", interrupted_once)
    scenario = pinned(Step(None, Command("run")))
    v = Violations()
    with tempfile.TemporaryDirectory(prefix="scfuzz-") as tmp, one_thread():
        sandbox = Path(tmp).resolve()
        config, text, planted = build_sandbox(sandbox, scenario)
        for args, allow_signal in ((["run", str(config)], True),
                                   (["run", str(config), "--resume"], False)):
            before, before_folders = snapshot(sandbox), manifests(sandbox)
            outcome = invoke(args, sandbox)
            check_command(v, sandbox, outcome, before, before_folders, fault=False, kind="run",
                          expected_out=sandbox / "out", junit=None, planted=planted,
                          config_text=text, allow_signal_exit=allow_signal)
            if allow_signal:
                v.check(outcome.code == (143 if stop == "SIGTERM" else 130),
                        f"exit {outcome.code} after {stop}", describe(sandbox, outcome, text))
            else:
                v.check(outcome.code == 0, f"run --resume after {stop} while the report was "
                        f"written exited {outcome.code}", describe(sandbox, outcome, text))
    finish(v)


SIGNAL_CONFIG = {
    "model": {"factory": "tests.test_batch:slow_cnn", "num_classes": 10},
    "images": {"path": "images", "size": 24, "mean": [0.5] * 3, "std": [0.5] * 3},
    "metrics": ["spearman_abs", "ssim"],
    "baselines": {"edges": False, "random_floor": False},
    "runtime": {"device": "cpu", "batch_size": 1, "bootstrap": 100},
    "output": {"dir": "out", "figure_images": 1},
}


@dataclass(frozen=True)
class SignalScenario:
    images: int
    corrupt: bool
    methods: tuple[str, ...]
    random_logit: bool
    figures: bool
    signum: int
    # when the signal goes: "startup" (delay s after the process starts, maybe while Python
    # imports), "claimed" (delay/8 s after the run took the output folder's lock), "first_unit"
    # (delay/40 s after the first unit is stored), "late" (delay/2 s after it)
    trigger: str
    delay: float
    earlier_run: bool  # a complete in-process run in the folder first
    planted: bool  # the user's files inside the output folder (then --force)


@st.composite
def signal_scenarios(draw: st.DrawFn) -> SignalScenario:
    return SignalScenario(
        images=draw(st.integers(2, 4)), corrupt=draw(st.booleans()),
        methods=tuple(draw(st.lists(st.sampled_from(["gradient", "guided_backprop",
                                                      "gradient_x_input"]),
                                    min_size=1, max_size=2, unique=True))),
        random_logit=draw(st.booleans()), figures=draw(st.booleans()),
        signum=draw(st.sampled_from([signal.SIGINT, signal.SIGTERM])),
        trigger=draw(st.sampled_from(["startup", "claimed", "first_unit", "first_unit",
                                      "late"])),
        delay=draw(st.floats(0.0, 8.0)), earlier_run=draw(st.integers(0, 3)) == 0,
        planted=draw(st.booleans()))


def wait_for_trigger(process: subprocess.Popen, scenario: SignalScenario, out: Path,
                     started: float) -> None:
    """Return when the scenario's signal is due (or the process ended, or 120 s passed)."""
    holder = f"{STATE}/holder-*-{process.pid}.json"
    spawned = time.time() - (time.monotonic() - started)

    def new_unit() -> bool:  # a unit this process stored (not one of an earlier run)
        for path in (out / "units").glob("unit-*.json"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime >= spawned:
                    return True
        return False

    pause = {"startup": 0.0, "claimed": scenario.delay / 8, "first_unit": scenario.delay / 40,
             "late": scenario.delay / 2}[scenario.trigger]
    while process.poll() is None and time.monotonic() - started < 120:
        if scenario.trigger == "startup":
            if time.monotonic() - started >= scenario.delay:
                return
        elif scenario.trigger == "claimed":
            if any(out.glob(holder)):
                break
        elif new_unit():
            break
        time.sleep(0.005)
    deadline = time.monotonic() + pause
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


@maybe_seed
@settings(FUZZ, max_examples=SIGNAL_EXAMPLES)
@given(scenario=signal_scenarios())
def test_signals_leave_a_report_that_is_complete_or_absent(scenario: SignalScenario) -> None:
    v = Violations()
    with tempfile.TemporaryDirectory(prefix="scfuzz-signal-") as tmp, one_thread():
        sandbox = Path(tmp).resolve()
        rng = np.random.default_rng(scenario.images)
        (sandbox / "images").mkdir()
        for i in range(scenario.images):
            Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(
                sandbox / "images" / f"img {i}.png")
        if scenario.corrupt:
            (sandbox / "images" / "broken.png").write_bytes(b"\x89PNG not really")
        config = json.loads(json.dumps(SIGNAL_CONFIG))
        config["methods"] = list(scenario.methods)
        config["tests"] = {"cascading": {"enabled": True},
                           "random_logit": {"enabled": scenario.random_logit}}
        config["output"]["figures"] = scenario.figures
        config_path = sandbox / "config.yaml"
        config_text = yaml.safe_dump(config)
        config_path.write_text(config_text)
        (sandbox / "mine.txt").write_text("the user's notes\n")
        planted = {sandbox / "mine.txt"}
        out = sandbox / "out"
        if scenario.earlier_run:
            earlier = invoke(["run", str(config_path)], sandbox)
            v.check(earlier.code == 0, "the uninterrupted run failed",
                    describe(sandbox, earlier, config_text))
        if scenario.planted:
            for name in ("notes.txt", "figures/mine.pdf"):
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_text(f"the user's {name}\n")
                planted.add(out / name)
        args = ["run", str(config_path), *(["--force"] if scenario.planted else [])]
        before, before_folders = snapshot(sandbox), manifests(sandbox)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        for name in CLEAN_ENV:
            env.pop(name, None)
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "saliencycheck", *args], cwd=ROOT,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for_trigger(process, scenario, out, started)
            if process.poll() is None:
                process.send_signal(scenario.signum)
            stdout, stderr = process.communicate(timeout=180)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        code = process.returncode
        # a process the signal killed before Python's handlers were set: the shell's 128+N
        outcome = Outcome(["run", *args[1:]], 128 - code if code < 0 else code,
                          stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"))
        log_command(Outcome([*outcome.args, f"[{signal.Signals(scenario.signum).name} "
                             f"{scenario.trigger} {scenario.delay:.2f}]"], outcome.code,
                            outcome.stdout, outcome.stderr))
        event(f"{signal.Signals(scenario.signum).name} exit {outcome.code}")
        context = describe(sandbox, outcome, config_text) + (
            f"\nsignal {signal.Signals(scenario.signum).name} ({scenario.trigger}, "
            f"delay {scenario.delay:.2f} s)")
        v.check(outcome.code in (0, 128 + scenario.signum),
                f"exit {outcome.code} after {signal.Signals(scenario.signum).name} "
                f"(expected {128 + scenario.signum}, or 0 if it finished first)", context)
        check_command(v, sandbox, outcome, before, before_folders, fault=False, kind="run",
                      expected_out=out if outcome.code == 0 else None, junit=None,
                      planted=planted, config_text=config_text, allow_signal_exit=True)
        run_json = out / "run.json"
        info = None
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(run_json.read_text()) if outcome.code != 0 else None
        if isinstance(info, dict):
            v.check(info.get("complete") is True or info.get("interrupted_by") is not None,
                    "an interrupted run left a run.json that is neither complete nor marked "
                    "interrupted", context)
        # --resume finishes the run
        before, before_folders = snapshot(sandbox), manifests(sandbox)
        resumed = invoke(["run", str(config_path), "--resume",
                          *(["--force"] if scenario.planted else [])], sandbox)
        check_command(v, sandbox, resumed, before, before_folders, fault=False, kind="run",
                      expected_out=out, junit=None, planted=planted, config_text=config_text)
        v.check(resumed.code == 0, "run --resume after the signal did not exit 0",
                describe(sandbox, resumed, config_text) + "\nthe interrupted run:\n" + context)
    finish(v)
