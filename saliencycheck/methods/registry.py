"""The registry of attribution methods: names → functions with validated parameters."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from saliencycheck.errors import ConfigError
from saliencycheck.methods.base import AttributionContext, AttributionFn
from saliencycheck.suggest import did_you_mean, not_one_of

ReferenceFn = Callable[..., Tensor | None]  # (inputs, context, **params) -> the reference
# input x′ (None: not complete with these parameters)


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def default_label(self, name: str) -> str:
        """The label results carry when the config gives none: the method's name."""
        return name


class NoParams(MethodParams):
    """For methods without parameters."""


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, its parameter model and a one-line description."""

    name: str
    fn: AttributionFn
    params: type[MethodParams]
    description: str
    plan: Any = None  # PlanFn of methods built on shared passes (saliencycheck.engine.passes)
    reference: ReferenceFn | None = None  # x′ with Σ attributions = f(x) − f(x′) (completeness)


@dataclass(frozen=True)
class ResolvedMethod:
    """A method with validated parameters, ready to call; ``label`` names it in results."""

    name: str
    label: str
    spec: MethodSpec
    params: MethodParams

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        context: AttributionContext = AttributionContext(),  # noqa: B008 (frozen, immutable)
    ) -> Tensor:
        """The raw signed map, ``(N, C, H, W)`` or ``(N, 1, H, W)``; see ``methods.base``."""
        return self.spec.fn(model, inputs, targets, context, **dict(self.params))


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str, *, params: type[MethodParams] = NoParams, description: str, plan: Any = None,
    reference: ReferenceFn | None = None,
) -> Callable[[AttributionFn], AttributionFn]:
    """Decorator registering ``fn(model, inputs, targets, context, **params)`` under ``name``.

    ``reference(inputs, context, **params)``, for a method whose attributions sum to
    f(x) − f(x′), gives that x′: the completeness test checks the sum against it."""
    undocumented = [f for f, info in params.model_fields.items() if not info.description]
    if undocumented:
        raise TypeError(f"{params.__name__}: fields without a description: {undocumented}")

    def decorate(fn: AttributionFn) -> AttributionFn:
        if name in _REGISTRY:
            raise ValueError(f"attribution method {name!r} is already registered")
        _REGISTRY[name] = MethodSpec(name=name, fn=fn, params=params, description=description,
                                     plan=plan, reference=reference)
        return fn

    return decorate


def available_methods() -> list[MethodSpec]:
    """All registered methods, in registration order."""
    return list(_REGISTRY.values())


def complete_methods() -> list[str]:
    """The methods whose attributions sum to f(x) − f(x′) (``reference`` given)."""
    return [name for name, spec in _REGISTRY.items() if spec.reference is not None]


def get_method(name: str) -> MethodSpec:
    """The spec registered as ``name``; ConfigError listing the valid names otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}{did_you_mean(name, _REGISTRY)}; choose one "
                          f"of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def resolve_method(entry: str | Mapping[str, Any]) -> ResolvedMethod:
    """Validate a config entry: ``"gradient"`` or ``{"name": ..., "label": ..., **params}``.

    ``label`` names the method in results (default: the name). Raises ConfigError
    ``"<field>: <problem>"`` with the field path inside the entry, e.g. ``"steps: ..."``.
    """
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, Mapping):
        raise ConfigError(
            f"a method must be a name or a mapping with 'name', got {type(entry).__name__}"
        )
    given = dict(entry)
    name = given.pop("name", None)
    label = given.pop("label", None)
    if not isinstance(name, str):
        raise ConfigError(f"name: required, one of: {', '.join(_REGISTRY)}")
    if label is not None and not isinstance(label, str):
        raise ConfigError(f"label: must be a string, got {type(label).__name__}")
    try:
        spec = get_method(name)
    except ConfigError as err:
        raise ConfigError(f"name: {err}") from None
    try:
        params = spec.params.model_validate(given)
    except ValidationError as err:
        raise ConfigError(_first_error(err, spec)) from None
    return ResolvedMethod(name=name, label=label or params.default_label(name), spec=spec,
                          params=params)


def _first_error(err: ValidationError, spec: MethodSpec) -> str:
    """One line ``"<field path>: <message>"`` for the first pydantic error, with the fix."""
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "params"
    message = not_one_of(first) or " ".join(first["msg"].removeprefix("Value error, ").split())
    if first["type"] == "extra_forbidden":
        names = [info.alias or name for name, info in spec.params.model_fields.items()]
        message = (f"unknown parameter of {spec.name}{did_you_mean(field, names)}; it takes: "
                   f"{', '.join(names) or 'no parameters'}")
    return f"{field}: {message}"
