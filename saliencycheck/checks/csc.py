"""Cosine similarity convergence (CSC, Sixt, Granz & Landgraf 2020, "When Explanations Lie").

At each block boundary, from the logits down, ``samples`` random relevance vectors replace the
upstream relevance: each is propagated to the input with the method's own backward rule, and
the mean pairwise absolute cosine similarity of the resulting input maps is recorded (per
image, metric ``cosine_similarity``), next to the same figure for the injected vectors
themselves (method ``random_vectors``). A method whose CSC reaches 1 maps every upstream
relevance to one input map (up to sign and scale: its backward from that point has rank one),
so its explanation no longer depends on anything above the injection point (Sixt et al. prove
it for z⁺, αβ and Deep Taylor, and measure it for guided backprop).

The vectors are standard normal, seeded per image (its place in the run), block and sample, so
every method receives the same ones and no grouping of the images changes them. Zero-mean
vectors, and the absolute cosine, because a rank-one backward maps them to ± one map: with
non-negative vectors (U(0, 1)) their common mean would dominate every method's maps (measured
on the digits ResNet-18: the plain gradient's CSC 0.98 three blocks below the logits, against
0.13 with these), so the test could not tell a method that ignores the layers above from one
that does not. The random-vector figure is then ≈ √(2/(π·n)) for n-dimensional vectors. What
they replace is what the method's backward carries: the gradient (gradient, guided backprop,
deconvnet), DeepLIFT's multipliers, and for LRP and Deep Taylor relevance over activation
(:mod:`saliencycheck.lrp_rules`), so the relevance injected there is ``A ⊙ v``: zero where the
block's output ``A`` is, as in any LRP pass, and never divided by a small activation (injecting
``R = v`` as ``v / A`` lets the units with the smallest activations dominate every sample,
which measured LRP-ε's CSC at 0.6-0.7 where gradient × input, the same rule, gives 0.1).
The maps are what the method makes of the input gradient (× input for gradient × input and
LRP, × (x − x′) for DeepLIFT). Methods without one backward pass of the images (integrated
gradients, SmoothGrad, Grad-CAM, occlusion, rollout, custom) are not applicable: their rows
are NaN and say so.

Cost per image: ``samples`` rows through one forward, then one backward per block from its
output down, in passes of at most ``runtime.chunk_size`` rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, field_validator
from rich.table import Table
from torch import Tensor, nn

from saliencycheck.checks.base import (
    TRAINED,
    Check,
    Engine,
    Group,
    View,
    fmt,
    image_places,
    register_check,
    seeded_per_image,
)
from saliencycheck.metrics import Scores
from saliencycheck.randomization import ROOT_NAME, find_blocks, select_blocks
from saliencycheck.results import COSINE_SIMILARITY
from saliencycheck.sections import MAX_SAMPLES, Granularity, Section, at_most

RANDOM_VECTORS = "random_vectors"  # the injected vectors' own figure, in the method column


class CscConfig(Section):
    enabled: bool = Field(
        False, description="Cosine similarity convergence (Sixt et al. 2020): random relevance "
        "injected at each block boundary, from the logits down, propagated with each "
        "method's backward rule; the mean pairwise |cosine similarity| of the input maps "
        "(→ 1: the method ignores the layers above). Backward-rule methods only (gradient, "
        "gradient_x_input, guided_backprop, deconvnet, lrp, deep_taylor, deeplift).",
    )
    samples: int = Field(32, ge=2, description="Random vectors injected per image and block.")
    granularity: Granularity = Field(
        "block", description="Where to inject: at the output of each 'block' (as the "
        "cascading test's) or each 'layer' (every module with parameters).")
    blocks: list[str] | None = Field(
        None, min_length=1, description="Inject only at these blocks: names or globs matched "
        "against the blocks of `granularity`; default: every block.")

    @field_validator("samples")
    @classmethod
    def _samples_bound(cls, value: int) -> int:
        return at_most(value, MAX_SAMPLES, typical="16-64")


@dataclass(frozen=True)
class Injection:
    """One stage: a block (``name``) and the module at whose output the vectors are
    injected (the block's last module; its last call)."""

    index: int
    name: str
    module: str


@dataclass
class BackwardRule:
    """How a method propagates: the mode around its forward (entered with the rows) and what
    the input gradient becomes (``to_map(rows, gradient)``)."""

    mode: Callable[[Tensor], AbstractContextManager]
    to_map: Callable[[Tensor, Tensor], Tensor]


def backward_rule(method: Any, model: nn.Module, inputs: Tensor, targets: Tensor,
                  context: Any) -> BackwardRule | str:
    """``method``'s backward rule, or why CSC does not apply to it."""
    # imported here: the engine imports the model loader, which imports the config, which is
    # assembled from this registry
    from saliencycheck.engine.passes import IMAGES_KEY, RowMaps, RowSource

    if method.name == "deeplift":
        return _deeplift_rule(method, model, context)
    if method.spec.plan is None:
        return f"not applicable: {method.label} has no backward rule to inject into"
    plan = method.spec.plan(model, RowSource.of(inputs, targets), context,
                            **dict(method.params))
    requests = plan.requests
    (request, *more) = requests
    consumer = request.consumer
    if more or request.family == "forward" or request.source.key != IMAGES_KEY or not (
            isinstance(consumer, RowMaps) and consumer.layer is None and consumer.needs_grads):
        return (f"not applicable: {method.label} is not one backward pass of the images "
                "(CSC applies to gradient, gradient_x_input, guided_backprop, deconvnet, lrp, "
                "deep_taylor and deeplift)")
    family = request.family
    mode = (lambda rows: nullcontext()) if family == "plain" else (lambda rows: family.mode())
    return BackwardRule(mode=mode, to_map=lambda rows, grads: consumer.fn(rows, grads, None))


def _deeplift_rule(method: Any, model: nn.Module, context: Any) -> BackwardRule:
    """DeepLIFT's Rescale rule against the references of the rows it is entered with."""
    from saliencycheck.deeplift_rules import ReferencePass, RescalePass
    from saliencycheck.methods.baselines import make_baseline

    params = dict(method.params)
    references: list[Tensor] = []

    def mode(rows: Tensor) -> AbstractContextManager:
        references[:] = [make_baseline(params["baseline"], rows.detach(), context,
                                       blur_sigma=params["blur_sigma"])]
        reference = ReferencePass()
        with torch.no_grad(), reference:
            model(references[0])
        return _Rescale(RescalePass(reference))

    return BackwardRule(mode=mode,
                        to_map=lambda rows, grads: (rows - references[0]) * grads)


class _Rescale:
    """A RescalePass whose multipliers are settled when the forward ends."""

    def __init__(self, rescale: Any) -> None:
        self.rescale = rescale

    def __enter__(self) -> None:
        self.rescale.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.rescale.__exit__(*exc)
        if exc[0] is None:
            self.rescale.finish()


def random_vectors(places: list[int], block: str, shape: tuple[int, ...], samples: int, *,
                   seed: int, device: torch.device) -> Tensor:
    """(len(places) · samples, *shape) N(0, 1): image ``places[i]``'s vectors at ``block``."""
    return seeded_per_image(places, lambda place: f"csc/{place}/{block}", (samples, *shape),
                            seed=seed, device=device, draw=torch.randn).flatten(0, 1)


def mean_pairwise_cosine(maps: Tensor, samples: int) -> tuple[Tensor, tuple[str, ...]]:
    """Per image, the mean absolute cosine similarity over the pairs of its ``samples`` maps
    (rows grouped by image); NaN where a map is zero."""
    flat = maps.flatten(1).double().unflatten(0, (-1, samples))
    norms = flat.norm(dim=2)
    zero = (norms == 0).any(dim=1)
    unit = flat / norms.clamp_min(torch.finfo(torch.float64).tiny)[..., None]
    gram = (unit @ unit.transpose(1, 2)).abs()
    pairs = (gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)) / (
        samples * (samples - 1))
    values = torch.where(zero, torch.nan, pairs)
    return values, tuple("a propagated map is zero" if z else "" for z in zero.tolist())


@register_check
class CosineSimilarityConvergence(Check):
    name = "csc"
    title = "cosine similarity convergence (random relevance injected, top-down)"
    section = CscConfig
    description = "Cosine similarity convergence test."
    judged_metrics = (COSINE_SIMILARITY,)
    figure = "curves"
    ylabel = "mean pairwise cosine similarity"

    def plan(self, model: nn.Module, example: Tensor, config: Any) -> list[Injection]:
        """The injection points: the blocks' modules, from the logits down (one whose calls
        do not return a single tensor is left out)."""
        section = config.tests.csc
        blocks = find_blocks(model, example, granularity=section.granularity)
        if section.blocks is not None:
            blocks = select_blocks(blocks, section.blocks, field="tests.csc.blocks")
        modules = dict(model.named_modules())
        inner = {m for b in blocks for m in b.module_names}
        # a block's last module, unless it is the model or holds other blocks' modules (the
        # parameters ViT's encoder owns itself: its output is not that block's)
        last = {b.name: b.module_names[-1] for b in blocks
                if b.name != ROOT_NAME and b.module_names and b.module_names[-1] in modules
                and b.module_names[-1] and not any(
                    m.startswith(b.module_names[-1] + ".") for m in inner)}
        returns = _returns_tensor(model, example, sorted(set(last.values())))
        chosen = [b.name for b in reversed(blocks) if b.name in last and returns[last[b.name]]]
        return [Injection(index, name, last[name])
                for index, name in enumerate(chosen, start=1)]

    def stage_names(self, setup: Any) -> list[str]:
        return [TRAINED] + [injection.name for injection in setup.plans[self.name]]

    def steps(self, setup: Any) -> float:
        return 1

    def score(self, engine: Engine, group: Group) -> None:
        """Every applicable method's CSC at every injection point, and the vectors' own."""
        setup = engine.setup
        section = setup.config.tests.csc
        injections: list[Injection] = setup.plans[self.name]
        samples = section.samples
        model = engine.model()
        places = image_places(setup, group.ids)
        per_pass = max(1, setup.context.chunk_size // samples)
        vectors_done = False
        for method in setup.methods:
            rule = backward_rule(method, model, group.inputs[:1], group.targets[:1],
                                 setup.context)
            if isinstance(rule, str):
                nan = torch.full((len(group.ids),), torch.nan)
                for injection in injections:
                    engine.record(self.name, injection.index, injection.name, group.ids,
                                  group.targets, group.targets, {}, {method.label: {
                                      COSINE_SIMILARITY: Scores(nan, (rule,) * len(nan))}})
                continue
            found: dict[int, list[tuple[Tensor, tuple[str, ...]]]] = {}
            vectors: dict[int, list[tuple[Tensor, tuple[str, ...]]]] = {}
            for start in range(0, len(group.ids), per_pass):
                rows = slice(start, start + per_pass)
                for index, (maps, figure) in self._convergence(
                        model, rule, group.inputs[rows], places[rows],
                        injections, samples, seed=setup.config.runtime.seed).items():
                    found.setdefault(index, []).append(maps)
                    vectors.setdefault(index, []).append(figure)
            for injection in injections:
                record = {method.label: _joined(found[injection.index])}
                if not vectors_done:
                    record[RANDOM_VECTORS] = _joined(vectors[injection.index])
                engine.record(self.name, injection.index, injection.name, group.ids,
                              group.targets, group.targets, {},
                              {label: {COSINE_SIMILARITY: scores}
                               for label, scores in record.items()})
            vectors_done = True

    def _convergence(self, model: nn.Module, rule: BackwardRule, inputs: Tensor,
                     places: list[int], injections: list[Injection], samples: int, *,
                     seed: int) -> dict[int, tuple[tuple[Tensor, tuple[str, ...]],
                                                    tuple[Tensor, tuple[str, ...]]]]:
        """Per injection: (the maps' CSC, the vectors' own) of these images."""
        from saliencycheck.engine.eval_norm import EvalBatchNormMode  # see backward_rule

        rows = inputs.repeat_interleave(samples, dim=0).detach().requires_grad_(True)
        modules = {i.module: model.get_submodule(i.module) for i in injections}
        outputs: dict[str, Tensor] = {}

        def keep(name: str):
            def hook(module: nn.Module, args: object, output: Tensor) -> Tensor:
                outputs[name] = output
                return output.clone()  # what is kept cannot be changed in place downstream
            return hook

        handles = [module.register_forward_hook(keep(name)) for name, module in modules.items()]
        try:
            with torch.enable_grad(), EvalBatchNormMode(), rule.mode(rows):
                model(rows)
        finally:
            for handle in handles:
                handle.remove()
        result = {}
        for injection in injections:
            activation = outputs[injection.module]
            v = random_vectors(places, injection.name, tuple(activation.shape[1:]), samples,
                               seed=seed, device=activation.device).to(activation.dtype)
            (grad,) = torch.autograd.grad(activation, rows, v, retain_graph=True,
                                          allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(rows)
            maps = rule.to_map(rows.detach(), grad)
            result[injection.index] = (mean_pairwise_cosine(maps, samples),
                                       mean_pairwise_cosine(v, samples))
        return result

    def table(self, view: View) -> Table | None:
        """Methods × injection points (the first four from the logits down: the curves
        figure has them all)."""
        rows = [s for s in view.summary if s.test == self.name]
        if not rows:
            return None
        stages = sorted({(s.stage_index, s.stage) for s in rows})[:4]
        cells = {(s.method, s.stage_index): s.mean for s in rows}
        table = Table(title="csc: mean pairwise |cosine similarity| of the input maps from "
                      "random relevance injected at each block (→ 1: the layers above are "
                      "ignored), mean over images", title_justify="left")
        table.add_column("method", no_wrap=True)
        for _, name in stages:
            table.add_column(name, justify="right")
        for method in [*view.methods, RANDOM_VECTORS]:
            if any((method, index) in cells for index, _ in stages):
                label = f"[dim]{method}[/]" if method == RANDOM_VECTORS else method
                table.add_row(label, *[fmt(cells.get((method, index))) for index, _ in stages])
        return table


def _joined(parts: list[tuple[Tensor, tuple[str, ...]]]) -> Scores:
    return Scores(torch.cat([values for values, _ in parts]).float(),
                  tuple(itertools.chain.from_iterable(reasons for _, reasons in parts)))


def _returns_tensor(model: nn.Module, example: Tensor, names: list[str]) -> dict[str, bool]:
    """Whether every call of each named module returns one tensor (one traced forward)."""
    seen = {name: True for name in names}
    handles = []
    for name in names:
        def hook(module: nn.Module, args: object, output: object, name: str = name) -> None:
            seen[name] = seen[name] and isinstance(output, Tensor)

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return seen
