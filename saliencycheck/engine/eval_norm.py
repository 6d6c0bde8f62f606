"""A cheaper backward for inference-mode batch normalization.

In eval mode ``F.batch_norm`` is the per-channel affine map ``(x − μ) · γ/√(σ² + ε) + β`` with
fixed statistics, so its input gradient is the incoming gradient times ``γ/√(σ² + ε)``. PyTorch's
CPU kernel for that backward (``native_batch_norm_backward``) is 3–10× slower than that one
multiplication (measured with torch 2.14 on 2 cores at ResNet-18's shapes, 119 rows: 1.42 ms
against 0.19 ms at 64×16×16, 1.58 ms against 0.14 ms at 512×2×2); in a cascading check of
ResNet-18 it took a fifth of all compute. While :class:`EvalBatchNormMode` is active, every
such call runs the native forward (bit-identical outputs) with the multiplication as its
backward. Calls that need batch statistics or a gradient for the statistics or the affine
parameters keep PyTorch's own backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_PARAMETERS = ("input", "running_mean", "running_var", "weight", "bias", "training",
               "momentum", "eps")
_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


class _EvalBatchNorm(torch.autograd.Function):
    """Native eval-mode batch norm forward; ``grad · γ/√(σ² + ε)`` backward (input only)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, running_mean: Tensor, running_var: Tensor,
                weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        scale = torch.rsqrt(running_var + eps)
        if weight is not None:
            scale = scale * weight
        ctx.scale = scale.reshape(1, -1, *([1] * (x.ndim - 2)))
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return grad * ctx.scale.to(grad.dtype), None, None, None, None, None


class EvalBatchNormMode(TorchFunctionMode):
    """While active, eval-mode ``F.batch_norm`` calls get :class:`_EvalBatchNorm`'s backward."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = {**_DEFAULTS, **dict(zip(_PARAMETERS, args)), **kwargs}
            x, mean, var = call["input"], call["running_mean"], call["running_var"]
            fixed = (mean, var, call["weight"], call["bias"])
            if (not call["training"] and mean is not None and var is not None
                    and x.requires_grad
                    and not any(t is not None and t.requires_grad for t in fixed)):
                return _EvalBatchNorm.apply(x, mean, var, call["weight"], call["bias"],
                                            float(call["eps"]))
        return func(*args, **kwargs)
