"""Model-parameter randomization: which blocks to randomize, in what order, and how.

The cascading and independent randomization tests of Adebayo et al., "Sanity Checks for
Saliency Maps" (NeurIPS 2018, arXiv:1810.03292), section 3.1:

* :func:`find_blocks` splits a model into the units randomized together: the paper's blocks
  (Inception-v3 gives its 17: ``Conv2d_1a_3x3`` ... ``Mixed_7c``, ``fc``) or single layers.
* :func:`plan_stages` orders them into the stages of the cascading test (cumulative, from the
  logits toward the input by default) or of the independent test (one block at a time).
* :func:`reinitialize_` re-draws one block's parameters in place from a local generator seeded
  by ``(seed, block name)``, so a block gets the same values in every stage, test and process.
* :class:`RandomizedModels` yields one model per stage from a single working copy; the user's
  model is never modified and the global RNG is never used.
* :func:`logit_change` measures how far a stage moved the logits (0 when it changed nothing).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Literal, get_args

import torch
from torch import nn

from saliencycheck.errors import ConfigError, ModelError

Granularity = Literal["block", "layer"]
RandomizationTest = Literal["cascading", "independent"]
Order = Literal["top_down", "bottom_up"]
Init = Literal["reset", "normal", "shuffle"]

ROOT_NAME = "(root)"
"""Name of the block holding parameters owned by the model itself (e.g. ViT's ``class_token``)."""

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d)
_RUNNING_STAT_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                       nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_NORMS = _RUNNING_STAT_NORMS + (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
_KNOWN = _CONVS + _NORMS + (nn.Linear, nn.Embedding)
_FALLBACK_STD = 0.02


@dataclass(frozen=True)
class Block:
    """A unit of the model randomized together.

    ``name`` is the dotted module path (:data:`ROOT_NAME` for the model's own parameters),
    ``module_names`` the modules it covers, ``parameter_names`` the full dotted names of all
    parameters it randomizes (a shared parameter belongs to the first block that executes it),
    ``running_stat_names`` the norm layers' running statistics it covers (reset only on
    request) and ``numel`` the number of randomized scalars.
    """

    name: str
    module_names: tuple[str, ...]
    parameter_names: tuple[str, ...]
    running_stat_names: tuple[str, ...]
    numel: int


@dataclass(frozen=True)
class Stage:
    """One randomized model of a test; index 0 is reserved for the trained model.

    ``name`` is the block newly randomized at this stage; ``randomized_blocks`` all blocks
    randomized in this stage's model (cumulative for the cascading test);
    ``fraction_randomized`` their share of all the model's parameters (by numel).
    """

    index: int
    name: str
    randomized_blocks: tuple[Block, ...]
    fraction_randomized: float

    @property
    def blocks(self) -> tuple[str, ...]:
        """Names of the blocks randomized in this stage's model."""
        return tuple(block.name for block in self.randomized_blocks)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Full names of all parameters randomized in this stage's model."""
        return tuple(chain.from_iterable(b.parameter_names for b in self.randomized_blocks))

    @property
    def numel(self) -> int:
        """Number of randomized scalars in this stage's model."""
        return sum(block.numel for block in self.randomized_blocks)


def find_blocks(model: nn.Module, example_input: torch.Tensor, *,
                granularity: Granularity = "block") -> list[Block]:
    """Split ``model`` into the blocks randomized together, in forward execution order.

    One eval-mode forward pass on ``example_input`` (under ``torch.no_grad``, hooks removed and
    training flags restored afterwards) tells which modules run and in which order; modules
    that never run (Inception-v3's ``AuxLogits`` in eval mode) are left out.

    Parameters
    ----------
    model : the model; not modified.
    example_input : a batch the model accepts, on the model's device.
    granularity : ``"block"``: the model's top-level children, where a container
        (``nn.Sequential``/``ModuleList``/``ModuleDict``) without parameters of its own is
        expanded one level into its children (ResNet's ``layer1.0``, VGG's ``features.0``); the
        model's own parameters, if any, form a block :data:`ROOT_NAME`. ``"layer"``: every
        module with parameters of its own (each Conv, BatchNorm, Linear ...); one that is not
        called itself but whose parent runs counts as run, since the parent may use its
        weights directly (``nn.MultiheadAttention`` and its ``out_proj``).

    Returns
    -------
    The blocks with parameters, from the input toward the logits.
    """
    _check_choice("granularity", granularity, Granularity)
    first_call = _first_calls(model, example_input)

    candidates: list[tuple[int, str, nn.Module, bool, str]] = []
    # (first call, path, module, recursive, kind)
    if granularity == "block":
        for path, module, recursive, kind in _block_modules(model):
            calls = [first_call[id(m)] for m in (module.modules() if recursive else [module])
                     if id(m) in first_call]
            if calls:
                candidates.append((min(calls), path, module, recursive, kind))
    else:
        for path, module in model.named_modules():
            parent = model.get_submodule(path.rpartition(".")[0]) if path else module
            call = first_call.get(id(module), first_call.get(id(parent)))
            if call is not None and _has_own_parameters(module):
                candidates.append((call, path, module, False, _MODULE))
    candidates.sort(key=lambda item: item[0])

    blocks, kinds, assigned = [], [], set()
    for _, path, module, recursive, kind in candidates:
        parameters = [(n, p) for n, p in module.named_parameters(prefix=path, recurse=recursive)
                      if id(p) not in assigned]
        if not parameters:
            continue
        assigned.update(id(p) for _, p in parameters)
        norms = module.named_modules(prefix=path) if recursive else [(path, module)]
        stats = tuple(f"{m_path}.{b}" for m_path, m in norms
                      if isinstance(m, _RUNNING_STAT_NORMS) and m.track_running_stats
                      for b, _ in m.named_buffers(recurse=False))
        blocks.append(Block(name=path or ROOT_NAME, module_names=(path,),
                            parameter_names=tuple(n for n, _ in parameters),
                            running_stat_names=stats,
                            numel=sum(p.numel() for _, p in parameters)))
        kinds.append(_FINAL_NORM if kind == _MODULE and _is_norm(module) else kind)
    if _UNIT in kinds:
        blocks = _merge_around_units(blocks, kinds)
    if not blocks:
        raise ModelError("model: no module with parameters runs in the forward pass; "
                         "nothing to randomize")
    return blocks


# What find_blocks(granularity="block") makes a block (docs/tests.md, "Blocks", says the same):
_UNIT = "unit"  # a member of a container of repeated units: residual, transformer, MBConv blocks
_MODULE = "module"  # any other child module that runs (a stem, a patch embedding, a head)
_OWN = "own"  # the parameters a module owns itself (ViT's class token, its position embedding)
_FINAL_NORM = "norm"  # a normalization layer on its own (after the last unit: part of the head)
EMBEDDING_NAME = "(embedding)"
LAYER_RULE = "Granularity layer: every module with parameters of its own is one block"
BLOCK_RULE = (
    "Granularity block: the model's repeated units (every member of a container whose "
    "children are all of one class and each hold parameterized layers: ResNet's and RegNet's "
    "residual blocks, "
    "ViT's encoder layers, Swin's and MaxViT's transformer blocks, ConvNeXt's CNBlocks, "
    "EfficientNet's MBConvs), reached by descending into the modules that hold them; every "
    "other module that runs is one block (stems, patch embeddings and merging or downsampling "
    "layers, the head), top-level containers expanded one level (VGG's layers); with units, "
    "the parameters modules own themselves before the first unit form one block, "
    f"{EMBEDDING_NAME} (ViT's class token and position embedding), and a normalization layer "
    "after the last unit is randomized with the block after it (ViT's encoder.ln with the "
    "head)")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) and not any(True for _ in module.children())


def _is_composite(module: nn.Module) -> bool:
    """Whether ``module`` holds layers with parameters (a residual or transformer block)."""
    return any(_has_own_parameters(m) for m in module.modules() if m is not module)


def _is_repeat(module: nn.Module) -> bool:
    """A container of repeated units: children all of one class, each composite."""
    children = list(module.children())
    return (isinstance(module, _CONTAINERS) and bool(children)
            and len({type(child) for child in children}) == 1
            and all(_is_composite(child) for child in children))


def _holds_repeat(module: nn.Module) -> bool:
    """Whether a container of repeated units lies inside ``module``."""
    return any(_is_repeat(child) or _holds_repeat(child) for child in module.children())


def _block_modules(model: nn.Module) -> list[tuple[str, nn.Module, bool, str]]:
    """(path, module, whether its submodules belong to it, kind) for :data:`BLOCK_RULE`."""
    found: list[tuple[str, nn.Module, bool, str]] = []

    def own(path: str, module: nn.Module) -> None:
        if _has_own_parameters(module):
            found.append((path, module, False, _OWN))

    def units(path: str, container: nn.Module) -> None:
        own(path, container)
        for name, child in container.named_children():
            if _is_repeat(child):  # a stage of stages (RegNet's AnyStage): its members
                units(f"{path}.{name}", child)
            elif _holds_repeat(child):  # a stage holding its units (MaxViT's MaxVitBlock)
                own(f"{path}.{name}", child)
                visit(f"{path}.{name}.", child, top=False)
            else:
                found.append((f"{path}.{name}", child, True, _UNIT))

    def visit(prefix: str, module: nn.Module, top: bool) -> None:
        for name, child in module.named_children():
            path = prefix + name
            if _is_repeat(child):
                units(path, child)
            elif _holds_repeat(child) or (top and isinstance(child, _CONTAINERS)
                                          and not _has_own_parameters(child)):
                own(path, child)
                visit(path + ".", child, top=False)
            else:
                found.append((path, child, True, _MODULE))

    own("", model)
    visit("", model, top=True)
    return found


def repeated_units(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """The paths of the model's repeated units (:data:`BLOCK_RULE`) that run, in execution
    order (empty for a model without them, e.g. VGG or Inception-v3)."""
    first_call = _first_calls(model, example_input)
    units = [(first_call[id(module)], path) for path, module, _, kind in _block_modules(model)
             if kind == _UNIT and id(module) in first_call]
    return [path for _, path in sorted(units)]


def _merge_around_units(blocks: list[Block], kinds: list[str]) -> list[Block]:
    """Join the own parameters before the first unit into :data:`EMBEDDING_NAME`, and a lone
    normalization layer after the last unit with the block after it."""
    first = kinds.index(_UNIT)
    last = max(i for i, kind in enumerate(kinds) if kind == _UNIT)
    embedding = [i for i in range(first) if kinds[i] == _OWN]
    merged: list[Block] = []
    for i, block in enumerate(blocks):
        if i in embedding:  # placed where its last part is first used (ViT: the encoder)
            if i == embedding[-1]:
                merged.append(_joined([blocks[j] for j in embedding], EMBEDDING_NAME))
        elif i - 1 > last and kinds[i - 1] == _FINAL_NORM:
            merged[-1] = _joined([merged[-1], block], f"{merged[-1].name}+{block.name}")
        else:
            merged.append(block)
    return merged


def _joined(blocks: list[Block], name: str) -> Block:
    """One block randomizing what ``blocks`` do."""
    return Block(name=name, module_names=tuple(chain.from_iterable(b.module_names
                                                                   for b in blocks)),
                 parameter_names=tuple(chain.from_iterable(b.parameter_names for b in blocks)),
                 running_stat_names=tuple(chain.from_iterable(b.running_stat_names
                                                              for b in blocks)),
                 numel=sum(b.numel for b in blocks))


def select_blocks(blocks: list[Block], patterns: list[str], *, field: str) -> list[Block]:
    """The ``blocks`` whose names match one of ``patterns`` (names or ``fnmatch`` globs), in
    model order; ConfigError naming ``field`` when a pattern matches none."""
    for index, pattern in enumerate(patterns):
        if not any(fnmatch.fnmatchcase(block.name, pattern) for block in blocks):
            shown = ", ".join(block.name for block in blocks[:12]) \
                + (f", ... ({len(blocks)} in all)" if len(blocks) > 12 else "")
            raise ConfigError(f"{field}[{index}]: {pattern!r} matches no block; the blocks "
                              f"are {shown} (`saliencycheck validate` lists them)")
    return [block for block in blocks
            if any(fnmatch.fnmatchcase(block.name, pattern) for pattern in patterns)]


def plan_stages(blocks: list[Block], *, test: RandomizationTest, order: Order = "top_down",
                model: nn.Module) -> list[Stage]:
    """The stages of a randomization test, numbered from 1.

    ``test="cascading"``: stage k randomizes the first k blocks in ``order`` (cumulative);
    ``test="independent"``: stage k randomizes only the k-th block, the rest stay trained.
    ``order="top_down"`` goes from the logits toward the input (the paper's default),
    ``"bottom_up"`` the reverse. ``blocks`` come from :func:`find_blocks` (input → logits);
    ``model`` supplies the total parameter count for ``fraction_randomized``.
    """
    _check_choice("test", test, RandomizationTest)
    _check_choice("order", order, Order)
    total = sum(p.numel() for p in model.parameters())
    if sum(block.numel for block in blocks) > total:
        raise ValueError("the blocks hold more parameters than the model: "
                         "were they found on another model?")
    sequence = list(reversed(blocks)) if order == "top_down" else list(blocks)
    stages = []
    for k, block in enumerate(sequence, start=1):
        chosen = tuple(sequence[:k]) if test == "cascading" else (block,)
        stages.append(Stage(index=k, name=block.name, randomized_blocks=chosen,
                            fraction_randomized=sum(b.numel for b in chosen) / total))
    return stages


def block_seed(seed: int, block_name: str) -> int:
    """The seed of a block's generator: stable across processes (SHA-256, not ``hash``)."""
    digest = hashlib.sha256(f"{seed}/{block_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def reinitialize_(model: nn.Module, block: Block, *, init: Init = "reset", std: float = 0.1,
                  reset_running_stats: bool = False, seed: int) -> None:
    """Re-draw every parameter of ``block`` in ``model``, in place.

    Values come from a local ``torch.Generator`` seeded by :func:`block_seed`, drawn on the CPU
    and copied to the parameter's device, so they do not depend on the stage, the test, the
    device or the process.

    Parameters
    ----------
    init : ``"reset"``: each module's own initializer, as the paper re-ran each variable's
        initializer. Conv/ConvTranspose and Linear as their ``reset_parameters``
        (``kaiming_uniform_(a=sqrt(5))`` weight, bias U(±1/sqrt(fan_in))); BatchNorm, GroupNorm,
        LayerNorm, InstanceNorm, RMSNorm: weight 1, bias 0; Embedding: N(0, 1), padding row 0.
        Other modules with a ``reset_parameters`` method: that method, run with the CPU and
        CUDA global generators seeded from the block's generator inside
        ``torch.random.fork_rng``, which restores their states afterwards; anything else it
        touches is put back. Any remaining parameter (a bare ``nn.Parameter`` such as ViT's
        ``class_token``): truncated normal (±2 std) with the trained tensor's std (0.02 if 0).
        ``"normal"``: truncated normal N(0, std²) cut at ±2 std. ``"shuffle"``: a random
        permutation of the trained values.
    std : standard deviation for ``init="normal"``.
    reset_running_stats : also reset the running statistics of the block's norm layers
        (kept by default, as in the paper).
    seed : the run's seed.
    """
    _check_choice("init", init, Init)
    _check_std(std)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    generator = torch.Generator().manual_seed(block_seed(seed, block.name))
    fallback: dict[str, list[str]] = {}  # module path -> own parameter names to reset
    with torch.no_grad():
        for name in block.parameter_names:
            if name not in parameters:
                raise ModelError(f"block {block.name!r} names parameter {name!r}, which the "
                                 "model lacks: was the block found on another model?")
            param = parameters[name]
            path, _, local = name.rpartition(".")
            module = model.get_submodule(path)
            if init == "normal":
                value = _truncated_normal(param, std, generator)
            elif init == "shuffle":
                flat = param.detach().flatten()
                value = flat[torch.randperm(flat.numel(), generator=generator).to(flat.device)]
            else:
                value = _reset_value(module, local, param, generator)
                if value is None and not isinstance(module, _KNOWN) \
                        and callable(getattr(module, "reset_parameters", None)):
                    fallback.setdefault(path, []).append(local)
                    continue
                if value is None:
                    trained_std = float(param.detach().float().std(correction=0)) \
                        if param.numel() else 0.0
                    value = _truncated_normal(param, trained_std or _FALLBACK_STD, generator)
            param.copy_(value.view(param.shape))
        for path, names in fallback.items():
            module_seed = int(torch.randint(2**62, (1,), generator=generator))
            _reset_with_forked_rng(model.get_submodule(path), set(names), module_seed)
        if reset_running_stats:
            for path in dict.fromkeys(n.rpartition(".")[0] for n in block.running_stat_names):
                model.get_submodule(path).reset_running_stats()


class RandomizedModels:
    """One working copy of a model, randomized stage by stage.

    The user's model is deep-copied once and never modified; the copy's parameters never
    require gradients (attribution needs input gradients only; measured 5–10 % faster passes
    on ResNet-18). A stage is entered by swapping tensors, never by writing into them: each
    randomized block gets its own tensors (drawn once, on first use, by :func:`reinitialize_`;
    the same in every stage since the draw is seeded per block) and the trained tensors are
    put back to restore it. So the trained tensors never change, and an autograd graph built
    on the trained model stays valid while stages come and go (the prefix cache relies on it).
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = copy.deepcopy(model).eval().requires_grad_(False)
        self._slots: dict[str, list[tuple[nn.Module, str, bool]]] = {}  # name -> its aliases
        by_tensor: dict[int, list[tuple[nn.Module, str, bool]]] = {}
        self._trained: dict[str, torch.Tensor] = {}
        for name, tensor in _named_tensors(self._model):
            path, _, local = name.rpartition(".")
            module = self._model.get_submodule(path)
            slots = by_tensor.setdefault(id(tensor), [])
            slots.append((module, local, local in module._parameters))
            self._slots[name] = slots
            self._trained[name] = tensor
        self._drawn: dict[tuple, dict[str, torch.Tensor]] = {}
        self._current: dict[str, tuple] = {}  # randomized block name -> its draw key

    @property
    def model(self) -> nn.Module:
        """The working copy; in its trained state whenever no stage iteration is running."""
        return self._model

    def check(self, stages: Iterable[Stage]) -> None:
        """Raise ModelError if a stage names a parameter or buffer the model lacks."""
        for stage in stages:
            for block in stage.randomized_blocks:
                missing = [n for n in chain(block.parameter_names, block.running_stat_names)
                           if n not in self._trained]
                if missing:
                    raise ModelError(f"stage {stage.index} ({stage.name}) names {missing[0]!r}, "
                                     "which the model lacks: was it planned for another model?")

    def enter(self, stage: Stage | None, *, init: Init = "reset", std: float = 0.1,
              reset_running_stats: bool = False, seed: int = 0) -> nn.Module:
        """Put the working copy in ``stage``'s state (``None``: trained) and return it.

        Blocks randomized now but not before get their drawn tensors, blocks no longer
        randomized get their trained tensors back; the rest is untouched.
        """
        wanted = {} if stage is None else {
            block.name: (block, (block.name, init, std, reset_running_stats, seed))
            for block in stage.randomized_blocks}
        for name, key in list(self._current.items()):
            if wanted.get(name, (None, None))[1] != key:
                self._install({n: self._trained[n] for n in self._drawn[key]})
                del self._current[name]
        for name, (block, key) in wanted.items():
            if name in self._current:
                continue
            if key not in self._drawn:
                names = list(chain(block.parameter_names, block.running_stat_names))
                self._install({n: self._trained[n].detach().clone() for n in names})
                reinitialize_(self._model, block, init=init, std=std,
                              reset_running_stats=reset_running_stats, seed=seed)
                self._drawn[key] = {n: self._tensor(n) for n in names}
            self._install(self._drawn[key])
            self._current[name] = key
        self._model.eval()
        return self._model

    def stage_models(self, stages: Iterable[Stage], *, init: Init = "reset", std: float = 0.1,
                     reset_running_stats: bool = False,
                     seed: int) -> Iterator[tuple[Stage, nn.Module]]:
        """Yield ``(stage, model)`` in order, ``model`` being the working copy in eval mode.

        Each stage is entered with :meth:`enter` (same options). The trained state is restored
        at the end, also when the iteration stops early. Use each model before asking for the
        next.
        """
        _check_choice("init", init, Init)
        _check_std(std)
        stages = list(stages)
        self.check(stages)
        return self._iterate(stages, init=init, std=std,
                             reset_running_stats=reset_running_stats, seed=seed)

    def _iterate(self, stages: list[Stage], *, init: Init, std: float,
                 reset_running_stats: bool, seed: int) -> Iterator[tuple[Stage, nn.Module]]:
        try:
            for stage in stages:
                yield stage, self.enter(stage, init=init, std=std,
                                        reset_running_stats=reset_running_stats, seed=seed)
        finally:
            self.enter(None)

    def _tensor(self, name: str) -> torch.Tensor:
        module, local, is_parameter = self._slots[name][0]
        return (module._parameters if is_parameter else module._buffers)[local]

    def _install(self, tensors: dict[str, torch.Tensor]) -> None:
        """Point every alias of each named parameter/buffer at the given tensor."""
        for name, tensor in tensors.items():
            for module, local, is_parameter in self._slots[name]:
                if is_parameter:
                    if not isinstance(tensor, nn.Parameter):
                        tensor = nn.Parameter(tensor, requires_grad=False)
                    module._parameters[local] = tensor
                else:
                    module._buffers[local] = tensor


def logit_change(trained_logits: torch.Tensor, stage_logits: torch.Tensor) -> dict[str, float]:
    """How far a stage moved the model's outputs, over a batch of shape (N, C, ...).

    Returns ``relative_l2``, the mean over images of ||z' − z|| / ||z|| (0 for an image whose
    logits are unchanged, inf if only the trained logits are all zero), and
    ``top1_agreement``, the fraction of images whose arg-max class is unchanged.
    """
    if trained_logits.shape != stage_logits.shape or trained_logits.ndim < 2 \
            or trained_logits.shape[0] == 0:
        raise ValueError("logits must have the same shape (N, C, ...) with N >= 1, got "
                         f"{tuple(trained_logits.shape)} and {tuple(stage_logits.shape)}")
    z = trained_logits.detach().flatten(1).double()
    z_stage = stage_logits.detach().to(z.device).flatten(1).double()
    distance = (z_stage - z).norm(dim=1)
    relative = torch.where(distance == 0, torch.zeros_like(distance), distance / z.norm(dim=1))
    agreement = (z.argmax(dim=1) == z_stage.argmax(dim=1)).double()
    return {"relative_l2": float(relative.mean()), "top1_agreement": float(agreement.mean())}


def _check_choice(option: str, value: str, choices: object) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ConfigError(f"{option} must be one of {', '.join(map(repr, allowed))}, "
                          f"got {value!r}")


def _check_std(std: float) -> None:
    if not std > 0:
        raise ConfigError(f"init std must be positive, got {std!r}")


def _has_own_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    return chain(model.named_parameters(remove_duplicate=False),
                 model.named_buffers(remove_duplicate=False))


def _first_calls(model: nn.Module, example_input: torch.Tensor) -> dict[int, int]:
    """Order of first call of each module (by id) in one eval-mode forward pass."""
    order: dict[int, int] = {}

    def record(module: nn.Module, args: tuple) -> None:
        order.setdefault(id(module), len(order))

    modules = list(model.modules())
    training = [m.training for m in modules]
    handles = [m.register_forward_pre_hook(record) for m in modules]
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    except Exception as exc:
        raise ModelError(f"model: forward pass on the example input failed ({exc}); "
                         "check the input's shape and device") from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in zip(modules, training):
            module.training = mode
    return order


def _empty_like(param: torch.Tensor) -> torch.Tensor:
    """A CPU tensor to draw a parameter's new values into (at least float32)."""
    return torch.empty(param.shape, dtype=torch.promote_types(param.dtype, torch.float32))


def _truncated_normal(param: torch.Tensor, std: float,
                      generator: torch.Generator) -> torch.Tensor:
    return nn.init.trunc_normal_(_empty_like(param), mean=0.0, std=std, a=-2 * std, b=2 * std,
                                 generator=generator)


def _reset_value(module: nn.Module, local: str, param: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor | None:
    """New values from the initializer of a known module type, or None if not covered."""
    value = _empty_like(param)
    if isinstance(module, _CONVS + (nn.Linear,)):
        if local == "weight":
            return nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
        if local == "bias":
            weight = module.weight
            fan_in = weight.shape[1] * math.prod(weight.shape[2:])
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            return nn.init.uniform_(value, -bound, bound, generator=generator)
    elif isinstance(module, _NORMS):
        if local == "weight":
            return value.fill_(1.0)
        if local == "bias":
            return value.zero_()
    elif isinstance(module, nn.Embedding) and local == "weight":
        nn.init.normal_(value, generator=generator)
        if module.padding_idx is not None:
            value[module.padding_idx] = 0
        return value
    return None


def _reset_with_forked_rng(module: nn.Module, names: set[str], seed: int) -> None:
    """Run ``module.reset_parameters()`` for its own parameters ``names``, leaving the global
    CPU/CUDA generators and every other tensor of the module as they were."""
    targets = {id(p) for n, p in module.named_parameters(recurse=False) if n in names}
    others = [(t, t.detach().clone()) for _, t in chain(module.named_parameters(),
                                                        module.named_buffers())
              if id(t) not in targets]
    cuda = sorted({p.device.index for p in module.parameters(recurse=False)
                   if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        module.reset_parameters()
    for tensor, saved in others:
        tensor.copy_(saved)
