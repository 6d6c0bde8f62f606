"""Shared forward/backward passes: several methods' rows differentiated in the same passes.

A sanity-check run is (stages × images × methods) forward and backward passes, so the work
that matters is the number of rows pushed through the model. Methods built on the input
gradient describe *which rows* they need (:class:`Rows`: the images themselves, integration
points, noisy copies) and *what they do with each row's gradient* (a :class:`Consumer`). The
engine merges the requests of all methods of a batch: identical rows (same ``key``) are
computed once — gradient, gradient×input and Grad-CAM all read the same forward/backward of
the images — and rows of the same backward rule (``family``) share passes of ``chunk_size``
rows, built chunk by chunk so memory does not grow with steps or samples.

Families: ``plain`` autograd, ``guided`` and ``deconvnet`` (the ReLU rules of
:mod:`saliencycheck.relu_rules`). Grad-CAM reads (activation, gradient) pairs captured at a
layer during the plain pass of the images.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from saliencycheck.errors import MethodError
from saliencycheck.methods.base import AttributionContext, check_call, target_logits
from saliencycheck.methods.registry import (
    MethodParams,
    NoParams,
    ResolvedMethod,
    register_method,
)
from saliencycheck.models import get_submodule
from saliencycheck.relu_rules import ReluRuleMode

Family = Literal["plain", "guided", "deconvnet"]
LayerPair = tuple[Tensor, Tensor]  # (activation, ∂ score / ∂ activation) of one layer


class ReluRuleWarning(UserWarning):
    """A modified-backward method met activations other than ReLU and left them unmodified."""


@dataclass(frozen=True)
class RowSource:
    """A virtual batch of inputs: ``count`` rows, built on demand for any row indices."""

    key: Hashable
    count: int
    build: Callable[[Tensor], tuple[Tensor, Tensor]]  # row indices -> (inputs, targets)

    @staticmethod
    def of(inputs: Tensor, targets: Tensor) -> RowSource:
        """The images themselves: rows are ``inputs[i]`` explaining ``targets[i]``."""
        return RowSource(key=("images",), count=inputs.shape[0],
                         build=lambda index: (inputs[index], targets[index]))


class Consumer(Protocol):
    """Receives the gradients of its rows, chunk by chunk, and returns a result at the end."""

    layer: str | None  # capture (activation, gradient) at this layer for these rows

    def add(self, index: Tensor, inputs: Tensor, grads: Tensor,
            pair: LayerPair | None) -> None: ...

    def result(self) -> Tensor: ...


@dataclass
class Request:
    """Rows of one ``family`` and the consumer of their gradients (``name`` for messages)."""

    family: Family
    source: RowSource
    consumer: Consumer
    name: str


@dataclass
class RowMaps:
    """A consumer turning each row into a map with ``fn`` and stacking them: (count, ...)."""

    fn: Callable[[Tensor, Tensor, LayerPair | None], Tensor]  # (inputs, grads, pair) -> maps
    count: int
    layer: str | None = None
    _maps: Tensor | None = field(default=None, repr=False)

    def add(self, index: Tensor, inputs: Tensor, grads: Tensor, pair: LayerPair | None) -> None:
        maps = self.fn(inputs, grads, pair)
        if self._maps is None:
            self._maps = maps.new_zeros((self.count, *maps.shape[1:]))
        self._maps[index] = maps

    def result(self) -> Tensor:
        return self._maps


def input_gradient_maps(count: int) -> RowMaps:
    """The plain consumer: each row's input gradient."""
    return RowMaps(fn=lambda inputs, grads, pair: grads, count=count)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ChunkSize:
    """Rows per pass; halved for the rest of the call after a CUDA out-of-memory error."""

    rows: int
    halvings: int = 0


def run_requests(model: nn.Module, requests: Sequence[Request],
                 context: AttributionContext) -> ChunkSize:
    """Differentiate every request's rows, sharing rows with equal keys and passes per family.

    Returns the chunk size finally used (smaller than ``context.chunk_size`` after an
    out-of-memory error: the failed chunk is split and recomputed, nothing is lost).
    """
    size = ChunkSize(context.chunk_size)
    for family in ("plain", "guided", "deconvnet"):
        selected = [r for r in requests if r.family == family]
        if selected:
            _run_family(model, family, selected, size=size, precision=context.precision)
    return size


@dataclass
class _Segment:
    source: RowSource
    consumers: list[Consumer]
    names: list[str]


def _run_family(model: nn.Module, family: Family, requests: list[Request], *,
                size: ChunkSize, precision: str) -> None:
    segments: dict[Hashable, _Segment] = {}
    for request in requests:
        segment = segments.setdefault(request.source.key, _Segment(request.source, [], []))
        segment.consumers.append(request.consumer)
        segment.names.append(request.name)
    layers = sorted({c.layer for s in segments.values() for c in s.consumers if c.layer})
    modules = {path: get_submodule(model, path, field="layer") for path in layers}
    mode = ReluRuleMode(family) if family != "plain" else None
    context = (lambda: mode) if mode is not None else nullcontext

    def run_chunk(pieces: list[tuple[_Segment, Tensor]]) -> None:
        built = [segment.source.build(index) for segment, index in pieces]
        x = torch.cat([b[0] for b in built]).detach().clone().requires_grad_(True)
        t = torch.cat([b[1] for b in built])
        captured: dict[str, list[Tensor]] = {path: [] for path in layers}
        handles = [modules[path].register_forward_hook(_capture(path, captured[path]))
                   for path in layers]
        try:
            with context(), _autocast(x.device, precision):
                score = target_logits(model, x, t).float().sum()
        finally:
            for handle in handles:
                handle.remove()
        activations = [_last_activation(path, captured[path]) for path in layers]
        grads = torch.autograd.grad(score, [x, *activations], allow_unused=True)
        pairs = {}
        for path, a, g in zip(layers, activations, grads[1:]):
            if g is None:
                raise MethodError(f"gradcam: layer {path!r} does not affect the logits; "
                                  "choose another")
            pairs[path] = (a.detach().float(), g.float())
        start = 0
        for segment, index in pieces:
            rows = slice(start, start + len(index))
            start += len(index)
            for consumer in segment.consumers:
                pair = None
                if consumer.layer:
                    a, g = pairs[consumer.layer]
                    pair = (a[rows], g[rows])
                consumer.add(index, x[rows].detach(), grads[0][rows], pair)

    def run_with_retry(pieces: list[tuple[_Segment, Tensor]]) -> None:
        try:
            run_chunk(pieces)
        except torch.cuda.OutOfMemoryError:
            rows = sum(len(index) for _, index in pieces)
            if rows == 1:
                raise MethodError("out of device memory for a single row; use a smaller "
                                  "images.size or another device") from None
            torch.cuda.empty_cache()
            size.rows, size.halvings = max(1, rows // 2), size.halvings + 1
            for half in _split(pieces, size.rows):
                run_with_retry(half)

    with torch.enable_grad():
        for pieces in _chunks(list(segments.values()), size):
            run_with_retry(pieces)
    if mode is not None:
        _check_relu_report(mode, sorted({n for s in segments.values() for n in s.names}))


def _chunks(segments: list[_Segment], size: ChunkSize):
    """Yield lists of (segment, row indices) of at most ``size.rows`` rows in all (read anew
    for every chunk, so a halving after an out-of-memory error applies to the rest)."""
    pieces, room = [], size.rows
    for segment in segments:
        start = 0
        while start < segment.source.count:
            take = min(room, segment.source.count - start)
            pieces.append((segment, torch.arange(start, start + take)))
            start += take
            room -= take
            if room == 0:
                yield pieces
                pieces, room = [], size.rows
    if pieces:
        yield pieces


def _split(pieces: list[tuple[_Segment, Tensor]], rows: int):
    """Re-cut a chunk's pieces into chunks of at most ``rows`` rows, in order."""
    out, room = [], rows
    for segment, index in pieces:
        while len(index):
            take = index[:room]
            out.append((segment, take))
            index, room = index[room:], room - len(take)
            if room == 0:
                yield out
                out, room = [], rows
    if out:
        yield out


def _autocast(device: torch.device, precision: str):
    """``torch.autocast`` for bf16/fp16 forwards; nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def _capture(path: str, store: list[Tensor]):
    """Forward hook keeping the layer's own output and passing a clone downstream, so a later
    in-place op (DenseNet's ``F.relu(features, inplace=True)``) cannot overwrite it."""

    def hook(module: nn.Module, args: object, output: object) -> Tensor:
        if not (isinstance(output, Tensor) and output.ndim == 4):
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise MethodError(f"gradcam: layer {path!r} outputs {got}, not a (N, K, h, w) "
                              "feature map; choose a convolutional layer")
        store.append(output)
        return output.clone()

    return hook


def _last_activation(path: str, store: list[Tensor]) -> Tensor:
    if not store:
        raise MethodError(f"gradcam: layer {path!r} did not run in the forward; choose another")
    return store[-1]  # a layer run several times in one forward: its last call


def _check_relu_report(mode: ReluRuleMode, names: list[str]) -> None:
    report = mode.report()
    who = ", ".join(names)
    others = ", ".join(f"{act}×{n}" for act, n in sorted(report.other_activations.items()))
    if report.relu_calls == 0:
        found = f" (it applies {others})" if others else ""
        raise MethodError(
            f"{who}: the model applies no ReLU{found}, so the modified backward is undefined; "
            "use gradient or integrated_gradients instead"
        )
    if others:
        warnings.warn(
            f"{who}: the rule applies to ReLU only; other activations kept their plain "
            f"gradient ({others}, counted over all chunks)",
            ReluRuleWarning,
            stacklevel=4,
        )


@dataclass
class MethodPlan:
    """A method's requests and how to turn their consumers' results into its maps."""

    requests: list[Request]
    finish: Callable[[], Tensor]


class PlanFn(Protocol):
    """``plan(model, source, context, **params) -> MethodPlan``: the shared-pass form."""

    def __call__(self, model: nn.Module, source: RowSource, context: AttributionContext,
                 **params: object) -> MethodPlan: ...


def planned_method(name: str, *, params: type[MethodParams] = NoParams, description: str):
    """Register a method given as a plan; its plain ``fn`` runs the plan alone."""

    def decorate(plan: PlanFn) -> PlanFn:
        def fn(model: nn.Module, inputs: Tensor, targets: Tensor, context: AttributionContext,
               **options: object) -> Tensor:
            check_call(model, inputs, targets, name)
            method_plan = plan(model, RowSource.of(inputs, targets), context, **options)
            run_requests(model, method_plan.requests, context)
            return method_plan.finish()

        fn.__doc__ = plan.__doc__
        fn.__name__ = name
        register_method(name, params=params, description=description, plan=plan)(fn)
        return plan

    return decorate


def compute_maps(
    methods: Sequence[ResolvedMethod],
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    context: AttributionContext,
) -> dict[str, Tensor]:
    """Raw maps of every method, keyed by label, with passes shared between methods.

    Planned methods' rows go through :func:`run_requests` together; others (``custom``) are
    called as they are. Equal to calling each method alone, up to float summation order.
    """
    check_call(model, inputs, targets, ", ".join(m.label for m in methods))
    source = RowSource.of(inputs, targets)
    plans = {m.label: m.spec.plan(model, source, context, **dict(m.params))
             for m in methods if m.spec.plan is not None}
    run_requests(model, [r for plan in plans.values() for r in plan.requests], context)
    return {m.label: plans[m.label].finish() if m.label in plans
            else m(model, inputs, targets, context) for m in methods}
