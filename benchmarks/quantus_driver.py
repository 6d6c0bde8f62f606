"""Contender 2: Quantus MPRT driven with Captum methods, as a user runs it.

Quantus (LGPL/GPL) is a benchmark-only dependency: nothing in ``saliencycheck`` imports it.

One ``quantus.MPRT`` call per method (MPRT takes one ``explain_func``), ``layer_order="top_down"``
(cascading), per-layer scores returned. Methods ``quantus.explain`` offers are used through it
(gradient → Captum ``Saliency``, gradient×input → ``InputXGradient``, Grad-CAM →
``LayerGradCam``); the others go through :func:`captum_explain`, a plain Captum call with the
same contract, because Quantus 0.6's ``explain`` hard-codes IG to 10 trapezoid steps from a zero
baseline and offers neither guided backprop nor SmoothGrad for Captum. That is how a user runs
those methods under Quantus.

Both metrics of the run are scored in the same MPRT call (:class:`SpearmanAndSSIM`, Quantus's own
``correlation_spearman`` and ``ssim``), so Quantus computes each map once per layer, as
saliencycheck does; a user with two ``MPRT`` calls would pay the explanations twice.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import quantus
import torch
from quantus.helpers.model.pytorch_model import PyTorchModel
from torch import Tensor, nn


def quantus_version() -> str:
    return getattr(quantus, "__version__", "unknown")


def captum_explain(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, *, method: str,
                   device: str = "cpu", steps: int = 16, baseline_value: Sequence[float] = (0.0,),
                   samples: int = 32, noise: float = 0.15, chunk_size: int = 128,
                   **_: object) -> np.ndarray:
    """A Captum attribution summed over channels (as ``quantus.explain`` reduces), numpy out."""
    from captum.attr import GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency

    model.to(device).eval()
    x = torch.as_tensor(inputs, dtype=torch.float32, device=device).requires_grad_(True)
    y = torch.as_tensor(targets, device=device)
    if method == "IntegratedGradients":
        base = torch.tensor(baseline_value, dtype=x.dtype, device=device).reshape(1, -1, 1, 1)
        a = IntegratedGradients(model).attribute(
            x, target=y, baselines=base.expand_as(x), n_steps=steps, method="gausslegendre",
            internal_batch_size=max(chunk_size, 1))
    elif method == "GuidedBackprop":
        a = GuidedBackprop(model).attribute(x, target=y)
    elif method == "SmoothGrad":
        flat = x.detach().flatten(1)
        sigma = float((noise * (flat.amax(1) - flat.amin(1))).mean())
        a = NoiseTunnel(Saliency(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=samples, stdevs=sigma, target=y, abs=False,
            nt_samples_batch_size=max(chunk_size // x.shape[0], 1))
    else:
        raise ValueError(f"captum_explain: unsupported method {method!r}")
    return a.sum(dim=1, keepdim=True).detach().cpu().numpy()


@dataclass(frozen=True)
class QuantusMethod:
    """How one saliencycheck method is run under Quantus."""

    label: str
    explain_func: object
    kwargs: dict
    note: str


def quantus_methods(methods: Sequence, *, mean: Sequence[float], std: Sequence[float],
                    size: int, chunk_size: int) -> list[QuantusMethod]:
    """The Quantus/Captum counterpart of each saliencycheck method (same parameters)."""
    out = []
    for method in methods:
        params = dict(method.params)
        if method.name == "gradient":
            out.append(QuantusMethod(method.label, quantus.explain, {"method": "Saliency"},
                                     "quantus.explain Saliency (Σ_c |∂/∂x|)"))
        elif method.name == "gradient_x_input":
            out.append(QuantusMethod(method.label, quantus.explain, {"method": "InputXGradient"},
                                     "quantus.explain InputXGradient"))
        elif method.name == "integrated_gradients":
            if params["baseline"] != "black":
                raise NotImplementedError("the benchmark runs IG from a black baseline")
            black = [(0.0 - m) / s for m, s in zip(mean, std)]
            out.append(QuantusMethod(
                method.label, captum_explain,
                {"method": "IntegratedGradients", "steps": params["steps"],
                 "baseline_value": black, "chunk_size": chunk_size},
                f"Captum IntegratedGradients, {params['steps']} Gauss-Legendre steps, black "
                "baseline (custom explain_func)"))
        elif method.name == "guided_backprop":
            out.append(QuantusMethod(method.label, captum_explain, {"method": "GuidedBackprop"},
                                     "Captum GuidedBackprop (custom explain_func)"))
        elif method.name == "smoothgrad":
            out.append(QuantusMethod(
                method.label, captum_explain,
                {"method": "SmoothGrad", "samples": params["samples"], "noise": params["noise"],
                 "chunk_size": chunk_size},
                f"Captum NoiseTunnel(Saliency), {params['samples']} samples "
                "(custom explain_func)"))
        elif method.name == "gradcam":
            out.append(QuantusMethod(
                method.label, quantus.explain,
                {"method": "LayerGradCam", "gc_layer": f"model.{params['layer']}",
                 "interpolate": (size, size)},
                f"quantus.explain LayerGradCam at {params['layer']}, upsampled"))
        else:
            raise NotImplementedError(f"no Quantus counterpart for {method.name!r}")
    return out


class SpearmanAndSSIM:
    """A Quantus ``similarity_func`` returning Spearman and recording Quantus's SSIM alongside."""

    def __init__(self) -> None:
        self.ssim: list[list[float]] = []

    def __call__(self, a: np.ndarray, b: np.ndarray, batched: bool = False, **kwargs) -> object:
        self.ssim.append(list(quantus.similarity_func.ssim(a, b, batched=batched, **kwargs)))
        return quantus.similarity_func.correlation_spearman(a, b, batched=batched, **kwargs)


def run_mprt(model: nn.Module, x: np.ndarray, y: np.ndarray, qm: QuantusMethod, *,
             device: str, batch_size: int, with_ssim: bool,
             layers: int | None = None) -> dict[str, list[float]]:
    """One Quantus MPRT call (cascading, top-down); ``{layer name: per-image Spearman}``.
    ``layers``: stop after the first that many layers (the other contenders run as many)."""
    similarity = SpearmanAndSSIM() if with_ssim else quantus.similarity_func.correlation_spearman
    metric = quantus.MPRT(similarity_func=similarity, layer_order="top_down", seed=42,
                          return_aggregate=False, disable_warnings=True,
                          display_progressbar=False)
    with first_layers(layers):
        return metric(model=model, x_batch=x, y_batch=y, a_batch=None, channel_first=True,
                      explain_func=qm.explain_func, explain_func_kwargs=dict(qm.kwargs),
                      device=device, batch_size=batch_size)


@contextmanager
def first_layers(limit: int | None) -> Iterator[None]:
    """Quantus's MPRT randomizes the layers its model wrapper's generator yields; with a
    ``limit``, the generator ends after the first ``limit`` (Quantus has no such option)."""
    if limit is None:
        yield
        return
    original = PyTorchModel.get_random_layer_generator

    def limited(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        return itertools.islice(original(self, *args, **kwargs), limit)

    PyTorchModel.get_random_layer_generator = limited
    try:
        yield
    finally:
        PyTorchModel.get_random_layer_generator = original


def quantus_layers(model: nn.Module) -> list[str]:
    """The modules Quantus randomizes, in its top-down order (those with reset_parameters)."""
    names = [name for name, m in model.named_modules() if hasattr(m, "reset_parameters")]
    return names[::-1]


def quantus_style(maps: Tensor, label_method: str) -> Tensor:
    """Raw (N, C, H, W) maps reduced as Quantus sees them before its rank correlation.

    Captum ``Saliency`` takes |·| per channel before the channel sum; every other method is
    summed signed over channels; then MPRT divides by the batch's max |a| (a positive constant,
    rank-neutral, left out) and takes |·|.
    """
    if label_method == "gradient":
        return maps.abs().sum(dim=1)
    return maps.sum(dim=1).abs()


def replay_quantus_models(model: nn.Module, device: str, limit: int | None = None):
    """Yield ``(layer, model)`` exactly as Quantus's MPRT randomizes (top-down, seed 42)."""
    wrapped = PyTorchModel(model=model, channel_first=True, softmax=False, device=device)
    with torch.random.fork_rng(devices=[]):  # Quantus reseeds the global RNG at every layer
        for index, (name, randomized) in enumerate(
                wrapped.get_random_layer_generator(order="top_down", seed=42)):
            if limit is not None and index >= limit:
                return
            yield name, randomized.eval()
