"""What every attribution method shares: its context, its signature and the chunked gradient.

A method is ``fn(model, inputs, targets, context, **params) -> Tensor``: ``model`` an
``nn.Module`` in eval mode (never modified), ``inputs`` a normalised float tensor
``(N, C, H, W)``, ``targets`` a long tensor ``(N,)`` of per-image classes; the result is the raw
signed map, ``(N, C, H, W)`` or ``(N, 1, H, W)``. Methods never normalise their maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from saliencycheck.errors import ConfigError, MethodError, ModelError


@dataclass(frozen=True)
class AttributionContext:
    """Settings shared by all methods of a run.

    ``mean``/``std`` are the input normalisation (one value per channel, or one for all), so
    that pixel-space baselines such as "black" are defined. ``seed`` seeds a local
    ``torch.Generator`` for noise and random baselines: the same seed gives the same noise on
    every call, so a trained and a randomised model see identical noisy inputs; the global RNG
    is never touched. ``chunk_size`` bounds the rows of every forward/backward pass (halved
    and retried after a CUDA out-of-memory error). ``precision`` runs the forward passes under
    ``torch.autocast`` with bfloat16 or float16; gradients w.r.t. the inputs stay float32.
    ``affine_stem`` lets integrated gradients and SmoothGrad sum their rows' gradients at the
    output of the model's affine input layers and pull back one row per image
    (:mod:`saliencycheck.engine.stem`); equal up to float summation order.
    """

    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    seed: int = 0
    chunk_size: int = 64
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    affine_stem: bool = True

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size: must be at least 1, got {self.chunk_size}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise ConfigError(
                f"mean/std: need one value per channel in each, got {len(self.mean)} and "
                f"{len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std: every value must be positive, got {self.std}")


class AttributionFn(Protocol):
    """The signature every registered method implements."""

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        context: AttributionContext,
        **params: object,
    ) -> Tensor: ...


def check_call(model: nn.Module, inputs: Tensor, targets: Tensor, name: str) -> None:
    """Raise MethodError/ModelError unless the call matches the method signature's contract."""
    if torch.is_inference_mode_enabled():
        raise MethodError(f"{name}: needs autograd; call it outside torch.inference_mode()")
    if not (isinstance(inputs, Tensor) and inputs.ndim == 4 and inputs.is_floating_point()
            and inputs.shape[0] > 0):
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise MethodError(
            f"{name}: inputs must be a float tensor (N, C, H, W) with N > 0, got {shape}"
        )
    if not (isinstance(targets, Tensor) and targets.shape == inputs.shape[:1]
            and targets.dtype == torch.long):
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise MethodError(
            f"{name}: targets must be a long tensor ({inputs.shape[0]},) of class indices, "
            f"got {shape}"
        )
    if any(m.training for m in model.modules()):
        raise ModelError(f"{name}: the model is in training mode; call model.eval() first")


def channel_stats(context: AttributionContext, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` as ``(1, C, 1, 1)`` tensors on the inputs' device and dtype."""
    channels = inputs.shape[1]
    if len(context.mean) not in (1, channels):
        raise MethodError(
            f"the normalisation has {len(context.mean)} mean/std values but the inputs have "
            f"{channels} channel(s); give one value per channel"
        )
    mean, std = (
        torch.tensor(v, dtype=inputs.dtype, device=inputs.device).reshape(1, -1, 1, 1)
        for v in (context.mean, context.std)
    )
    return mean, std


def normalise(pixels: Tensor, context: AttributionContext) -> Tensor:
    """Map pixel values (0..1) to the model's input space: ``(pixels - mean) / std``."""
    mean, std = channel_stats(context, pixels)
    return (pixels - mean) / std


def target_logits(model: nn.Module, x: Tensor, targets: Tensor) -> Tensor:
    """The pre-softmax score of each row's target class, shape (rows,)."""
    return select_targets(model_logits(model, x), targets)


def model_logits(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)``, checked to be logits (rows, classes)."""
    out = model(x)
    if not (isinstance(out, Tensor) and out.ndim == 2):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelError(
            f"the model must return logits (N, classes), got {got}; wrap it so forward returns "
            "the logits tensor"
        )
    return out


def select_targets(out: Tensor, targets: Tensor) -> Tensor:
    """Each row's logit of its target class, (rows, classes) -> (rows,)."""
    if int(targets.min()) < 0 or int(targets.max()) >= out.shape[1]:
        raise MethodError(
            f"target class out of range for a model with {out.shape[1]} outputs "
            f"(got {int(targets.min())}..{int(targets.max())})"
        )
    index = targets[:, None].clone()  # a normal tensor even if targets came from inference mode
    return out.gather(1, index).squeeze(1)
