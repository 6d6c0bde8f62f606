"""``runtime.precision: fp32`` means IEEE fp32 on a GPU too.

PyTorch lets cuDNN run fp32 convolutions in TF32 by default (a 10-bit mantissa on Ampere and
later GPUs), and a user's ``torch.set_float32_matmul_precision("high")`` does the same for
matrix products. Maps and scores would then move by about 1e-3 relative from the CPU's, a
difference no fp32 run should show. :func:`exact_fp32` turns TF32 off while saliencycheck
computes and restores the user's settings after, so a notebook's own work is left as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def exact_fp32(enabled: bool = True) -> Iterator[None]:
    """IEEE fp32 for CUDA convolutions and matrix products inside the block (nothing changes
    without CUDA or when not ``enabled``, e.g. for a bf16/fp16 run)."""
    if not (enabled and torch.cuda.is_available()):
        yield
        return
    conv, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(getattr(conv, "conv", None), "fp32_precision"):  # torch >= 2.9: the new API
        # (reading the legacy flags after a user set the new ones raises, so never mix them)
        owners = [(conv.conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
    else:
        owners = [(conv, "allow_tf32", False), (matmul, "allow_tf32", False)]
    saved = [getattr(owner, name) for owner, name, _ in owners]
    try:
        for owner, name, value in owners:
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name, _), value in zip(owners, saved):
            setattr(owner, name, value)
