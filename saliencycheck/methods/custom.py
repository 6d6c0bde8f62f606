"""A user-supplied attribution function, named in the config as ``"package.module:function"``,
or handed to ``saliencycheck.check`` as a callable (kept here, by a ``<memory>:`` name, for the
run in this process)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from saliencycheck.errors import ConfigError, MethodError
from saliencycheck.imports import import_callable
from saliencycheck.methods.base import AttributionContext, check_call
from saliencycheck.methods.registry import MethodParams, register_method

IN_MEMORY = "<memory>:"  # names of the functions handed over in memory
_FUNCTIONS: dict[str, Callable[..., Tensor]] = {}


def remember(fn: Callable[..., Tensor]) -> str:
    """The ``callable`` name under which the custom method finds ``fn`` in this process."""
    name = f"{IN_MEMORY}{getattr(fn, '__qualname__', type(fn).__name__)}#{id(fn)}"
    _FUNCTIONS[name] = fn
    return name


def forget(name: str) -> None:
    """Drop a remembered function once its run is over (its closure may hold large tensors)."""
    _FUNCTIONS.pop(name, None)


def _function(name: str) -> Callable[..., Tensor]:
    """The function a ``callable`` names: remembered, or imported (ValueError if neither)."""
    if name.startswith(IN_MEMORY):
        if name not in _FUNCTIONS:
            raise ValueError(f"{name!r} names a function handed to saliencycheck.check in "
                             "another process; name it 'package.module:function' instead")
        return _FUNCTIONS[name]
    return import_callable(name)


class CustomParams(MethodParams):
    """Parameters of custom: which function to import and its keyword arguments."""

    function: str = Field(
        alias="callable",
        description="'package.module:function' with signature fn(model, inputs, targets, "
        "**params) -> Tensor (N, C or 1, H, W); imported because the config names it",
    )
    params: dict[str, Any] = Field({}, description="keyword arguments passed to the function")

    @field_validator("function")
    @classmethod
    def _importable(cls, function: str) -> str:
        _function(function)
        return function


@register_method(
    "custom",
    params=CustomParams,
    description="a user function fn(model, inputs, targets, **params) -> map, "
    "named 'package.module:function'",
)
def custom(
    model: nn.Module, inputs: Tensor, targets: Tensor, context: AttributionContext, *,
    function: str, params: dict[str, Any],
) -> Tensor:
    """The user function's map, called with grad enabled on a detached copy of the inputs.

    The result must be a tensor (N, C or 1, H, W) matching the inputs; MethodError otherwise.
    The function does its own batching (``context`` is not passed).
    """
    check_call(model, inputs, targets, "custom")
    try:
        fn = _function(function)
    except ValueError as err:
        raise ConfigError(f"callable: {err}") from None
    with torch.enable_grad():
        maps = fn(model, inputs.detach().clone(), targets, **params)
    n, c, h, w = inputs.shape
    if not (isinstance(maps, Tensor) and maps.ndim == 4 and maps.shape[0] == n
            and maps.shape[1] in (c, 1) and maps.shape[2:] == inputs.shape[2:]):
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise MethodError(
            f"custom method {function} returned {got}; it must return a tensor "
            f"({n}, {c} or 1, {h}, {w}) like the inputs"
        )
    return maps.detach()
