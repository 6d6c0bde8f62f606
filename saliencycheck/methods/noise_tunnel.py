"""SmoothGrad (Smilkov et al. 2017) and VarGrad (Adebayo et al. 2018) around any method."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor, nn

from saliencycheck.engine.passes import (
    GroupSum,
    GroupTotal,
    MethodPlan,
    Request,
    RowSource,
    planned_method,
)
from saliencycheck.errors import ConfigError
from saliencycheck.methods.base import AttributionContext
from saliencycheck.methods.registry import MethodParams, available_methods, resolve_method
from saliencycheck.sections import MAX_SAMPLES, at_most

_WRAPPERS = ("smoothgrad", "vargrad")


class _NoiseParams(MethodParams):
    """Parameters shared by smoothgrad and vargrad."""

    of: str = Field("gradient", description="the method averaged over noisy inputs")
    of_params: dict[str, Any] = Field({}, description="parameters of that method")
    noise: float = Field(
        0.15, ge=0, description="noise σ as a fraction of each input's (max − min) (paper: 0.15)"
    )

    @field_validator("of")
    @classmethod
    def _known_method(cls, of: str) -> str:
        inner = [spec.name for spec in available_methods() if spec.name not in _WRAPPERS]
        if of not in inner:
            raise ValueError(
                f"unknown or unsupported method {of!r}; choose one of: {', '.join(inner)}"
            )
        return of

    @field_validator("of_params")
    @classmethod
    def _valid_inner_params(cls, of_params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if {"name", "label"} & of_params.keys():
            raise ValueError("give the inner method's name in 'of', not in of_params")
        if "of" in info.data:
            try:
                resolve_method({**of_params, "name": info.data["of"]})
            except ConfigError as err:
                raise ConfigError(f"of_params.{err}") from None
        return of_params


    @field_validator("samples", check_fields=False)
    @classmethod
    def _few_samples(cls, samples: int) -> int:
        return at_most(samples, MAX_SAMPLES, typical="typical: 25 to 50, the papers' values; "
                       "each copy is a forward and backward pass per image")


class SmoothGradParams(_NoiseParams):
    """Parameters of smoothgrad (defaults: the original recipe)."""

    samples: int = Field(50, ge=1, description="noisy copies per image (paper: 50)")


class VarGradParams(_NoiseParams):
    """Parameters of vargrad (defaults: the original recipe)."""

    samples: int = Field(25, ge=1, description="noisy copies per image (paper: 25)")


def noisy_source(source: RowSource, context: AttributionContext, *, samples: int,
                 noise: float) -> RowSource:
    """``samples`` noisy copies of every row, image-major (row ``i·samples + s``).

    Copy s of image i is ``x_i + noise · (max x_i − min x_i) · ε_s``, with
    ``ε = randn((samples, C, H, W))`` (float32 on the CPU, then cast, so it depends on neither
    dtype nor device) from a generator seeded with ``context.seed``: the same ε_s for every
    image, every call and every model, so a map depends neither on the other images in the
    batch nor on ``chunk_size``, and smoothgrad and vargrad with equal samples and noise share
    their noisy rows.
    """
    example, _ = source.build(torch.arange(1))
    generator = torch.Generator().manual_seed(context.seed)
    eps = torch.randn((samples, *example.shape[1:]), generator=generator).to(example)

    def build(index: Tensor) -> tuple[Tensor, Tensor]:
        inputs, targets = source.build(index // samples)
        flat = inputs.flatten(1)
        sigma = noise * (flat.amax(dim=1) - flat.amin(dim=1))
        return inputs + sigma.view(-1, 1, 1, 1) * eps[(index % samples).to(eps.device)], targets

    return RowSource(key=("noise", source.key, samples, noise, context.seed),
                     count=source.count * samples, build=build)


def noise_tunnel(
    model: nn.Module, source: RowSource, context: AttributionContext, *,
    of: str, of_params: dict[str, Any], samples: int, noise: float,
    statistic: Literal["mean", "variance"],
) -> MethodPlan:
    """Mean or population variance of ``of``'s maps over the noisy copies of
    :func:`noisy_source`; shape of ``of``'s maps. A planned inner method's rows join the shared
    passes; any other (``custom``) is called on the noisy copies directly."""
    inner = resolve_method({**of_params, "name": of})
    noisy = noisy_source(source, context, samples=samples, noise=noise)
    if of == "gradient" and statistic == "mean":  # linear in the gradients: summed in the
        total = GroupTotal(count=source.count)      # pass (before the stem, if there is one)
        consumer = GroupSum(total, samples, [1 / samples] * samples)
        return MethodPlan([Request("plain", noisy, consumer, "smoothgrad")], consumer.result)
    if inner.spec.plan is not None:
        plan = inner.spec.plan(model, noisy, context, **dict(inner.params))
        requests, inner_maps = plan.requests, plan.finish
    else:
        requests = []

        def inner_maps() -> Tensor:
            inputs, targets = noisy.build(torch.arange(noisy.count))
            return inner(model, inputs, targets, context)

    def finish() -> Tensor:
        maps = inner_maps().unflatten(0, (source.count, samples))
        return maps.mean(dim=1) if statistic == "mean" else maps.var(dim=1, correction=0)

    return MethodPlan(requests, finish)


@planned_method(
    "smoothgrad",
    params=SmoothGradParams,
    description="mean of a method's maps over noisy copies of the input",
)
def smoothgrad(
    model: nn.Module, source: RowSource, context: AttributionContext, *,
    of: str, of_params: dict[str, Any], samples: int, noise: float,
) -> MethodPlan:
    """SmoothGrad: the mean over ``samples`` noisy copies; see :func:`noise_tunnel`."""
    return noise_tunnel(model, source, context, of=of, of_params=of_params, samples=samples,
                        noise=noise, statistic="mean")


@planned_method(
    "vargrad",
    params=VarGradParams,
    description="variance of a method's maps over noisy copies of the input",
)
def vargrad(
    model: nn.Module, source: RowSource, context: AttributionContext, *,
    of: str, of_params: dict[str, Any], samples: int, noise: float,
) -> MethodPlan:
    """VarGrad: the population variance (mean of squares − square of mean, as Captum's
    ``NoiseTunnel(nt_type="vargrad")``, computed two-pass) over noisy copies; see
    :func:`noise_tunnel`."""
    return noise_tunnel(model, source, context, of=of, of_params=of_params, samples=samples,
                        noise=noise, statistic="variance")
