"""Input invariance (Kindermans et al. 2017): shift the input, undo the shift in the first layer.

Two models that differ only by a constant shift of the input, absorbed by the first layer,
compute the same function of the *original* image; a map that changes between them reacts to
the input's offset, not to what the model computes. Kindermans et al. compensate in the first
layer's bias, ``b' = b − W·Δ``. Here the first layer receives ``x + Δ − Δ``: exactly that bias
change for a linear layer, and for a zero-padded convolution the exact version of it (a bias
map whose border values differ, where the padding meets no shifted pixels), so the logits are
unchanged to rounding in every case. The run checks and reports that they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from saliencycheck.errors import ConfigError

FIELD = "tests.input_invariance"
LOGIT_TOLERANCE = 1e-4  # largest mean relative L2 change of the logits compensation keeps


def compensation_failure(relative_l2: float) -> str:
    """Why the test says nothing when the compensated logits moved ('' when they did not)."""
    if not relative_l2 > LOGIT_TOLERANCE:
        return ""
    return (f"the compensated model's logits moved by {relative_l2:.2e} (relative L2 > "
            f"{LOGIT_TOLERANCE}); the model uses its input beyond the first layer")


def pixel_shift(shift: float, std: Sequence[float], like: Tensor) -> Tensor:
    """A shift of every pixel by ``shift`` (the image's [0, 1] scale) in the model's normalised
    input space: ``shift / std`` per channel, shaped to broadcast over ``like`` (N, C, H, W)."""
    return (shift / torch.tensor(std, dtype=like.dtype, device=like.device)).view(1, -1, 1, 1)


def first_layer(model: nn.Module, example: Tensor) -> str:
    """The first module with parameters of its own that the forward runs, which must receive
    the model's input itself; a ConfigError naming the test otherwise (e.g. Inception-v3 with
    ``transform_input``, which rescales the input before its first convolution)."""
    calls: list[tuple[str, bool]] = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not calls:
                calls.append((name, bool(args) and args[0] is example))
        return hook

    handles = [module.register_forward_pre_hook(record(name))
               for name, module in model.named_modules()
               if name and any(True for _ in module.parameters(recurse=False))]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    if not calls:
        raise ConfigError(f"{FIELD}: no layer with parameters runs in the forward pass; turn "
                          "the test off for this model")
    name, receives_input = calls[0]
    if not receives_input:
        raise ConfigError(f"{FIELD}: the first layer {name!r} does not receive the model's "
                          "input (the model transforms it first), so a shift cannot be "
                          f"compensated there; set {FIELD}.enabled: false for this model")
    return name


@contextmanager
def compensated(model: nn.Module, layer: str, shift: Tensor) -> Iterator[nn.Module]:
    """``model`` whose first layer ``layer`` subtracts ``shift`` from its input: fed
    ``x + shift``, it computes what the original computes on ``x``."""
    def undo(module: nn.Module, args: tuple) -> tuple:
        return (args[0] - shift, *args[1:])

    handle = model.get_submodule(layer).register_forward_pre_hook(undo)
    try:
        yield model
    finally:
        handle.remove()
