"""Prefix activation caching: what a randomization stage leaves trained is not recomputed.

In a stage the modules that run entirely before the first randomized one see trained weights
and the same inputs, so their outputs equal the trained model's. The engine runs the trained
forward of a chunk once, :meth:`PrefixCache.record`-ing those outputs inside its autograd
graph, and in every stage :meth:`PrefixCache.stub`-s the prefix modules to return them as
fresh leaves: the stage's forward starts there, and the gradients reaching the leaves are
carried to the input through the retained trained graph (one vector-Jacobian product). The
result equals a full forward and backward of the stage model, up to float summation order;
on ResNet-18 at layer granularity a cascade saves about a quarter of the FLOPs.

The prefix is found from one traced forward (:func:`trace_calls`): the order in which modules
are entered and left. A module is stubbed when every one of its calls ends before the first
call of a randomized module and each call returns one tensor; only the outermost such modules
are stubbed. Models whose control flow depends on the data can switch this off
(``runtime.prefix_cache: false``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saliencycheck.errors import MethodError


@dataclass(frozen=True)
class CallTrace:
    """When each module ran in one forward: ``(enter, exit)`` event numbers of every call,
    whether every call returned a single tensor, and which modules' outputs a later in-place
    op modified (only those need a copy when recorded or replayed)."""

    calls: dict[str, list[tuple[int, int]]]
    returns_tensor: dict[str, bool]
    modified_in_place: frozenset[str] = frozenset()

    def start(self, path: str) -> int | None:
        """The event at which ``path`` (or, if it never runs itself, its nearest running
        ancestor, which may use its parameters directly) is first entered."""
        while path not in self.calls:
            if not path:
                return None
            path = path.rpartition(".")[0]
        return self.calls[path][0][0]


def trace_calls(model: nn.Module, example: Tensor) -> CallTrace:
    """Run ``model`` once on ``example`` (no gradients) and record its module calls."""
    events = 0
    calls: dict[str, list[tuple[int, int]]] = {}
    returns_tensor: dict[str, bool] = {}
    open_calls: dict[str, list[int]] = {}
    outputs: list[tuple[str, Tensor, int]] = []  # (path, output, its version when returned)

    def enter(path: str):
        def hook(module: nn.Module, args: object) -> None:
            nonlocal events
            open_calls.setdefault(path, []).append(events)
            events += 1
        return hook

    def leave(path: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            nonlocal events
            calls.setdefault(path, []).append((open_calls[path].pop(), events))
            returns_tensor[path] = returns_tensor.get(path, True) and isinstance(output, Tensor)
            if isinstance(output, Tensor):
                outputs.append((path, output, output._version))
            events += 1
        return hook

    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(path)))
        handles.append(module.register_forward_hook(leave(path)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    modified = frozenset(path for path, output, version in outputs if output._version != version)
    return CallTrace(calls=calls, returns_tensor=returns_tensor, modified_in_place=modified)


def prefix_modules(trace: CallTrace, randomized: Iterable[str], *,
                   visible: Iterable[str] = ()) -> tuple[str, ...]:
    """The outermost modules whose every call ends before any ``randomized`` module starts.

    ``visible`` modules (Grad-CAM layers) need the gradient at their output, so nothing that
    ends after them is stubbed (they may be stubbed themselves: hooks see the stub's output).
    """
    starts = [s for s in (trace.start(path) for path in randomized) if s is not None]
    if not starts:
        return ()
    cut = min([*starts, *(trace.calls[path][-1][1] + 1 for path in visible
                          if path in trace.calls)])
    chosen = {path for path, calls in trace.calls.items()
              if path and trace.returns_tensor[path] and calls[-1][1] < cut}
    return tuple(sorted(path for path in chosen
                        if not any(a in chosen for a in _ancestors(path))))


def _ancestors(path: str) -> Iterator[str]:
    while path:
        path = path.rpartition(".")[0]
        if path:
            yield path


class PrefixCache:
    """Records the outputs of the prefix modules in a trained forward; stubs them in a stage's.

    ``paths`` is every module some stage stubs (the union of :func:`prefix_modules`). Outputs
    of the ``modified_in_place`` modules (all, when None) are copied when recorded and
    replayed, so in-place ops downstream cannot change what is kept; the others are passed on
    as they are (a 31 MB copy per stub and stage, on ResNet-18's stem at 119 rows).
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], *,
                 modified_in_place: Collection[str] | None = None) -> None:
        self.model = model
        self.paths = tuple(sorted(set(paths)))
        self.modules = {path: model.get_submodule(path) for path in self.paths}
        self.copied = set(self.paths if modified_in_place is None else modified_in_place)

    @contextmanager
    def record(self) -> Iterator[dict[str, list[Tensor]]]:
        """Keep each prefix module's output (per call) and pass a clone downstream, so that a
        later in-place op (``ReLU(inplace=True)``) cannot overwrite what is kept."""
        outputs: dict[str, list[Tensor]] = {path: [] for path in self.paths}

        def keep(path: str):
            def hook(module: nn.Module, args: object, output: Tensor) -> Tensor:
                outputs[path].append(output)
                return output.clone() if path in self.copied else output
            return hook

        handles = [module.register_forward_hook(keep(path))
                   for path, module in self.modules.items()]
        try:
            yield outputs
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def stub(self, paths: Iterable[str], recorded: dict[str, list[Tensor]],
             *, grad: bool) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """Make each of ``paths`` return its recorded outputs, call by call, without running.

        With ``grad``, each output is a new leaf requiring gradient (returned as a clone where
        an in-place op downstream may modify it); yields the ``(leaf, recorded)`` pairs, to
        carry the leaves' gradients back through the recorded graph.
        """
        pairs: list[tuple[Tensor, Tensor]] = []
        patched = []
        for path in paths:
            values = recorded[path]
            leaves = [v.detach().requires_grad_(grad) for v in values]
            if grad:
                pairs.extend(zip(leaves, values))
            module = self.modules[path]
            module.forward = _replay(path, leaves, copy=path in self.copied)
            patched.append(module)
        try:
            yield pairs
        finally:
            for module in patched:
                del module.forward


def _replay(path: str, leaves: list[Tensor], *, copy: bool):
    calls = iter(leaves)

    def forward(*args: object, **kwargs: object) -> Tensor:
        leaf = next(calls, None)
        if leaf is None:
            raise MethodError(f"module {path!r} ran more often than in the traced forward: the "
                              "model's control flow depends on its input; set "
                              "runtime.prefix_cache: false")
        return leaf.clone() if copy else leaf

    return forward


def carry_to_input(pairs: list[tuple[Tensor, Tensor | None]], x: Tensor) -> Tensor | None:
    """Σ over stubbed outputs of (∂ output / ∂ x)ᵀ · gradient, through the retained trained
    graph (which stays retained for the next stage); None when no gradient reached a leaf."""
    used = [(recorded, g) for recorded, g in pairs if g is not None]
    if not used:
        return None
    (grad,) = torch.autograd.grad([r for r, _ in used], [x], [g for _, g in used],
                                  retain_graph=True, allow_unused=True)
    return grad
