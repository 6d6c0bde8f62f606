"""``runtime.chunk_size: auto``: rows per pass chosen from the device's free memory."""

from __future__ import annotations

import torch
from torch import nn

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


def auto_chunk_size(model: nn.Module, example: torch.Tensor) -> int:
    """Rows per pass for ``example``'s device: measured on CUDA, :data:`CPU_CHUNK_ROWS` else."""
    if example.device.type != "cuda":
        return CPU_CHUNK_ROWS
    free, _ = torch.cuda.mem_get_info(example.device)
    return rows_for(free, bytes_per_row(model, example))
