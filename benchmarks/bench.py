"""Benchmark saliencycheck against Quantus MPRT and against bare compute, on the same work.

    python benchmarks/bench.py --workload all            # what `make bench` runs
    python benchmarks/bench.py --workload a --repeat 3
    python benchmarks/bench.py --quick                    # smoke run, writes nothing

Four contenders per workload and granularity, all on the same model object (same weights),
images, targets, methods, stage list and metrics (see benchmarks/README.md):

1. saliencycheck: ``saliencycheck.check`` on the model in memory (plan, maps, scores, CSV
   reports; figures off), as a notebook user calls it;
2. Quantus MPRT with Captum methods, one MPRT call per method, both metrics in the call;
3. naive bare compute: each method's own passes, full forward every time (benchmarks/naive.py);
4. minimal bare compute: the executor's shared, prefix-cached passes for the trained model and
   every stage (``UnitExecutor.group_maps``), no metrics, no I/O.

Each contender is warmed up once (trained model and the first stage) before timing; times are
wall-clock (``time.perf_counter``, CUDA synchronised), the minimum over ``--repeat`` runs is
reported next to every run's time. Writes benchmarks/results.md (not with --quick).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import importlib.metadata as md
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # `benchmarks.models:...` factories and this package's modules
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import saliencycheck as sc  # noqa: E402
from benchmarks.memory import gpu_busy  # noqa: E402
from benchmarks.memory import measure as measure_memory  # noqa: E402
from benchmarks.memory import table as memory_table  # noqa: E402
from benchmarks.naive import naive_maps  # noqa: E402
from benchmarks.workloads import (  # noqa: E402
    Workload,
    prepare_images,
    workload_a,
    workload_b,
    workload_c,
)
from saliencycheck.api import prepared  # noqa: E402
from saliencycheck.data import load_images  # noqa: E402
from saliencycheck.engine.host_memory import reused_host_memory  # noqa: E402
from saliencycheck.methods import compute_maps  # noqa: E402
from saliencycheck.metrics import spearman  # noqa: E402
from saliencycheck.randomization import RandomizedModels  # noqa: E402
from saliencycheck.runner import RunSetup  # noqa: E402
from saliencycheck.runner.executor import UnitExecutor  # noqa: E402

try:
    from benchmarks import quantus_driver as qd  # noqa: E402
    QUANTUS_ERROR = ""
except Exception as exc:  # noqa: BLE001 - any import failure means "Quantus not available"
    qd = None
    QUANTUS_ERROR = f"{type(exc).__name__}: {exc}"

CONTENDERS = ("saliencycheck", "quantus", "naive", "minimal")
TARGETS_A = {"quantus": 1 / 1.5, "naive": 0.8, "minimal": 1.1}  # saliencycheck / contender
TARGETS_GPU = {"quantus": 1 / 5, "minimal": 1.2}  # workload (b) on a GPU, and:
TARGET_BUSY = 0.85  # the share of saliencycheck's run the GPU spends in kernels


# ------------------------------------------------------------------------------------------
# timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat), or None."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """Wall seconds of ``fn()`` and the CPU cores other processes kept busy meanwhile (mean)."""
    synchronize(device)
    busy, own = _busy_cpu_seconds(), _own_cpu_seconds()
    start = time.perf_counter()
    fn()
    synchronize(device)
    wall = time.perf_counter() - start
    busy_end = _busy_cpu_seconds()
    others = None
    if busy is not None and busy_end is not None:
        others = max(0.0, (busy_end - busy) - (_own_cpu_seconds() - own)) / wall
    return wall, others


# ------------------------------------------------------------------------------------------
# one workload × granularity


def input_batch(setup) -> torch.Tensor:
    """The run's images as saliencycheck preprocesses them, (N, C, S, S), in setup order."""
    records, skipped = load_images(setup.images, setup.preprocessing)
    if skipped:
        raise RuntimeError(f"unreadable benchmark images: {skipped}")
    return torch.stack([r.tensor for r in records])


@dataclasses.dataclass
class CaseResult:
    workload: Workload
    granularity: str
    device: str
    stages: int
    prepare_s: float
    times: dict[str, list[float]]  # contender -> one wall time per repeat
    others: dict[str, list[float | None]]  # contender -> cores used by other processes, per run
    quantus_method_times: dict[str, list[float]]
    quantus_layers: int | None
    quantus_note: str
    quantus_same_order: bool | None = None
    agreement: dict | None = None
    sc_timings: dict | None = None
    gpu_busy: dict[str, float] = dataclasses.field(default_factory=dict)  # contender -> share

    def best(self, contender: str) -> float | None:
        values = self.times.get(contender)
        return min(values) if values else None

    def ratio(self, contender: str) -> float | None:
        sc, other = self.best("saliencycheck"), self.best(contender)
        return sc / other if sc and other else None


def run_case(workload: Workload, granularity: str, device: torch.device, *, repeat: int,
             agreement: bool, reuse_host_memory: bool, log: Callable[[str], None]
             ) -> CaseResult:
    with tempfile.TemporaryDirectory(prefix="scbench_") as tmp_name:
        tmp = Path(tmp_name)
        images_path = prepare_images(workload, tmp / "images")
        model = workload.build_model()
        limit_all = workload.stage_limit

        def arguments(limit: int | None) -> dict:
            """``check``'s arguments, the cascade cut to its first ``limit`` stages (top-down:
            the blocks nearest the logits)."""
            blocks = [stage.name for stage in all_stages[:limit]] if limit else None
            return workload.check_arguments(granularity=granularity, device=str(device),
                                             reuse_host_memory=reuse_host_memory, blocks=blocks)

        def plan(limit: int | None) -> RunSetup:
            with prepared(model, images_path, **arguments(limit)) as (setup, _):
                return setup

        all_stages: list = []
        start = time.perf_counter()
        setup = plan(None)
        prepare_s = time.perf_counter() - start
        all_stages = setup.stages["cascading"]
        setups = {1: plan(1), None: plan(limit_all) if limit_all else setup}
        setup = setups[None]
        stages = setup.stages["cascading"]
        tests = setup.config.tests
        seed = setup.config.runtime.seed
        chunk = setup.context.chunk_size
        mean, std = setup.preprocessing.mean, setup.preprocessing.std
        inputs = input_batch(setup).to(device)
        with torch.no_grad():
            targets_fixed = setup.model(inputs).argmax(dim=1)
        log(f"[{workload.key}/{granularity}] {len(setup.images)} images, {len(stages)} stages, "
            f"methods {[m.label for m in setup.methods]}, prepare {prepare_s:.1f} s")

        def stage_iter(models: RandomizedModels, limit: int | None = None):
            return models.stage_models(stages[:limit] if limit else stages, init=tests.init,
                                       std=tests.init_std,
                                       reset_running_stats=tests.reset_running_stats, seed=seed)

        def targets_of(model: torch.nn.Module) -> torch.Tensor:
            with torch.no_grad():
                return model(inputs).argmax(dim=1)

        def run_minimal(limit: int | None = None) -> None:
            executor = UnitExecutor(setups[limit])
            targets = targets_of(setup.model)
            trace = executor.prefix_trace(inputs[:1])
            for group in executor.groups(inputs, targets):
                executor.group_maps(inputs[group], [targets[group]] * (1 + len(executor.pass_refs)),
                                    trace, progress=lambda done: None)

        # as a user's model comes: parameters require grad (the plan's copy is frozen)
        naive_model = copy.deepcopy(setup.model).requires_grad_(True)

        def run_naive(limit: int | None = None) -> None:
            targets = targets_of(naive_model)
            options = {"mean": mean, "std": std, "seed": seed, "chunk_size": chunk}
            naive_maps(setup.methods, naive_model, inputs, targets, **options)
            for _, stage_model in stage_iter(RandomizedModels(naive_model), limit):
                stage_model.requires_grad_(True)
                naive_maps(setup.methods, stage_model, inputs, targets, **options)

        sc_timings: dict = {}

        def run_saliencycheck(limit: int | None = None) -> None:
            result = sc.check(model, images_path, output=tmp / ("warmup" if limit else "run"),
                              **arguments(limit or limit_all))
            if not limit:
                sc_timings.update(result.run.timings, summary=result.run.summary)

        # --- Quantus: same work only where its module-by-module randomization is our layers
        quantus_note, quantus_methods, q_layers, same_order = "", [], None, None
        x_np, y_np = inputs.detach().cpu().numpy(), targets_fixed.cpu().numpy()
        if qd is None:
            quantus_note = f"Quantus not importable ({QUANTUS_ERROR})"
        else:
            q_names = qd.quantus_layers(setup.model)
            q_layers = len(q_names)
            if granularity == "layer":
                same_order = q_names == [s.name for s in all_stages]
            if granularity != "layer":
                quantus_note = ("n/a: Quantus randomizes module by module only "
                                f"({q_layers} modules); '{granularity}' granularity cannot be "
                                "expressed")
            else:
                quantus_methods = qd.quantus_methods(setup.methods, mean=mean, std=std,
                                                     size=workload.size, chunk_size=chunk)
                if workload.stage_limit:
                    quantus_note = (f"every contender ran the first {len(stages)} stages "
                                    f"(Quantus: its first {len(stages)} of {q_layers} layers, "
                                    "its layer generator cut there)")
        if q_layers is not None:
            log(f"  Quantus randomizes {q_layers} modules"
                + ("" if same_order is None else
                   f"; same modules and order as saliencycheck's {len(all_stages)} stages: "
                   f"{same_order}") + (f"; {quantus_note}" if quantus_note else ""))
        quantus_scores: dict[str, dict] = {}
        q_method_times: dict[str, list[float]] = {m.label: [] for m in quantus_methods}
        with_ssim = "ssim" in workload.metrics

        def run_quantus() -> None:
            for qm in quantus_methods:
                synchronize(device)
                method_start = time.perf_counter()
                scores = qd.run_mprt(setup.model, x_np, y_np, qm, device=str(device),
                                     batch_size=workload.batch_size, with_ssim=with_ssim,
                                     layers=len(stages) if workload.stage_limit else None)
                synchronize(device)
                q_method_times[qm.label].append(time.perf_counter() - method_start)
                quantus_scores[qm.label] = scores

        def warm_quantus() -> None:
            for qm in quantus_methods:
                qm.explain_func(model=copy.deepcopy(setup.model), inputs=x_np, targets=y_np,
                                device=str(device), **qm.kwargs)

        runners = {"saliencycheck": run_saliencycheck, "naive": run_naive,
                   "minimal": run_minimal}
        if quantus_methods:
            runners["quantus"] = run_quantus
        order = [c for c in CONTENDERS if c in runners]

        times: dict[str, list[float]] = {name: [] for name in order}
        others: dict[str, list[float | None]] = {name: [] for name in order}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Quantus/Captum chatter must not be timed or shown
            # --- warm-up: trained model + the first stage, each contender once
            for name in order:
                start = time.perf_counter()
                if name == "quantus":
                    warm_quantus()
                else:
                    runners[name](1)
                log(f"  warm-up {name}: {time.perf_counter() - start:.1f} s")
            for r in range(repeat):
                for name in order:
                    seconds, busy = timed(runners[name], device)
                    times[name].append(seconds)
                    others[name].append(busy)
                    extra = ""
                    if name == "quantus":
                        extra = " (" + ", ".join(f"{k} {v[-1]:.1f} s"
                                                 for k, v in q_method_times.items()) + ")"
                    log(f"  run {r + 1}/{repeat} {name}: {seconds:.2f} s{extra}; other "
                        f"processes kept {fmt(busy)} cores busy")

        result = CaseResult(
            workload=workload, granularity=granularity, device=str(device), stages=len(stages),
            prepare_s=prepare_s, times=times, others=others, quantus_method_times=q_method_times,
            quantus_layers=q_layers, quantus_note=quantus_note, quantus_same_order=same_order,
            sc_timings={k: v for k, v in sc_timings.items() if k != "summary"})
        if device.type == "cuda":  # one more run of each, under the profiler
            for name in ("saliencycheck", "minimal"):
                result.gpu_busy[name] = gpu_busy(runners[name], device)
            log("  GPU busy: " + ", ".join(f"{k} {v:.0%}" for k, v in result.gpu_busy.items()))
        if agreement:
            warnings.filterwarnings("ignore", module="captum")
            start = time.perf_counter()
            result.agreement = check_agreement(
                setup, inputs, targets_fixed, x_np, y_np, quantus_methods, quantus_scores,
                stages, sc_timings.get("summary", []), device,
                run_naive_maps=lambda model, t: naive_maps(
                    setup.methods, copy.deepcopy(model).requires_grad_(True), inputs, t,
                    mean=mean, std=std, seed=seed, chunk_size=chunk))
            log(f"  agreement check: {time.perf_counter() - start:.1f} s")
        return result


# ------------------------------------------------------------------------------------------
# agreement


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
    return float((a - b).abs().max()) / scale


def check_agreement(setup, inputs, targets, x_np, y_np, quantus_methods, quantus_scores,
                    stages, summary, device, run_naive_maps) -> dict:
    """What can be compared, compared: maps on the trained model, then per-layer Spearman.

    1. contenders 3 and 4 compute the same maps (naive vs compute_maps on the trained model);
    2. saliencycheck's trained-model maps vs the Captum maps Quantus explains, both reduced as
       Quantus reduces (Σ_c|g| for Saliency, |Σ_c a| otherwise);
    3. Quantus's per-layer Spearman vs saliencycheck's Spearman (``saliencycheck.metrics``) on
       the same Quantus-randomized models (replayed: same modules, order and seed), with maps
       from saliencycheck's methods reduced the Quantus way;
    4. for context, both tools' mean scores along their own randomizations (different
       initialisations and normalisations: not expected to be equal).
    """
    out: dict = {"naive_vs_minimal": {}, "trained_maps": {}, "per_layer": {}, "side_by_side": {}}
    sc_trained = compute_maps(setup.methods, setup.model, inputs, targets, setup.context)
    naive_trained = run_naive_maps(setup.model, targets)
    for label, maps in sc_trained.items():
        out["naive_vs_minimal"][label] = _rel_diff(maps.detach().cpu(),
                                                   naive_trained[label].detach().cpu())
    if not quantus_methods:
        return out
    by_label = {m.label: m for m in setup.methods}
    for qm in quantus_methods:
        q = torch.from_numpy(np.asarray(qm.explain_func(
            model=copy.deepcopy(setup.model), inputs=x_np, targets=y_np, device=str(device),
            **qm.kwargs)))[:, 0].double()
        ours = qd.quantus_style(sc_trained[qm.label].detach().cpu(),
                                by_label[qm.label].name).double()
        q_view = q.abs() if by_label[qm.label].name != "gradient" else q
        rho = spearman(ours, q_view).values
        out["trained_maps"][qm.label] = {"max_rel_diff": _rel_diff(ours, q_view),
                                         "min_spearman": float(rho.min())}

    reference = {label: qd.quantus_style(m.detach(), by_label[label].name)
                 for label, m in sc_trained.items()}
    deltas: dict[str, list[float]] = {m.label: [] for m in quantus_methods}
    nan_mismatch: dict[str, int] = {m.label: 0 for m in quantus_methods}
    layers = 0
    for name, model in qd.replay_quantus_models(copy.deepcopy(setup.model), str(device)):
        if quantus_methods and name not in quantus_scores[quantus_methods[0].label]:
            break  # Quantus's layer generator was cut there (stage_limit)
        layers += 1
        maps = compute_maps(setup.methods, model, inputs, targets, setup.context)
        for qm in quantus_methods:
            ours = spearman(reference[qm.label],
                            qd.quantus_style(maps[qm.label].detach(),
                                             by_label[qm.label].name)).values.cpu().numpy()
            theirs = np.asarray(quantus_scores[qm.label][name], dtype=float)
            both = np.isfinite(ours) & np.isfinite(theirs)
            nan_mismatch[qm.label] += int((np.isfinite(ours) != np.isfinite(theirs)).sum())
            deltas[qm.label].extend(np.abs(ours[both] - theirs[both]).tolist())
    for label, values in deltas.items():
        out["per_layer"][label] = {
            "layers": layers, "pairs": len(values),
            "max_abs_diff": max(values) if values else float("nan"),
            "mean_abs_diff": float(np.mean(values)) if values else float("nan"),
            "nan_mismatch": nan_mismatch[label]}

    # side by side along each tool's own randomization (spearman_abs of saliencycheck)
    sc_means = {(row.method, row.stage_index): row.mean for row in summary
                if row.metric == "spearman_abs" and row.test == "cascading"}
    for qm in quantus_methods:
        layer_names = [k for k in quantus_scores[qm.label] if k != "original"]
        rows = []
        picks = sorted({0, 1, 2, 5, 10, 20, 30, len(stages)} & set(range(len(stages) + 1)))
        for index in picks:
            sc_name = "trained" if index == 0 else stages[index - 1].name
            q_name = "original" if index == 0 else (
                layer_names[index - 1] if index - 1 < len(layer_names) else "")
            q_mean = float(np.nanmean(quantus_scores[qm.label][q_name])) if q_name else None
            rows.append({"stage": index, "saliencycheck_stage": sc_name,
                         "saliencycheck_spearman_abs": sc_means.get((qm.label, index)),
                         "quantus_layer": q_name, "quantus_spearman": q_mean})
        out["side_by_side"][qm.label] = rows
    return out


# ------------------------------------------------------------------------------------------
# environment and report


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--porcelain", "--", "saliencycheck")
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": {n: _version(n) for n in ("saliencycheck", "torch", "torchvision",
                                              "captum", "quantus", "numpy", "scipy",
                                              "scikit-image")},
        "git": git("rev-parse", "--short", "HEAD"),
        "git_dirty": len(dirty.splitlines()) if dirty else 0,
        "load_start": os.getloadavg(),
    }


def fmt(value: float | None, spec: str = ".2f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def summary_table(results: list[CaseResult]) -> list[str]:
    head = ("| workload | granularity | stages | saliencycheck s | Quantus s | naive s | "
            "minimal s | sc/Quantus | sc/naive | sc/minimal | GPU busy (sc, minimal) |")
    lines = [head, "|" + "---|" * 11]
    for r in results:
        busy = ", ".join(f"{r.gpu_busy[k]:.0%}" for k in ("saliencycheck", "minimal")
                         if k in r.gpu_busy) or "n/a"
        lines.append(
            f"| {r.workload.key} | {r.granularity} | {r.stages} | "
            f"{fmt(r.best('saliencycheck'))} | {fmt(r.best('quantus'))} | "
            f"{fmt(r.best('naive'))} | {fmt(r.best('minimal'))} | {fmt(r.ratio('quantus'))} | "
            f"{fmt(r.ratio('naive'))} | {fmt(r.ratio('minimal'))} | {busy} |")
    return lines


def gpu_target_lines(results: list[CaseResult]) -> list[str]:
    """The GPU targets, per case of workload (b) run on CUDA (reported, never asserted)."""
    lines = []
    for r in results:
        if r.workload.key != "b" or not r.device.startswith("cuda"):
            continue
        where = f"(b)/{r.granularity}, {r.stages} stages"
        for text, contender in (("at least 5× faster than Quantus", "quantus"),
                                ("within 1.2× of minimal bare compute", "minimal")):
            ratio = r.ratio(contender)
            if ratio is None:
                lines.append(f"- {where}: {text}: not measured"
                             + (f" ({r.quantus_note})" if contender == "quantus" else ""))
                continue
            met = ratio <= TARGETS_GPU[contender] + 1e-12
            lines.append(f"- {where}: {text}: saliencycheck/{contender} = {ratio:.3f} → "
                         f"**{'met' if met else 'NOT met'}**")
        busy = r.gpu_busy.get("saliencycheck")
        if busy is not None:
            lines.append(f"- {where}: GPU busy ≥ {TARGET_BUSY:.0%} of saliencycheck's run: "
                         f"{busy:.0%} → **{'met' if busy >= TARGET_BUSY else 'NOT met'}** "
                         f"(bare compute: {r.gpu_busy.get('minimal', float('nan')):.0%})")
    return lines


def target_lines(results: list[CaseResult]) -> list[str]:
    lines = gpu_target_lines(results)
    for r in results:
        if r.workload.key != "a" or r.workload.stage_limit:
            continue
        checks = [("at least 1.5× faster than Quantus", "quantus"),
                  ("at most 0.8× naive bare compute", "naive"),
                  ("within 1.1× of minimal bare compute", "minimal")]
        for text, contender in checks:
            ratio = r.ratio(contender)
            if ratio is None:
                lines.append(f"- {text}: not measured")
                continue
            met = ratio <= TARGETS_A[contender] + 1e-12
            extra = f" (Quantus/saliencycheck = {1 / ratio:.3f}×)" if contender == "quantus" \
                else ""
            lines.append(f"- {text}: saliencycheck/{contender} = {ratio:.3f}{extra} → "
                         f"**{'met' if met else 'NOT met'}**")
    return lines


def write_report(path: Path, results: list[CaseResult], env: dict, argv: list[str],
                 total_s: float, memory: list[dict] | None = None) -> None:
    v = env["versions"]
    lines = [
        "# Benchmark results", "",
        f"Written by `python benchmarks/bench.py {' '.join(argv)}` on {env['date']} "
        f"(whole run {total_s / 60:.1f} min). See `benchmarks/README.md` for what each "
        "contender does. Times are wall-clock seconds for the whole check (trained model and "
        "every stage), the minimum over the repeats; every repeat is listed below.", "",
        "## Machine", "",
        f"- CPU: {env['cpu']}, {env['cores']} cores visible, torch threads "
        f"{env['torch_threads']} (default)",
        f"- device: {env['device']} (GPU: {env['gpu']})",
        f"- Python {env['python']}, {env['platform']}",
        f"- saliencycheck {v['saliencycheck']} (git {env['git']}"
        + (f", {env['git_dirty']} uncommitted file(s) under saliencycheck/ at run time"
           if env["git_dirty"] else ", clean") + ")",
        f"- torch {v['torch']}, torchvision {v['torchvision']}, captum {v['captum']}, "
        f"quantus {v['quantus']}, numpy {v['numpy']}, scipy {v['scipy']}, "
        f"scikit-image {v['scikit-image']}",
        f"- load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in env['load_start'])}"
        f", at end {tuple(round(x, 2) for x in env['load_end'])} (other processes on the "
        "machine share its cores; see the per-run times for the spread)",
        "- precision: fp32 everywhere",
        f"- host memory: {env.get('host_memory', 'system')} for every contender alike ('reuse': "
        "freed memory stays on the heap, as in saliencycheck runs; 'system': glibc's default, "
        "fresh pages for every large block)", "",
        "## Workloads", "",
    ]
    seen = set()
    for r in results:
        if r.workload.key in seen:
            continue
        seen.add(r.workload.key)
        lines.append(f"- **{r.workload.title}**: {r.workload.describe()}.")
        lines.extend(f"  {note}" for note in r.workload.notes)
    lines += ["", "## Wall time", ""] + summary_table(results) + [""]
    targets = target_lines(results)
    if targets:
        lines += ["Targets of the issues, fp32 (reported, never asserted): workload (a) on the "
                  "CPU; workload (b) on a GPU.", ""]
        lines += targets + [""]
    lines += ["## Every run", "",
              "Wall seconds of each timed run, in the order they ran (contenders interleaved "
              "within each repeat), and how many CPU cores other processes on the machine kept "
              "busy on average during that run (from /proc/stat minus this process; above ~0.2 "
              "the run competed for the cores and its time is inflated).", "",
              "| workload | granularity | contender | runs (s) | other processes (cores) |",
              "|---|---|---|---|---|"]
    for r in results:
        for name, values in r.times.items():
            lines.append(f"| {r.workload.key} | {r.granularity} | {name} | "
                         f"{', '.join(f'{x:.2f}' for x in values)} | "
                         f"{', '.join(fmt(x) for x in r.others[name])} |")
    lines.append("")
    for r in results:
        if r.sc_timings:
            lines.append(f"- {r.workload.key}/{r.granularity}: saliencycheck's own split of its "
                         f"last run: " + ", ".join(f"{k} {v:.2f} s"
                                                   for k, v in r.sc_timings.items())
                         + f"; the rest of its time is `check`'s plan (copy of the model, "
                         f"images, stage plan; {r.prepare_s:.2f} s when planned alone)")
    lines += ["", "## Quantus", ""]
    for r in results:
        lines.append(f"- {r.workload.key}/{r.granularity}: Quantus randomizes "
                     f"{fmt(r.quantus_layers, 'd')} modules (those with `reset_parameters`), "
                     f"saliencycheck's stage list has {r.stages} stages"
                     + ("" if r.quantus_same_order is None else
                        (", the same modules in the same order" if r.quantus_same_order
                         else ", a different module list or order")) + "."
                     + (f" {r.quantus_note}." if r.quantus_note else ""))
        if r.quantus_method_times and any(r.quantus_method_times.values()):
            lines.append("  Per method (min over runs): " + ", ".join(
                f"{k} {min(v):.2f} s" for k, v in r.quantus_method_times.items() if v) + ".")
    if memory:
        lines += ["", "## Memory", "",
                  "`benchmarks/memory.py`: saliencycheck alone in a fresh process per image "
                  "count (digits ResNet-18, 64×64, gradient + guided backprop, cascading by "
                  "block, work units of 8 images); peak RSS from the child's own `VmHWM` "
                  "(`getrusage` would count the forked benchmark process too).", "",
                  memory_table(memory)]
    for r in results:
        if r.agreement:
            lines += agreement_lines(r)
    path.write_text("\n".join(lines + [""]) + NOTES, encoding="utf-8")


def agreement_lines(r: CaseResult) -> list[str]:
    a = r.agreement
    lines = ["", f"## Agreement ({r.workload.key}/{r.granularity})", "",
             "Naive (contender 3) vs `compute_maps` (contender 4) on the trained model, max |Δ| "
             "relative to the larger map's max |value|: " + ", ".join(
                 f"{k} {v:.1e}" for k, v in a["naive_vs_minimal"].items()) + "."]
    if a["trained_maps"]:
        lines += ["", "saliencycheck's trained-model maps vs the Captum maps Quantus explains, "
                  "both reduced as Quantus reduces them (gradient: Σ_c |g|, Captum Saliency; "
                  "others: |Σ_c a|):", "",
                  "| method | max abs Δ / max abs | min Spearman over images |", "|---|---|---|"]
        for k, v in a["trained_maps"].items():
            lines.append(f"| {k} | {v['max_rel_diff']:.1e} | {v['min_spearman']:.6f} |")
    if a["per_layer"]:
        lines += ["", "Per-layer Spearman on the same randomized models (Quantus's own, "
                  "replayed: its module list, top-down, seed 42): Quantus's MPRT score vs "
                  "`saliencycheck.metrics.spearman` on saliencycheck's maps with Quantus's "
                  "reduction (|·|, channel sum; its batch-max division is rank-neutral):", "",
                  "| method | layers | image×layer pairs | max abs Δ | mean abs Δ "
                  "| NaN in one only |",
                  "|---|---|---|---|---|---|"]
        for k, v in a["per_layer"].items():
            lines.append(f"| {k} | {v['layers']} | {v['pairs']} | {v['max_abs_diff']:.1e} | "
                         f"{v['mean_abs_diff']:.1e} | {v['nan_mismatch']} |")
    if a["side_by_side"]:
        lines += ["", "For context only, each tool along its own randomization (different "
                  "initialisation, BatchNorm statistics and normalisation, so not expected to "
                  "match): saliencycheck `spearman_abs` (p99-clipped absolute map) vs Quantus "
                  "Spearman (max-normalised |map|), mean over images:", ""]
        for k, rows in a["side_by_side"].items():
            lines += [f"{k}:", "", "| stage | saliencycheck stage | saliencycheck | "
                      "Quantus layer | Quantus |", "|---|---|---|---|---|"]
            for row in rows:
                lines.append(f"| {row['stage']} | {row['saliencycheck_stage']} | "
                             f"{fmt(row['saliencycheck_spearman_abs'], '.3f')} | "
                             f"{row['quantus_layer']} | {fmt(row['quantus_spearman'], '.3f')} |")
            lines.append("")
    return lines


NOTES = """
## What "the same work" means here

- One model object per workload (the trained digits ResNet-18 for (a), a seeded ResNet-50 for
  (b)), the same images (preprocessed once by saliencycheck), the same targets (the trained
  model's predicted class, kept on randomized models: Quantus's convention), the same methods
  and parameters, the same number of stages, fp32.
- Contenders 3 and 4 randomize exactly as saliencycheck does
  (`RandomizedModels.stage_models(stages, init="reset", std=0.1, reset_running_stats=False,
  seed=0)`), so they compute saliencycheck's very maps (checked above for the trained model).
- Quantus randomizes its own way: every module with `reset_parameters`, in reverse
  `named_modules` order, re-running `reset_parameters` after reseeding the global RNG with 43
  (BatchNorm running statistics reset too). For ResNet-18 its module list has the same length
  as saliencycheck's layer granularity, so the number of stages and the passes per stage are
  the same; the random values differ, which does not change the cost.
- Quantus computes the trained model's explanations twice (once for `a_batch`, once more for
  its "original" self-similarity entry); that is part of its cost as users run it.
- Quantus 0.6's `quantus.explain` has no guided backprop and no SmoothGrad for Captum, and runs
  IG with 10 trapezoid steps from a zero baseline whatever is asked; those methods are passed
  as a plain Captum `explain_func` (IG: 16 or 32 Gauss–Legendre steps from the black baseline,
  exactly saliencycheck's IG). Grad-CAM through `quantus.explain` is Captum's `LayerGradCam`
  without the final ReLU (same cost).
- Both metrics are computed inside each Quantus MPRT call by one `similarity_func` that returns
  Quantus's `correlation_spearman` and records Quantus's `ssim` (on flattened 1-D maps, as
  Quantus does); a user with two MPRT calls would pay every explanation twice.
- "minimal" does not include saliencycheck's metrics or its CSV writing (the stage logits for
  stages.csv need no pass of their own here: saliencycheck reads them from the passes of the
  images, which "minimal" runs too); "naive" and "minimal" include the forward that picks the
  targets and the randomization of each stage.
- "naive" runs the stage models with their parameters requiring grad, as a user's model
  comes; saliencycheck's working copy turns that off (5–10 % faster passes), one of its
  savings.
"""


# ------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("a", "b", "c", "all"), default="all",
                        help="a: digits ResNet-18 (CPU); b: ResNet-50; c: ViT-B/16; all")
    parser.add_argument("--images", type=int, default=None,
                        help="images of workloads b and c on a GPU (default 64)")
    parser.add_argument("--stages", type=int, default=None,
                        help="on a GPU, run only the first N stages of each case of workloads "
                        "b and c, every contender alike (Quantus too), to fit a time budget")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    parser.add_argument("--repeat", type=int, default=2,
                        help="timed runs per contender; the minimum is reported (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny sizes, first 3 stages; writes no results file")
    parser.add_argument("--output", type=Path, default=None,
                        help="results file (default benchmarks/results.md; none with --quick)")
    parser.add_argument("--no-agreement", action="store_true", help="skip the agreement check")
    parser.add_argument("--host-memory", choices=("reuse", "system"), default="reuse",
                        help="allocator for every contender alike: 'reuse' keeps freed host "
                        "memory on the heap, as saliencycheck runs do "
                        "(saliencycheck.engine.host_memory); 'system' is glibc's default")
    parser.add_argument("--device-memory-gib", type=float, default=None,
                        help="runtime.device_memory_gib of the memory runs (CUDA only)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory runs (benchmarks/memory.py)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    output = args.output or (None if args.quick else HERE / "results.md")
    workloads = []
    if args.workload in ("a", "all"):
        workloads.append(workload_a(quick=args.quick))
    if args.workload in ("b", "all"):
        workloads.append(workload_b(gpu=gpu, quick=args.quick, images=args.images,
                                    stages=args.stages))
    if args.workload in ("c", "all"):
        workloads.append(workload_c(gpu=gpu, quick=args.quick, images=args.images,
                                    stages=args.stages))

    def log(text: str) -> None:
        print(text, flush=True)

    env = environment(device)
    log(f"device {device}, {env['cpu']}, {env['cores']} cores, torch {env['versions']['torch']}"
        f", quantus {env['versions']['quantus']}" + (f" ({QUANTUS_ERROR})" if qd is None else ""))
    started = time.perf_counter()
    results = []
    reuse = args.host_memory == "reuse"
    env["host_memory"] = args.host_memory
    with reused_host_memory(reuse) as active:  # the same allocator for every contender
        if reuse and not active:
            env["host_memory"] = "system (reuse needs glibc)"
        for workload in workloads:
            for granularity in workload.granularities:
                try:
                    results.append(run_case(
                        workload, granularity, device, repeat=args.repeat,
                        agreement=not args.no_agreement and workload.key == "a",
                        reuse_host_memory=reuse, log=log))
                except Exception:  # noqa: BLE001 - report and go on with the other cases
                    log(f"[{workload.key}/{granularity}] failed:\n{traceback.format_exc()}")
                if output is not None:  # what is measured so far, should the run be cut off
                    env["load_end"] = os.getloadavg()
                    write_report(output, results, env, argv, time.perf_counter() - started)
    memory = None
    if not (args.quick or args.no_memory):
        memory = measure_memory([8, 64], str(device), args.device_memory_gib)
        log("\n" + memory_table(memory))
    total = time.perf_counter() - started
    env["load_end"] = os.getloadavg()

    log("")
    for line in summary_table(results) + [""] + target_lines(results):
        log(line)
    for r in results:
        if r.agreement:
            for line in agreement_lines(r):
                log(line)
    if output is not None:
        write_report(output, results, env, argv, total, memory)
        log(f"\nwrote {output}")
    return 0 if len(results) == sum(len(w.granularities) for w in workloads) else 1


if __name__ == "__main__":
    sys.exit(main())
