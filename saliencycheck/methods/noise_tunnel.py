"""SmoothGrad (Smilkov et al. 2017) and VarGrad (Adebayo et al. 2018) around any method."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor, nn

from saliencycheck.errors import ConfigError
from saliencycheck.methods.base import AttributionContext, check_call
from saliencycheck.methods.registry import (
    MethodParams,
    available_methods,
    register_method,
    resolve_method,
)

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


class SmoothGradParams(_NoiseParams):
    """Parameters of smoothgrad (defaults: the original recipe)."""

    samples: int = Field(50, ge=1, description="noisy copies per image (paper: 50)")


class VarGradParams(_NoiseParams):
    """Parameters of vargrad (defaults: the original recipe)."""

    samples: int = Field(25, ge=1, description="noisy copies per image (paper: 25)")


def noise_tunnel(
    model: nn.Module, inputs: Tensor, targets: Tensor, context: AttributionContext, *,
    of: str, of_params: dict[str, Any], samples: int, noise: float,
    statistic: Literal["mean", "variance"],
) -> Tensor:
    """Mean or population variance of ``of``'s maps over noisy copies; shape of ``of``'s maps.

    Copy s of image i is ``x_i + noise · (max x_i − min x_i) · ε_s``, with
    ``ε = randn((samples, C, H, W))`` (float32 on the CPU, then cast, so it depends on neither
    dtype nor device) from a generator seeded with ``context.seed``: the same
    ε_s for every image and every call, so a map depends neither on the other images in the
    batch nor on ``chunk_size``. The copies of ``chunk_size // samples`` images (at least one)
    go to the inner method in one call, which chunks them further.
    """
    inner = resolve_method({**of_params, "name": of})
    generator = torch.Generator().manual_seed(context.seed)
    eps = torch.randn((samples, *inputs.shape[1:]), generator=generator).to(inputs)
    flat = inputs.flatten(1)
    sigma = noise * (flat.amax(dim=1) - flat.amin(dim=1))
    group = max(1, context.chunk_size // samples)
    maps = []
    for x, t, s in zip(inputs.split(group), targets.split(group), sigma.split(group)):
        noisy = (x[:, None] + s[:, None, None, None, None] * eps[None]).flatten(0, 1)
        inner_maps = inner(model, noisy, t.repeat_interleave(samples), context)
        inner_maps = inner_maps.unflatten(0, (x.shape[0], samples))
        if statistic == "mean":
            maps.append(inner_maps.mean(dim=1))
        else:
            maps.append(inner_maps.var(dim=1, correction=0))
    return torch.cat(maps)


@register_method(
    "smoothgrad",
    params=SmoothGradParams,
    description="mean of a method's maps over noisy copies of the input",
)
def smoothgrad(
    model: nn.Module, inputs: Tensor, targets: Tensor, context: AttributionContext, *,
    of: str, of_params: dict[str, Any], samples: int, noise: float,
) -> Tensor:
    """SmoothGrad: the mean over ``samples`` noisy copies; see :func:`noise_tunnel`."""
    check_call(model, inputs, targets, "smoothgrad")
    return noise_tunnel(
        model, inputs, targets, context,
        of=of, of_params=of_params, samples=samples, noise=noise, statistic="mean",
    )


@register_method(
    "vargrad",
    params=VarGradParams,
    description="variance of a method's maps over noisy copies of the input",
)
def vargrad(
    model: nn.Module, inputs: Tensor, targets: Tensor, context: AttributionContext, *,
    of: str, of_params: dict[str, Any], samples: int, noise: float,
) -> Tensor:
    """VarGrad: the population variance (mean of squares − square of mean, as Captum's
    ``NoiseTunnel(nt_type="vargrad")``, computed two-pass) over noisy copies; see
    :func:`noise_tunnel`."""
    check_call(model, inputs, targets, "vargrad")
    return noise_tunnel(
        model, inputs, targets, context,
        of=of, of_params=of_params, samples=samples, noise=noise, statistic="variance",
    )
