"""Shared forward/backward passes: several methods' rows differentiated in the same passes.

A sanity-check run is (stages × images × methods) forward and backward passes, so the work
that matters is the number of rows pushed through the model. Methods built on the input
gradient describe *which rows* they need (:class:`Rows`: the images themselves, integration
points, noisy copies) and *what they do with each row's gradient* (a :class:`Consumer`). The
engine merges the requests of all methods of a batch: identical rows (same ``key``) are
computed once — gradient, gradient×input and Grad-CAM all read the same forward/backward of
the images — and rows of the same backward rule (``family``) share passes of ``chunk_size``
rows, built chunk by chunk so memory does not grow with steps or samples.

Families: ``plain`` autograd; :class:`ReluFamily`, the guided and deconvnet rules of
:mod:`saliencycheck.relu_rules` (with a ``nonlinearity_rule``); :class:`LrpFamily`, the rules of
:mod:`saliencycheck.lrp_rules`; ``forward``, rows that need only their target logit (occlusion):
forward passes without autograd, whose consumers receive each row's logit in place of a
gradient. Grad-CAM reads (activation, gradient) pairs captured at a layer during the plain pass
of the images.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import chain
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from saliencycheck.engine.eval_norm import EvalBatchNormMode
from saliencycheck.engine.fp32 import exact_fp32
from saliencycheck.engine.prefix import (
    CallTrace,
    PrefixCache,
    carry_to_input,
    prefix_modules,
    stubbed_within,
)
from saliencycheck.engine.stem import find_affine_stem, pull_back
from saliencycheck.errors import MethodError
from saliencycheck.lrp_rules import LrpMode, LrpRules, check_lrp_report
from saliencycheck.methods.base import (
    AttributionContext,
    check_call,
    model_logits,
    select_targets,
)
from saliencycheck.methods.registry import (
    MethodParams,
    NoParams,
    ReferenceFn,
    ResolvedMethod,
    register_method,
)
from saliencycheck.models import get_submodule
from saliencycheck.relu_rules import NonlinearityRule, ReluRuleMode, Rule


@dataclass(frozen=True)
class ReluFamily:
    """Rows differentiated under a ReLU rule (:mod:`saliencycheck.relu_rules`)."""

    rule: Rule
    nonlinearity_rule: NonlinearityRule = "relu_only"
    prefix_cache = True  # the rule is the same in a stubbed prefix's kept graph

    def mode(self) -> ReluRuleMode:
        return ReluRuleMode(self.rule, self.nonlinearity_rule)

    def finish(self, mode: ReluRuleMode, names: list[str]) -> None:
        _check_relu_report(mode, names)


@dataclass(frozen=True)
class LrpFamily:
    """Rows differentiated under LRP rules (:mod:`saliencycheck.lrp_rules`)."""

    rules: LrpRules
    # Off: a batch norm merged into the layer before it (one rule for the pair) would see a
    # stub instead of that layer's output when the prefix ends between them.
    prefix_cache = False

    def mode(self) -> LrpMode:
        return LrpMode(self.rules)

    def finish(self, mode: LrpMode, names: list[str]) -> None:
        check_lrp_report(mode.report(), names, relevance_at_input=self.rules.relevance_at_input,
                         category=ReluRuleWarning)


# "plain" autograd, "forward" only (no backward), or a modified backward (its mode, its checks
# after the passes)
Family = Literal["plain", "forward"] | ReluFamily | LrpFamily
LayerPair = tuple[Tensor, Tensor]  # (activation, ∂ score / ∂ activation) of one layer


def ruled_family(rule: Rule, nonlinearity_rule: NonlinearityRule = "relu_only") -> ReluFamily:
    """The family of rows differentiated under ``rule`` with ``nonlinearity_rule``."""
    return ReluFamily(rule, nonlinearity_rule)


class ReluRuleWarning(UserWarning):
    """A modified-backward method met activations other than ReLU and left them unmodified."""


IMAGES_KEY: Hashable = ("images",)  # the source key of the images themselves


@dataclass(frozen=True)
class RowSource:
    """A virtual batch of inputs: ``count`` rows, built on demand for any row indices."""

    key: Hashable
    count: int
    build: Callable[[Tensor], tuple[Tensor, Tensor]]  # row indices -> (inputs, targets)

    @staticmethod
    def of(inputs: Tensor, targets: Tensor) -> RowSource:
        """The images themselves: rows are ``inputs[i]`` explaining ``targets[i]``."""
        return RowSource(key=IMAGES_KEY, count=inputs.shape[0],
                         build=lambda index: (inputs[index], targets[index]))


class Consumer(Protocol):
    """Receives the gradients of its rows, chunk by chunk, and returns a result at the end.

    ``needs_grads`` False: only the layer pair is read (``grads`` may be None). A consumer
    that needs only group sums of its rows' gradients (:class:`GroupSum`) lets the engine add
    them up before the model's affine stem (:mod:`saliencycheck.engine.stem`).
    """

    layer: str | None  # capture (activation, gradient) at this layer for these rows
    needs_grads: bool

    def add(self, index: Tensor, inputs: Tensor, grads: Tensor | None,
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

    fn: Callable[[Tensor, Tensor | None, LayerPair | None], Tensor]  # (inputs, grads, pair)
    count: int
    layer: str | None = None
    needs_grads: bool = True
    _maps: Tensor | None = field(default=None, repr=False)

    def add(self, index: Tensor, inputs: Tensor, grads: Tensor | None,
            pair: LayerPair | None) -> None:
        maps = self.fn(inputs, grads, pair)
        if self._maps is None:
            self._maps = maps.new_zeros((self.count, *maps.shape[1:]))
        self._maps[index] = maps

    def result(self) -> Tensor:
        return self._maps


@dataclass
class GroupTotal:
    """Per-group sums ``(count, ...)``, added to chunk by chunk (shared by several consumers)."""

    count: int
    value: Tensor | None = field(default=None, repr=False)

    def add(self, groups: Tensor, sums: Tensor) -> None:
        if self.value is None:
            self.value = sums.new_zeros((self.count, *sums.shape[1:]))
        self.value.index_add_(0, groups.to(sums.device), sums)


@dataclass
class GroupSum:
    """Consumer adding ``w_k ∇f(row)`` of rows ``g·size + k`` into group ``g`` of a total: the
    integral of integrated gradients, the mean of SmoothGrad. Linear in the gradients, so the
    engine may form the sums at the output of an affine stem and pull back only those."""

    total: GroupTotal
    size: int
    weights: Sequence[float]
    layer: str | None = None
    needs_grads: bool = True

    def weighted(self, index: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        """(group of each row, ``w_k ·`` its gradient)."""
        weights = torch.as_tensor(self.weights, dtype=grads.dtype)[index % self.size]
        return index // self.size, grads * weights.to(grads.device).view(
            -1, *([1] * (grads.ndim - 1)))

    def add(self, index: Tensor, inputs: Tensor, grads: Tensor | None,
            pair: LayerPair | None) -> None:
        self.total.add(*self.weighted(index, grads))

    def add_sums(self, groups: Tensor, sums: Tensor) -> None:
        """Sums already formed over the rows of each of ``groups``."""
        self.total.add(groups, sums)

    def result(self) -> Tensor:
        return self.total.value


def input_gradient_maps(count: int) -> RowMaps:
    """The plain consumer: each row's input gradient."""
    return RowMaps(fn=lambda inputs, grads, pair: grads, count=count)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ChunkSize:
    """Rows per pass; halved for the rest of the call after a CUDA out-of-memory error."""

    rows: int
    halvings: int = 0


@dataclass
class KeptLogits:
    """The full logits (count, classes) of the rows of source ``key``, kept as the passes
    compute them, so a caller needs no forward of its own to see how a state moves them."""

    key: Hashable
    count: int
    value: Tensor | None = field(default=None, repr=False)

    def add(self, index: Tensor, logits: Tensor) -> None:
        if self.value is None:
            self.value = logits.new_zeros((self.count, logits.shape[1]))
        self.value[index.to(logits.device)] = logits


@dataclass
class StageRequests:
    """The requests of one model state: ``enter()`` puts the working model in that state and
    returns it; ``randomized`` names the modules this state changed (for the prefix cache);
    ``logits``, if given, receives the logits of its source's rows (left empty when no
    request reads that source)."""

    enter: Callable[[], nn.Module]
    requests: list[Request]
    randomized: tuple[str, ...] = ()
    logits: KeptLogits | None = None


def run_requests(model: nn.Module, requests: Sequence[Request],
                 context: AttributionContext) -> ChunkSize:
    """Differentiate every request's rows, sharing rows with equal keys and passes per family.

    Returns the chunk size finally used (smaller than ``context.chunk_size`` after an
    out-of-memory error: the failed chunk is split and recomputed, nothing is lost).
    """
    return run_staged([StageRequests(lambda: model, list(requests))], context)


def run_staged(stages: Sequence[StageRequests], context: AttributionContext,
               trace: CallTrace | None = None, *,
               progress: Callable[[float], None] | None = None) -> ChunkSize:
    """:func:`run_requests` for several states of one model, chunk-major and stage-minor.

    ``stages[0]`` is the reference (trained) state; the others must request the same rows
    (same source keys and counts; targets may differ). Each chunk of rows is built once and
    pushed through every stage in turn. With a ``trace`` (:func:`~saliencycheck.engine.prefix.
    trace_calls` of the model), the reference forward of the chunk is recorded and kept, and
    each later stage stubs the modules it leaves unchanged (:mod:`saliencycheck.engine.prefix`), so
    only the changed suffix runs forward; gradients reach the input through the kept graph.
    ``progress`` receives the share of the whole call's rows × stages done, as it goes.
    """
    size = ChunkSize(context.chunk_size)
    order = ["plain"] + list(dict.fromkeys(r.family for r in stages[0].requests
                                           if r.family != "plain"))
    families = {family: [[r for r in stage.requests if r.family == family] for stage in stages]
                for family in order}
    total = sum(len(stages) * s.source.count for selected in families.values()
                for s in _segments(selected[0]).values())
    wanted = {stage.logits.key for stage in stages if stage.logits is not None}
    with exact_fp32(context.precision == "fp32"):
        for family, selected in families.items():
            if selected[0]:
                keys = {r.source.key for r in selected[0]}
                _run_family(stages, family, selected, size=size, precision=context.precision,
                            affine_stem=context.affine_stem, keep_logits=bool(wanted & keys),
                            trace=trace, progress=(lambda rows: progress(rows / total))
                            if progress else None)
                wanted -= keys  # one family's forward is enough: the ReLU rules change none
    return size


@dataclass
class _Segment:
    source: RowSource
    consumers: list[Consumer]
    names: list[str]


def _segments(requests: list[Request]) -> dict[Hashable, _Segment]:
    segments: dict[Hashable, _Segment] = {}
    for request in requests:
        segment = segments.setdefault(request.source.key, _Segment(request.source, [], []))
        segment.consumers.append(request.consumer)
        segment.names.append(request.name)
    return segments


Piece = tuple[Hashable, Tensor]  # (source key, row indices)


def _run_family(stages: Sequence[StageRequests], family: Family,
                requests: list[list[Request]], *, size: ChunkSize, precision: str,
                affine_stem: bool, keep_logits: bool, trace: CallTrace | None,
                progress: Callable[[int], None] | None) -> None:
    per_stage = [_segments(r) for r in requests]
    base = per_stage[0]
    for index, segments in enumerate(per_stage[1:], start=1):
        if {k: s.source.count for k, s in segments.items()} != \
                {k: s.source.count for k, s in base.items()}:
            raise ValueError(f"stage {index} requests other rows than the reference stage")
    layers = sorted({c.layer for segments in per_stage for s in segments.values()
                     for c in s.consumers if c.layer})
    model = stages[0].enter()
    modules = {path: get_submodule(model, path, field="layer") for path in layers}
    ruled = not isinstance(family, str)  # a modified backward: ReluFamily or LrpFamily
    cached = trace is not None and (not ruled or family.prefix_cache)
    prefixes = [()] + [prefix_modules(trace, stage.randomized, visible=layers)
                       if cached else () for stage in stages[1:]]
    cache = PrefixCache(model, chain.from_iterable(prefixes),
                        modifiers=trace.modifiers) if any(prefixes) else None
    mode = family.mode() if ruled else None
    relu_rules = (lambda: mode) if mode is not None else nullcontext
    stem_paths = _stem_worth_pulling_back(model, base, per_stage) if affine_stem else ()
    stem = [model.get_submodule(path) for path in stem_paths]
    # stages whose stem runs (not stubbed, by itself or by an ancestor)
    stem_runs = [bool(stem) and not stubbed_within(stem_paths[-1], prefix)
                 for prefix in prefixes]

    def forward(x: Tensor, targets: Tensor, stage: int, pieces: list[Piece]
                ) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """Each row's target logit, the layers' activations and the stem's output (None
        when the stem did not run: stubbed by the prefix cache); the stage's kept logits
        receive their rows."""
        captured: dict[str, list[Tensor]] = {path: [] for path in layers}
        stem_out: list[Tensor] = []
        handles = [modules[path].register_forward_hook(_capture(path, captured[path]))
                   for path in layers]
        if stem_runs[stage]:  # ahead of the prefix cache's and Grad-CAM's hooks: they see
            # its clone
            handles.append(stem[-1].register_forward_hook(_keep(stem_out), prepend=True))
        try:
            with EvalBatchNormMode(), relu_rules(), _autocast(x.device, precision):
                out = model_logits(model, x)
                scores = select_targets(out, targets)  # at least fp32 under autocast
                scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        finally:
            for handle in handles:
                handle.remove()
        kept = stages[stage].logits
        if keep_logits and kept is not None:
            start = 0
            for key, index in pieces:
                if key == kept.key:
                    kept.add(index, out[start:start + len(index)].detach().float())
                start += len(index)
        return (scores, [_last_activation(path, captured[path]) for path in layers],
                stem_out[-1] if stem_out else None)

    def deliver(stage: int, pieces: list[Piece], x: Tensor, grad: Tensor,
                activations: list[Tensor], layer_grads: Sequence[Tensor | None]) -> None:
        """Hand each consumer its rows. ``grad`` is the gradient at the input, or with a
        stem at the stem's output: group sums are formed there and pulled back with the rows
        that per-row consumers need, in one pass through the stem."""
        pairs = {}
        for path, a, g in zip(layers, activations, layer_grads):
            if g is None:
                raise MethodError(f"gradcam: layer {path!r} does not affect the logits; "
                                  "choose another")
            pairs[path] = (a.detach().float(), g.float())
        per_row: list[tuple[Consumer, Tensor, slice, LayerPair | None]] = []
        sums: list[tuple[GroupSum, Tensor, Tensor]] = []
        if stem:
            grad = grad.to(x.dtype)
        start = 0
        for key, index in pieces:
            rows = slice(start, start + len(index))
            start += len(index)
            for consumer in per_stage[stage][key].consumers:
                if stem and isinstance(consumer, GroupSum):
                    sums.append((consumer, *_group_sums(consumer, index, grad[rows])))
                    continue
                pair = None
                if consumer.layer:
                    a, g = pairs[consumer.layer]
                    pair = (a[rows], g[rows])
                per_row.append((consumer, index, rows, pair))
        row_grads: dict[tuple[int, int], Tensor] = {}
        if stem:
            needed = sorted({(r.start, r.stop) for c, _, r, _ in per_row if c.needs_grads})
            parts = [grad[a:b] for a, b in needed] + [summed for _, _, summed in sums]
            if parts:
                pulled = pull_back(stem, torch.cat(parts), x).split([len(p) for p in parts])
                row_grads = dict(zip(needed, pulled))
                for (consumer, groups, _), summed in zip(sums, pulled[len(needed):]):
                    consumer.add_sums(groups, summed)
        for consumer, index, rows, pair in per_row:
            rows_grad = row_grads.get((rows.start, rows.stop)) if stem else grad[rows]
            consumer.add(index, x[rows], rows_grad, pair)

    def targets_of(stage: int, pieces: list[Piece]) -> Tensor:
        return torch.cat([per_stage[stage][key].source.build(index)[1] for key, index in pieces])

    def run_chunk(pieces: list[Piece], first: int, reached: list[int]) -> None:
        """Stages ``first``.. of one chunk (stage 0's forward is always run: the prefix).
        Gradients are taken at the input, or at the stem's output when there is a stem."""
        x = torch.cat([base[key].source.build(index)[0] for key, index in pieces])
        x = x.detach().clone().requires_grad_(True)
        recorded: dict[str, list[Tensor]] = {}
        reference = None  # the stem's output in the reference forward
        for stage in [0, *range(max(first, 1), len(stages))]:
            if stages[stage].enter() is not model:
                raise ValueError("every stage must enter the same working model")
            if stage == 0 and first > 0 and cache is None:
                continue  # nothing to replay from the reference forward
            if stage == 0:
                recording = cache.record() if cache is not None else nullcontext({})
                with recording as recorded:
                    scores, activations, reference = forward(x, targets_of(0, pieces), 0,
                                                              pieces)
                if first > 0:
                    continue
                point = reference if stem else x
                grads = torch.autograd.grad(scores.sum(), [point, *activations],
                                            allow_unused=True,
                                            retain_graph=cache is not None)
                grad, layer_grads = grads[0], grads[1:]
            else:
                stubbing = cache.stub(prefixes[stage], recorded, grad=True) \
                    if cache is not None else nullcontext([])
                with stubbing as leaves:
                    scores, activations, own_stem = forward(x, targets_of(stage, pieces),
                                                             stage, pieces)
                point = own_stem if stem else x  # None: the stem was stubbed
                ends = [point] if point is not None else []
                grads = torch.autograd.grad(scores.sum(), [*ends, *activations,
                                                    *(leaf for leaf, _ in leaves)],
                                            allow_unused=True)
                layer_grads = grads[len(ends):len(ends) + len(layers)]
                carried = carry_to_input(
                    [(r, g) for (_, r), g in zip(leaves, grads[len(ends) + len(layers):])],
                    reference if stem else x)
                own = grads[0] if ends else None
                grad = own if carried is None else carried if own is None else own + carried
            if grad is None:
                grad = torch.zeros_like(point if point is not None else reference)
            deliver(stage, pieces, x.detach(), grad, activations, layer_grads)
            reached[0] = stage + 1
            if progress is not None:
                progress(len(x))

    def run_forward_chunk(pieces: list[Piece], first: int, reached: list[int]) -> None:
        """:func:`run_chunk` for the ``forward`` family: no autograd; each consumer receives
        its rows' target logits where the others receive gradients."""
        x = torch.cat([base[key].source.build(index)[0] for key, index in pieces])
        recorded: dict[str, list[Tensor]] = {}
        with torch.no_grad():
            for stage in [0, *range(max(first, 1), len(stages))]:
                if stages[stage].enter() is not model:
                    raise ValueError("every stage must enter the same working model")
                if stage == 0 and first > 0 and cache is None:
                    continue
                if stage == 0:
                    with cache.record() if cache is not None else nullcontext({}) as recorded:
                        scores = forward(x, targets_of(0, pieces), 0, pieces)[0]
                    if first > 0:
                        continue
                else:
                    with cache.stub(prefixes[stage], recorded, grad=False) \
                            if cache is not None else nullcontext([]):
                        scores = forward(x, targets_of(stage, pieces), stage, pieces)[0]
                deliver(stage, pieces, x, scores, [], [])
                reached[0] = stage + 1
                if progress is not None:
                    progress(len(x))

    chunk_runner = run_forward_chunk if family == "forward" else run_chunk

    def run_with_retry(pieces: list[Piece], first: int) -> None:
        reached = [first]
        try:
            chunk_runner(pieces, first, reached)
        except torch.cuda.OutOfMemoryError:
            rows = sum(len(index) for _, index in pieces)
            if rows == 1:
                raise MethodError("out of device memory for a single row; use a smaller "
                                  "images.size or another device") from None
            torch.cuda.empty_cache()
            size.rows, size.halvings = max(1, rows // 2), size.halvings + 1
            warnings.warn(f"out of device memory in a pass of {rows} rows; retrying in passes "
                          f"of {size.rows} (a smaller runtime.chunk_size or "
                          "runtime.device_memory_gib starts there)", stacklevel=2)
            for half in _split(pieces, size.rows):
                run_with_retry(half, reached[0])

    with torch.enable_grad():
        for pieces in _chunks(list(base.values()), size):
            run_with_retry(pieces, 0)
    if mode is not None:
        family.finish(mode, sorted({n for s in base.values() for n in s.names}))


def _chunks(segments: list[_Segment], size: ChunkSize):
    """Yield lists of (source key, row indices) of at most ``size.rows`` rows in all (read anew
    for every chunk, so a halving after an out-of-memory error applies to the rest)."""
    pieces, room = [], size.rows
    for segment in segments:
        start = 0
        while start < segment.source.count:
            take = min(room, segment.source.count - start)
            pieces.append((segment.source.key, torch.arange(start, start + take)))
            start += take
            room -= take
            if room == 0:
                yield pieces
                pieces, room = [], size.rows
    if pieces:
        yield pieces


def _split(pieces: list[Piece], rows: int):
    """Re-cut a chunk's pieces into chunks of at most ``rows`` rows, in order."""
    out, room = [], rows
    for key, index in pieces:
        while len(index):
            take = index[:room]
            out.append((key, take))
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


def _keep(store: list[Tensor]):
    """Forward hook keeping the module's output and passing a clone downstream, so a later
    in-place op (ResNet's ``ReLU(inplace=True)``) cannot change what is kept."""

    def hook(module: nn.Module, args: object, output: Tensor) -> Tensor:
        store.append(output)
        return output.clone()

    return hook


def _capture(path: str, store: list[Tensor]):
    """:func:`_keep` for a Grad-CAM layer, whose output must be one tensor: a feature map or
    tokens (read in its layout by the method), kept from later in-place ops (DenseNet's
    ``F.relu(features, inplace=True)`` would otherwise overwrite it)."""
    keep = _keep(store)

    def hook(module: nn.Module, args: object, output: object) -> Tensor:
        if not (isinstance(output, Tensor) and output.ndim in (3, 4)):
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise MethodError(f"gradcam: layer {path!r} outputs {got}, not a feature map or "
                              "tokens; choose another layer")
        return keep(module, args, output)

    return hook


def _stem_worth_pulling_back(model: nn.Module, base: dict[Hashable, _Segment],
                             per_stage: list[dict[Hashable, _Segment]]) -> tuple[str, ...]:
    """The model's affine stem, when some consumer sums several rows per group (else
    pulling back separately would only add a pass)."""
    if not any(isinstance(c, GroupSum) and c.size > 1 for segments in per_stage
               for segment in segments.values() for c in segment.consumers):
        return ()
    example, _ = next(iter(base.values())).source.build(torch.arange(1))
    return find_affine_stem(model, example)


def _group_sums(consumer: GroupSum, index: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """(groups, Σ_rows∈group w · grad) of one piece's rows."""
    groups, weighted = consumer.weighted(index, grad)
    groups, inverse = torch.unique(groups, return_inverse=True)
    summed = grad.new_zeros((len(groups), *grad.shape[1:]))
    return groups, summed.index_add_(0, inverse.to(grad.device), weighted)


def _last_activation(path: str, store: list[Tensor]) -> Tensor:
    if not store:
        raise MethodError(f"gradcam: layer {path!r} did not run in the forward; choose another")
    return store[-1]  # a layer run several times in one forward: its last call


def _check_relu_report(mode: ReluRuleMode, names: list[str]) -> None:
    """Refuse a modified backward that met no ReLU on the input's path (nor an activation
    ruled as one); warn when it left other activations plain, or ruled some as ReLUs."""
    report = mode.report()
    who = ", ".join(names)
    others = ", ".join(f"{act}×{n}" for act, n in sorted(report.other_activations.items()))
    if report.relu_calls == 0 and not report.as_relu:
        off = (f"{report.off_path_relus} ReLU call(s) that do not see the input" if
               report.off_path_relus else "")
        found = "; ".join(part for part in (off, others) if part)
        where = " on the input's path" if report.off_path_relus else ""
        raise MethodError(
            f"{who}: the model applies no ReLU{where}{f' (it applies {found})' if found else ''}"
            ", so the modified backward is undefined; use gradient or integrated_gradients "
            "instead (or, as a labelled extension, nonlinearity_rule: gelu_as_relu)"
        )
    if report.as_relu:
        ruled = ", ".join(f"{act}×{n}" for act, n in sorted(report.as_relu.items()))
        warnings.warn(
            f"{who}: nonlinearity_rule gelu_as_relu ruled {ruled} as ReLUs (an extension with "
            "no published definition; counted over all chunks)",
            ReluRuleWarning,
            stacklevel=4,
        )
    if others:
        warnings.warn(
            f"{who}: {'' if report.as_relu else 'the rule applies to ReLU only; '}other "
            f"activations kept their plain gradient ({others}, counted over all chunks)",
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


def planned_method(name: str, *, params: type[MethodParams] = NoParams, description: str,
                   reference: ReferenceFn | None = None):
    """Register a method given as a plan; its plain ``fn`` runs the plan alone (``reference``:
    see :func:`~saliencycheck.methods.registry.register_method`)."""

    def decorate(plan: PlanFn) -> PlanFn:
        def fn(model: nn.Module, inputs: Tensor, targets: Tensor, context: AttributionContext,
               **options: object) -> Tensor:
            check_call(model, inputs, targets, name)
            method_plan = plan(model, RowSource.of(inputs, targets), context, **options)
            run_requests(model, method_plan.requests, context)
            return method_plan.finish()

        fn.__doc__ = plan.__doc__
        fn.__name__ = name
        register_method(name, params=params, description=description, plan=plan,
                        reference=reference)(fn)
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
