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

from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from saliencycheck.errors import MethodError


@dataclass(frozen=True)
class CallTrace:
    """When each module ran in one forward: ``(enter, exit)`` event numbers of every call,
    whether every call returned a single tensor, and, for each module whose output a later
    in-place op modified, the modules whose own code ran that op (the innermost call open at
    the time; "" for the model's top-level code). Only those outputs need a copy when they
    are recorded, and when they are replayed in a stage where such a module runs."""

    calls: dict[str, list[tuple[int, int]]]
    returns_tensor: dict[str, bool]
    modifiers: dict[str, frozenset[str]] = field(default_factory=dict)

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
    running: list[str] = []  # the open calls, innermost last
    outputs: list[tuple[str, Tensor, int]] = []  # (path, output, its version when last seen)
    modifiers: dict[str, set[str]] = {}

    def changed() -> None:
        """Attribute in-place changes since the last event to the innermost open call."""
        for i, (path, output, version) in enumerate(outputs):
            if output._version != version:
                modifiers.setdefault(path, set()).add(running[-1] if running else "")
                outputs[i] = (path, output, output._version)

    def enter(path: str):
        def hook(module: nn.Module, args: object) -> None:
            nonlocal events
            changed()
            running.append(path)
            open_calls.setdefault(path, []).append(events)
            events += 1
        return hook

    def leave(path: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            nonlocal events
            changed()
            running.pop()
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
    changed()
    return CallTrace(calls=calls, returns_tensor=returns_tensor,
                     modifiers={path: frozenset(m) for path, m in modifiers.items()})


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


def stubbed_within(path: str, stubbed: Collection[str]) -> bool:
    """Whether module ``path`` does not run because it or an ancestor is ``stubbed``."""
    return bool(path) and any(p in stubbed for p in (path, *_ancestors(path)))


class PrefixCache:
    """Records the outputs of the prefix modules in a trained forward; stubs them in a stage's.

    ``paths`` is every module some stage stubs (the union of :func:`prefix_modules`).
    ``modifiers`` (:attr:`CallTrace.modifiers`; None: unknown, so every output counts as
    modified) says whose outputs later in-place ops modify: those are copied when recorded,
    and when replayed in a stage where a modifying module runs, so what is kept never
    changes; the others are passed on as they are (each copy is 31 MB per stage at ResNet-18's
    stem with 119 rows).
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], *,
                 modifiers: Mapping[str, Collection[str]] | None = None) -> None:
        self.model = model
        self.paths = tuple(sorted(set(paths)))
        self.modules = {path: model.get_submodule(path) for path in self.paths}
        self.modifiers = modifiers

    @contextmanager
    def record(self) -> Iterator[dict[str, list[Tensor]]]:
        """Keep each prefix module's output (per call) and pass a clone downstream, so that a
        later in-place op (``ReLU(inplace=True)``) cannot overwrite what is kept."""
        outputs: dict[str, list[Tensor]] = {path: [] for path in self.paths}

        def keep(path: str):
            def hook(module: nn.Module, args: object, output: Tensor) -> Tensor:
                outputs[path].append(output)
                return output.clone() if self._modified(path, ()) else output
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
        paths = tuple(paths)
        for path in paths:
            values = recorded[path]
            leaves = [v.detach().requires_grad_(grad) for v in values]
            if grad:
                pairs.extend(zip(leaves, values))
            module = self.modules[path]
            module.forward = _replay(path, leaves, copy=self._modified(path, paths))
            patched.append(module)
        try:
            yield pairs
        finally:
            for module in patched:
                del module.forward


    def _modified(self, path: str, stubbed: tuple[str, ...]) -> bool:
        """Whether an in-place op may modify ``path``'s output while ``stubbed`` do not run."""
        if self.modifiers is None:
            return True
        return any(not stubbed_within(m, stubbed) for m in self.modifiers.get(path, ()))


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
    graph (which stays retained for the next stage); None when no gradient reached a leaf,
    or no stubbed output depends on the input (a model that ignores it: zero maps)."""
    used = [(recorded, g) for recorded, g in pairs if g is not None and recorded.requires_grad]
    if not used:
        return None
    (grad,) = torch.autograd.grad([r for r, _ in used], [x], [g for _, g in used],
                                  retain_graph=True, allow_unused=True)
    return grad
