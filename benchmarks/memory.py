"""Peak memory against the number of images, and how busy a GPU is during a run.

    python benchmarks/memory.py                      # 8 and 64 images, printed as a table
    python benchmarks/memory.py --device-memory-gib 4   # on CUDA: under a 4 GiB cap

Each measurement runs saliencycheck in a fresh child process (so peak RSS is that run's own):
the trained digits ResNet-18 at 64×64, gradient and guided backprop, cascading at block
granularity, on N copies of the sample digits. The issue's memory targets: peak host memory
independent of the number of images (images are streamed in work units of
``runtime.batch_size``), peak device memory within the budget: ``runtime.device_memory_gib``
when given (the table then shows the peak memory PyTorch's allocator reserved against it),
else the share of free memory ``chunk_size: auto`` chose from.
On CUDA the child also profiles one more run and reports the share of the wall time the GPU
spent in kernels (the profiler's own overhead makes this a lower bound).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DIGITS = REPO / "sample_images" / "digits"


def _config(images: Path, output: Path, device: str, budget_gib: float | None) -> dict:
    return {
        "model": {"name": "resnet18", "factory": "saliencycheck.zoo:digits_resnet18",
                  "num_classes": 10},
        "images": {"path": str(images), "size": 64, "mean": [0.5] * 3,
                   "std": [0.5] * 3},
        "methods": ["gradient", "guided_backprop"],
        "tests": {"cascading": {"enabled": True, "granularity": "block"},
                  "independent": {"enabled": False}},
        "metrics": ["spearman_abs", "ssim"],
        "runtime": {"device": device, "batch_size": 8, "device_memory_gib": budget_gib},
        "output": {"dir": str(output), "figures": False},
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started its program. ``getrusage``'s
    ``ru_maxrss`` also counts the pages of the parent it was forked from (Linux carries the
    pre-exec peak over), so a child of a large benchmark process read the parent's size;
    ``VmHWM`` is the peak of this program's own address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def child(images: int, device: str, budget_gib: float | None) -> dict:
    """Run saliencycheck on ``images`` digit copies in this process; report its peaks."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import torch

    from saliencycheck.config import LoadedConfig, parse_config
    from saliencycheck.runner import prepare, run_check

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        sources = sorted(DIGITS.glob("*.png"))
        for i in range(images):
            source = sources[i % len(sources)]
            shutil.copy(source, folder / f"{i:04d}_{source.name}")
        config = _config(folder, Path(tmp) / "out", device, budget_gib)
        setup = prepare(LoadedConfig(config=parse_config(config), source=Path(tmp) / "m.yaml"))
        cuda = setup.device.type == "cuda"
        if cuda:
            free, total = torch.cuda.mem_get_info(setup.device)
            torch.cuda.reset_peak_memory_stats(setup.device)
        start = time.perf_counter()
        run_check(setup)
        wall = time.perf_counter() - start
        report = {"images": images, "wall_s": wall, "chunk_size": setup.context.chunk_size,
                  "peak_rss_mib": peak_rss_mib()}
        if cuda:
            report.update(peak_device_mib=torch.cuda.max_memory_allocated(setup.device) / 2**20,
                          peak_reserved_mib=torch.cuda.max_memory_reserved(setup.device) / 2**20,
                          budget_mib=budget_gib * 1024 if budget_gib else None,
                          free_at_start_mib=free / 2**20, device_total_mib=total / 2**20,
                          gpu_busy=_gpu_busy(setup, run_check))
    return report


def _gpu_busy(setup, run_check) -> float:
    """Kernel time over wall time of one profiled run (a lower bound: the profiler slows it)."""
    return gpu_busy(lambda: run_check(setup), setup.device)


def gpu_busy(fn, device) -> float:  # noqa: ANN001
    """The share of ``fn()``'s wall time the GPU spends in kernels, from one run under the
    torch profiler (a lower bound: the profiler's own overhead lengthens the run)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    kernel_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                    for e in prof.key_averages())
    return min(1.0, kernel_us / 1e6 / wall)


def measure(counts: list[int], device: str, budget_gib: float | None = None) -> list[dict]:
    """One child process per image count; their reports, in order."""
    reports = []
    budget = ["--device-memory-gib", str(budget_gib)] if budget_gib else []
    for count in counts:
        out = subprocess.run([sys.executable, str(Path(__file__)), "--child", str(count),
                              "--device", device, *budget],
                             check=True, capture_output=True, text=True)
        reports.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return reports


def table(reports: list[dict]) -> str:
    """The reports as a markdown table."""
    cuda = "peak_device_mib" in reports[0]
    head = "| images | wall s | chunk rows | peak host RSS MiB |"
    rule = "|---|---|---|---|"
    if cuda:
        head += " peak device MiB | peak reserved MiB | cap MiB | free at start MiB | GPU busy |"
        rule += "---|---|---|---|---|"
    lines = [head, rule]
    for r in reports:
        line = (f"| {r['images']} | {r['wall_s']:.1f} | {r['chunk_size']} | "
                f"{r['peak_rss_mib']:.0f} |")
        if cuda:
            cap = f"{r['budget_mib']:.0f}" if r.get("budget_mib") else "none"
            line += (f" {r['peak_device_mib']:.0f} | {r['peak_reserved_mib']:.0f} | {cap} | "
                     f"{r['free_at_start_mib']:.0f} | {r['gpu_busy']:.0%} |")
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--device-memory-gib", type=float, default=None,
                        help="runtime.device_memory_gib of the runs (CUDA only)")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.device, args.device_memory_gib)))
        return
    print(table(measure(args.images, args.device, args.device_memory_gib)))


if __name__ == "__main__":
    main()
