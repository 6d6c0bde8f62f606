"""``runtime.chunk_size: auto``: rows per pass chosen from the device's free memory, and
``runtime.device_memory_gib``: the most CUDA memory a run may hold."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from saliencycheck.errors import ConfigError

CPU_CHUNK_ROWS = 128
"""Rows per pass on the CPU, where host memory rarely limits a pass (the default for numbers)."""

MOST_ROWS = 4096
FREE_MEMORY_SHARE = 0.35
"""Share of free device memory one row budget may use: a prefix-cached pass holds the trained
graph and a stage's graph at once (2 passes' activations), plus the maps and headroom."""


def rows_for(free_bytes: int, bytes_per_row: float, *, share: float = FREE_MEMORY_SHARE,
             most: int = MOST_ROWS) -> int:
    """The rows that fit ``share`` of ``free_bytes`` at ``bytes_per_row`` (1 ≤ rows ≤ most)."""
    if bytes_per_row <= 0:
        return most
    return int(max(1, min(most, share * free_bytes // bytes_per_row)))


def bytes_per_row(model: nn.Module, example: torch.Tensor, rows: int = 4) -> float:
    """Peak CUDA memory of one forward + input-gradient backward, per row (measured)."""
    device = example.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    x = example[:1].expand(rows, *example.shape[1:]).clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
        torch.autograd.grad(out.sum(), x)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / rows


def cap_device_memory(device: torch.device, gib: float | None) -> int | None:
    """Cap the memory PyTorch's caching allocator may hold on CUDA ``device`` at ``gib`` GiB
    (an allocation beyond it raises an out-of-memory error, which the passes answer by halving
    their chunk); the cap in bytes, or None where there is none (no cap asked, or a CPU)."""
    if gib is None or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    budget = int(gib * 2**30)
    if budget > total:
        raise ConfigError(f"runtime.device_memory_gib: {gib:g} GiB exceeds the "
                          f"{total / 2**30:.1f} GiB of {device}; lower it or leave it unset")
    torch.cuda.set_per_process_memory_fraction(budget / total, device)
    return budget


@contextmanager
def memory_fraction_restored() -> Iterator[None]:
    """Put every GPU's per-process memory fraction back after the block: a run's
    ``device_memory_gib`` cap must not outlive it in a notebook (the CLI's process ends with
    its run). The fraction before is read where torch can tell it, else the default, 1."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    read = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    before = [read(index) if read else 1.0 for index in range(count)]
    try:
        yield
    finally:
        for index, fraction in enumerate(before):
            torch.cuda.set_per_process_memory_fraction(fraction, index)


def free_for_passes(device: torch.device, budget: int | None = None) -> int:
    """Bytes CUDA ``device`` has free for passes: its free memory, or what this process's
    tensors leave of ``budget`` when that is less."""
    free, _ = torch.cuda.mem_get_info(device)
    if budget is not None:
        free = min(free, budget - torch.cuda.memory_allocated(device))
    return max(0, free)


def auto_chunk_size(model: nn.Module, example: torch.Tensor, budget: int | None = None) -> int:
    """Rows per pass for ``example``'s device: measured on CUDA against
    :func:`free_for_passes`, :data:`CPU_CHUNK_ROWS` on the CPU."""
    if example.device.type != "cuda":
        return CPU_CHUNK_ROWS
    return rows_for(free_for_passes(example.device, budget), bytes_per_row(model, example))
