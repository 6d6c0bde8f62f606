"""Occlusion (Zeiler & Fergus 2014): how much the target logit drops when a patch is hidden.

A ``window`` slides over the image with ``stride``; each position is a copy of the image with
the patch (all channels) set to ``baseline``. A pixel's attribution is the mean, over the
positions whose patch covers it, of ``f(x) − f(x with the patch hidden)``: Captum's
``Occlusion`` with a window spanning the channels. Positions start at 0 and step by ``stride``;
where the steps miss the last rows or columns, one more position is aligned with that edge,
so every pixel is covered (Captum leaves them out; on sizes the steps tile exactly both agree).

Forward passes only: the copies are rows of the engine's ``forward`` family, built chunk by
chunk (never all in memory), batched with ``chunk_size`` rows per pass and, in a
randomization test, replayed from the prefix cache for the modules a stage leaves trained.
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveInt, field_validator, model_validator
from torch import Tensor, nn

from saliencycheck.engine.passes import MethodPlan, Request, RowMaps, RowSource, planned_method
from saliencycheck.errors import MethodError
from saliencycheck.methods.base import AttributionContext
from saliencycheck.methods.registry import MethodParams

Pair = tuple[PositiveInt, PositiveInt]  # (height, width); one number in a config: a square


class OcclusionParams(MethodParams):
    """Parameters of occlusion."""

    window: Pair = Field(
        (16, 16), description="height and width in pixels of the hidden patch ([h, w], or one "
        "number for a square); every channel is hidden")
    stride: Pair = Field(
        (8, 8), description="step in pixels between patch positions ([h, w], or one number)")
    baseline: float = Field(
        0.0, description="the value the hidden patch takes, in the model's normalised input "
        "space (as Captum's baselines): 0 is the normalisation's mean colour")

    @field_validator("window", "stride", mode="before")
    @classmethod
    def _square(cls, value: object) -> object:
        return (value, value) if isinstance(value, int) and not isinstance(value, bool) \
            else value

    @model_validator(mode="after")
    def _no_gaps(self) -> OcclusionParams:
        for side, w, s in zip(("height", "width"), self.window, self.stride):
            if s > w:
                raise ValueError(f"stride {s} exceeds the window's {side} {w}, so pixels "
                                 "between patches get no attribution; set stride ≤ window")
        return self


def patch_spans(size: int, window: int, stride: int) -> list[int]:
    """Start of each patch along one side: 0, stride, …, plus one aligned with the far edge
    when the steps miss it."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def _masks(size: int, window: int, stride: int, device: torch.device) -> Tensor:
    """(positions, size) bool: which pixels of one side each patch position covers."""
    starts = torch.tensor(patch_spans(size, window, stride), device=device)
    pixels = torch.arange(size, device=device)
    return (pixels >= starts[:, None]) & (pixels < starts[:, None] + window)


@planned_method(
    "occlusion",
    params=OcclusionParams,
    description="drop of the target logit when a sliding patch is hidden, averaged over the "
    "patches covering each pixel",
)
def occlusion(
    model: nn.Module, source: RowSource, context: AttributionContext, *,
    window: Pair = (16, 16), stride: Pair = (8, 8), baseline: float = 0.0,
) -> MethodPlan:
    """Occlusion maps, (N, 1, H, W): per pixel, the mean logit drop over the patches covering
    it (positive: hiding the pixel lowers the target's logit)."""
    example, _ = source.build(torch.arange(1))
    size = tuple(example.shape[2:])
    if window[0] > size[0] or window[1] > size[1]:
        raise MethodError(f"occlusion: window {window[0]}×{window[1]} is larger than the "
                          f"{size[0]}×{size[1]} input; set a smaller window")
    rows, cols = (_masks(n, w, s, example.device) for n, w, s in zip(size, window, stride))
    per_image = 1 + len(rows) * len(cols)  # the image itself, then each patch position

    def build(index: Tensor) -> tuple[Tensor, Tensor]:
        inputs, targets = source.build(index // per_image)
        position = (index % per_image - 1).to(rows.device)  # -1: the image itself
        hidden = rows[position // len(cols)][:, :, None] & cols[position % len(cols)][:, None]
        hidden &= (position >= 0)[:, None, None]
        return inputs.masked_fill(hidden[:, None].to(inputs.device), baseline), targets

    copies = RowSource(key=("occlusion", source.key, window, stride, baseline),
                       count=source.count * per_image, build=build)
    logits = RowMaps(fn=lambda inputs, target_logits, pair: target_logits, count=copies.count)

    def finish() -> Tensor:
        scores = logits.result().view(source.count, per_image)
        drops = (scores[:, :1] - scores[:, 1:]).view(source.count, len(rows), len(cols))
        r, c = rows.to(drops.dtype), cols.to(drops.dtype)
        total = torch.einsum("nij,ih,jw->nhw", drops, r, c)
        covering = r.sum(0)[:, None] * c.sum(0)[None, :]
        return (total / covering)[:, None]

    return MethodPlan([Request("forward", copies, logits, "occlusion")], finish)
