"""Map complexity for eMPRT (Hedström et al. 2023): the entropy of each map's value histogram.

A map that explains a model concentrates its mass on few values; randomizing the model should
scatter it, so its histogram entropy rises. Computed batched in torch on the maps' device
(one scatter per batch) rather than one ``numpy.histogram`` per map; the tests check it
against ``numpy.histogram`` + ``scipy.stats.entropy``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saliencycheck.metrics import Scores

ENTROPY = "entropy"  # eMPRT's per-map histogram entropy, in nats
ENTROPY_RISE = "entropy_rise"  # eMPRT's score: (H(randomized map) - H(trained map)) / H(trained)


def histogram_entropy(maps: Tensor, bins: int = 100) -> Tensor:
    """Shannon entropy (nats) of each map's histogram: ``bins`` equal-width bins from the
    map's min to its max (the max in the last bin, as ``numpy.histogram``). (N, ...) -> (N,);
    a constant map has entropy 0."""
    flat = maps.detach().flatten(1).double()
    low = flat.amin(dim=1, keepdim=True)
    width = flat.amax(dim=1, keepdim=True) - low
    scaled = (flat - low) / torch.where(width > 0, width, torch.ones_like(width))
    index = (scaled * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(flat.shape[0], bins, dtype=flat.dtype, device=flat.device)
    counts.scatter_add_(1, index, torch.ones_like(flat))
    p = counts / flat.shape[1]
    return -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(dim=1)


def entropy_rise(trained: Tensor, randomized: Tensor) -> Scores:
    """eMPRT's score per map pair: (H(randomized) − H(trained)) / H(trained); NaN, with the
    reason, where the trained map is constant (entropy 0)."""
    flat = trained <= 0
    rise = (randomized - trained) / torch.where(flat, torch.ones_like(trained), trained)
    rise = torch.where(flat, torch.full_like(rise, float("nan")), rise)
    return Scores(rise, tuple("constant map (trained): entropy 0" if f else ""
                              for f in flat.tolist()))
