"""Build the model under test: a torchvision builder, torchvision weights or a local checkpoint."""

from __future__ import annotations

import inspect
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from saliencycheck.config import ModelConfig
from saliencycheck.errors import (
    ANSI_CODES,
    ConfigError,
    ModelError,
    UserCodeError,
    first_line,
)
from saliencycheck.imports import import_callable
from saliencycheck.suggest import did_you_mean

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for the model: square size and per-channel normalisation."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None = None  # resize the shorter side to this before centre-cropping to size


@dataclass(frozen=True)
class LoadedModel:
    """The model in eval mode plus where its weights came from and its own preprocessing."""

    module: nn.Module
    weights_source: str
    preprocessing: Preprocessing | None  # the torchvision weights' own, when weights were named


def _builder(name: str) -> Callable[..., nn.Module]:
    try:
        return torchvision.models.get_model_builder(name)
    except ValueError:
        known = sorted(torchvision.models.list_models(module=torchvision.models))
        close = [n for n in known if n.startswith(name[:4])][:6] or known[:6]
        raise ConfigError(
            f"model.name: unknown torchvision model {name!r}{did_you_mean(name, known)}; "
            f"torchvision has e.g. {', '.join(close)} (full list: "
            "torchvision.models.list_models())"
        ) from None


def _torchvision_weights(name: str, weights: str) -> Any | None:
    """The weights enum member for `weights`, or None when it is not a weights name."""
    try:
        enum = torchvision.models.get_model_weights(name)
    except ValueError:
        return None
    if weights == "DEFAULT":
        return enum.DEFAULT
    return enum.__members__.get(weights)


def _weights_preprocessing(weights: Any) -> Preprocessing | None:
    transforms = weights.transforms()
    crop = getattr(transforms, "crop_size", None)
    mean = getattr(transforms, "mean", None)
    std = getattr(transforms, "std", None)
    if not crop or mean is None or std is None:
        return None
    resize = getattr(transforms, "resize_size", None)
    return Preprocessing(
        size=int(crop[0]),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        resize=int(resize[0]) if resize else None,
    )


SAVE_STATE_DICT = "torch.save(model.state_dict(), path)"
KEYS_SHOWN = 4  # mismatched keys listed per kind (missing, unexpected, size)
_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
_SIZE = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) "
                   r"from checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)")


def extract_state_dict(checkpoint: Any, *, path: Path,
                       field: str = "model.weights") -> dict[str, torch.Tensor]:
    """Find the state_dict in a checkpoint and strip DataParallel 'module.' prefixes."""
    state = checkpoint
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                state = checkpoint[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(
            f"{field}: {path} holds no state_dict (expected a dict of tensors, or one "
            f"under 'state_dict' or 'model'); re-save it with {SAVE_STATE_DICT}"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def _is_raw_pickle(path: Path) -> bool:
    """Whether the file starts like a pickle of protocol 2-5: a raw pickle (torch.save writes
    zip archives)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _load_failure(exc: Exception, path: Path, field: str) -> ModelError:
    """Why ``torch.load(weights_only=True)`` refused a file, as one line with the fix."""
    if isinstance(exc, PermissionError):
        return ModelError(f"{field}: cannot read checkpoint {path} (permission denied); make it "
                          "readable by this user")
    text = ANSI_CODES.sub("", str(exc))
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = _GLOBAL.search(text)
        if found or _is_raw_pickle(path):
            what = (f"pickled Python objects ({found.group(1)}, as torch.save(model) writes)"
                    if found else "a raw Python pickle (not written by torch.save)")
            return ModelError(
                f"{field}: {path} is not a plain state_dict but {what}: loading it would run "
                "code, which weights_only=True loading refuses; from trusted code, re-save it "
                f"with {SAVE_STATE_DICT}"
            )
    return ModelError(
        f"{field}: {path} is truncated or corrupt (torch.load failed with "
        f"{type(exc).__name__}); re-save it with {SAVE_STATE_DICT}, or download or copy it "
        "again"
    )


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= size - 8


def _is_torchscript(path: Path) -> bool:
    """A ``torch.jit.save`` archive: a zip holding compiled code and constants, which
    ``torch.save`` archives never hold."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _is_onnx(path: Path, head: bytes) -> bool:
    """An ONNX model: by suffix (unless it is a zip, as torch.save writes), or a protobuf
    ModelProto's start (ir_version, a small varint, then producer_name), which neither a zip
    nor a pickle starts with."""
    return (path.suffix.lower() == ".onnx" and not head.startswith(b"PK")) or (
        len(head) >= 3 and head[0] == 0x08 and head[1] < 0x80 and head[2] == 0x12)


def _foreign_format(path: Path, field: str) -> ModelError | None:
    """A checkpoint format saliencycheck does not read (safetensors, TorchScript, ONNX), named
    with the conversion to a state_dict; None for anything else."""
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
        size = path.stat().st_size
    except OSError:
        return None  # torch.load reports it
    name = path.name
    if _is_safetensors(head, size):
        return ModelError(
            f"{field}: {path} is a safetensors file, which saliencycheck does not read; "
            f"convert it to a state_dict: from safetensors.torch import load_file; "
            f"torch.save(load_file('{name}'), '{path.stem}.pt'), and give that .pt file")
    if _is_torchscript(path):
        return ModelError(
            f"{field}: {path} is a TorchScript archive (torch.jit.save), which saliencycheck "
            "does not load (it would run the archive's code); from trusted code, save its "
            f"weights: torch.save(torch.jit.load('{name}').state_dict(), '{path.stem}.pt'), "
            "and give that .pt file with model.name or model.factory building the same "
            "architecture")
    if _is_onnx(path, head):
        return ModelError(
            f"{field}: {path} is an ONNX model, which saliencycheck does not read (it explains "
            "PyTorch modules); give the PyTorch state_dict it was exported from, saved with "
            f"{SAVE_STATE_DICT}")
    return None


def read_checkpoint(path: Path, *, field: str = "model.weights") -> dict[str, torch.Tensor]:
    """The state_dict in a local checkpoint, loaded safely: ``weights_only=True`` runs no code
    from the file. Every failure is a `ModelError` naming ``field``, the file and the fix;
    safetensors, TorchScript and ONNX files are named as such, with the conversion."""
    try:
        empty = path.stat().st_size == 0
    except OSError as exc:
        raise ModelError(f"{field}: cannot read checkpoint {path} "
                         f"({exc.strerror or first_line(exc)})") from None
    if empty:
        raise ModelError(f"{field}: {path} is empty (0 bytes), so it holds no weights; re-save "
                         f"it with {SAVE_STATE_DICT}, or download or copy it again")
    foreign = _foreign_format(path, field)
    if foreign is not None:
        raise foreign
    try:
        with warnings.catch_warnings():  # raw pickles warn before they are refused: one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol",
                                    category=UserWarning)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt / unsafe files
        raise _load_failure(exc, path, field) from None
    return extract_state_dict(checkpoint, path=path, field=field)


def _keys(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:KEYS_SHOWN]) + (", ..." if len(keys) > KEYS_SHOWN else "")
    return f"{len(keys)} {kind} keys (first: {shown})"


def _size_mismatches(exc: RuntimeError) -> str:
    """The size mismatches `load_state_dict` reports, shortened; else its first line."""
    found = _SIZE.findall(str(exc))
    if not found:
        return first_line(exc)[:200]
    shown = [f"{key} (checkpoint {saved}, model {expected})"
             for key, saved, expected in found[:KEYS_SHOWN]]
    more = f", ... ({len(found)} in all)" if len(found) > KEYS_SHOWN else ""
    return f"size mismatch for {', '.join(shown)}{more}"


def load_state_strictly(module: nn.Module, state: dict[str, torch.Tensor], *, path: Path,
                        field: str) -> None:
    """Load ``state`` into ``module`` (changing it), strictly: a `ModelError` lists the first
    missing, unexpected and mis-shaped keys."""
    fix = "check model.name and model.num_classes"
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches are raised even with strict=False
        raise ModelError(f"{field}: {path} does not match the model: {_size_mismatches(exc)}; "
                         f"{fix}") from None
    parts = []
    if result.missing_keys:
        parts.append(_keys("missing", result.missing_keys))
    if result.unexpected_keys:
        parts.append(_keys("unexpected", result.unexpected_keys))
    if parts:
        raise ModelError(f"{field}: {path} does not match the model: {'; '.join(parts)}; {fix}")


def load_checkpoint(module: nn.Module, path: Path, *, field: str = "model.weights") -> None:
    """Load a local checkpoint into `module` safely (`weights_only=True`) and strictly."""
    load_state_strictly(module, read_checkpoint(path, field=field), path=path, field=field)


def _import_factory(name: str) -> Callable[..., Any]:
    """The factory the config names. A module that does not exist or whose own imports fail
    is a `ConfigError` (exit 2, the fix is the user's); a module that exits or raises on import
    is a `UserCodeError` (exit 3) naming it, its traceback kept for the error log."""
    try:
        return import_callable(name)
    except ValueError as exc:
        raise ConfigError(f"model.factory: {exc}") from None
    except SystemExit as exc:
        raise UserCodeError(f"model.factory {name!r}: its module called sys.exit({exc.code!r}) "
                            "on import; saliencycheck stopped (exit 3, never a verdict's "
                            "code); remove that call") from exc
    except Exception as exc:  # the user's module: any error its import raises
        raise UserCodeError(f"model.factory {name!r}: importing its module raised "
                            f"{type(exc).__name__}: {first_line(exc)[:160]}; fix the module"
                            ) from exc


def _call_factory(factory: Callable[..., Any], name: str, kwargs: dict[str, Any]) -> Any:
    """``factory(**kwargs)``: keyword arguments its signature refuses are a `ConfigError`;
    a missing package it imports a `ConfigError` naming it; ``sys.exit`` and any other error
    a `UserCodeError` naming the factory. KeyboardInterrupt propagates (the CLI exits 130)."""
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.factory_kwargs: {name} rejected them ({exc})") from None
    except ValueError:
        pass  # no signature to check (a builtin): the call says
    try:
        return factory(**kwargs)
    except ImportError as exc:  # an import inside the factory
        fix = ("install the package that provides it in this environment"
               if isinstance(exc, ModuleNotFoundError) else "fix that import")
        raise ConfigError(f"model.factory: {name} failed importing a module "
                          f"({first_line(exc)}); {fix}") from None
    except SystemExit as exc:
        raise UserCodeError(f"model.factory {name!r} called sys.exit({exc.code!r}) instead of "
                            "returning a model; saliencycheck stopped (exit 3, never a "
                            "verdict's code); remove that call") from exc
    except Exception as exc:  # the user's code: any error it raises
        raise UserCodeError(f"model.factory {name!r} raised {type(exc).__name__}: "
                            f"{first_line(exc)[:160]}; fix the factory or "
                            "model.factory_kwargs") from exc


def _build(builder: Callable[..., nn.Module], cfg: ModelConfig, **kwargs: Any) -> nn.Module:
    """``builder(**kwargs)``; a keyword of ``model.kwargs`` it rejects is a ConfigError listing
    the keywords its model class takes (torchvision builders pass them on to it)."""
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as exc:
        if not cfg.kwargs:
            raise
        model_class = inspect.signature(builder).return_annotation
        takes = [name for name in inspect.signature(model_class).parameters
                 if name not in ("self", "num_classes", "args", "kwargs")] \
            if inspect.isclass(model_class) else []
        listed = f"; its model class {model_class.__name__} takes: {', '.join(takes)}" \
            if takes else ""
        raise ConfigError(f"model.kwargs: {cfg.name} rejects {cfg.kwargs} "
                          f"({first_line(exc)[:160]}){listed}") from None


def build_model(cfg: ModelConfig, *, resolve: Callable[[str], Path] = Path) -> LoadedModel:
    """Build the configured model in eval mode (CPU); the caller moves it to the device."""
    preprocessing = None
    weights_source = "random initialisation"
    checkpoint: Path | None = None
    if cfg.factory:
        factory = _import_factory(cfg.factory)
        kwargs = dict(cfg.factory_kwargs)
        if cfg.num_classes is not None:
            kwargs.setdefault("num_classes", cfg.num_classes)
        module = _call_factory(factory, cfg.factory, kwargs)
        if not isinstance(module, nn.Module):
            raise ModelError(f"model.factory: {cfg.factory} returned {type(module).__name__}, "
                             "not a torch.nn.Module")
        weights_source = f"factory {cfg.factory}"
        if cfg.weights:
            checkpoint = resolve(cfg.weights)
    else:
        builder = _builder(cfg.name)
        kwargs: dict[str, Any] = dict(cfg.kwargs)
        if cfg.num_classes is not None:
            kwargs["num_classes"] = cfg.num_classes
        enum_weights = _torchvision_weights(cfg.name, cfg.weights) if cfg.weights else None
        if enum_weights is not None:
            classes = len(enum_weights.meta.get("categories") or []) or None
            if cfg.num_classes is not None and classes and cfg.num_classes != classes:
                raise ConfigError(
                    f"model.num_classes: {cfg.num_classes} differs from the {classes} classes of "
                    f"{cfg.name} weights {cfg.weights}; remove num_classes or use a checkpoint"
                )
            kwargs.pop("num_classes", None)
            try:
                module = _build(builder, cfg, weights=enum_weights, **kwargs)
            except ConfigError:
                raise
            except Exception as exc:  # download or cache failures surface here
                raise ModelError(
                    f"model.weights: cannot load torchvision weights {cfg.name}/{cfg.weights} "
                    f"({type(exc).__name__}: {first_line(exc)[:160]}); they are "
                    "downloaded once to the torch hub cache, or use a local checkpoint path"
                ) from None
            preprocessing = _weights_preprocessing(enum_weights)
            weights_source = f"torchvision {enum_weights}"
        else:
            if cfg.weights:
                checkpoint = resolve(cfg.weights)
                if not checkpoint.is_file():
                    raise ConfigError(
                        f"model.weights: {cfg.weights!r} is neither a torchvision weights name "
                        f"for {cfg.name} nor an existing checkpoint file ({checkpoint})"
                    )
            if cfg.name in ("googlenet", "inception_v3"):
                kwargs.setdefault("init_weights", True)  # silences torchvision's warning
            module = _build(builder, cfg, weights=None, **kwargs)
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise ConfigError(f"model.weights: checkpoint file not found: {checkpoint}")
        load_checkpoint(module, checkpoint)
        weights_source = f"checkpoint {checkpoint}"
    module.eval()
    return LoadedModel(module=module, weights_source=weights_source, preprocessing=preprocessing)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available; 'cpu', 'cuda' and 'cuda:N' are checked against this
    machine. Other torch device types (mps, xpu, meta, ...) are refused: the runner's memory
    handling and generators are written for CPU and CUDA only."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fix = "use auto, cpu, cuda or cuda:N with N < torch.cuda.device_count()"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"runtime.device: {name!r} is not a device; {fix}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"runtime.device: {name!r} is not supported (saliencycheck runs on "
                          f"CPU or CUDA devices only); {fix}")
    if not torch.cuda.is_available():
        raise ConfigError(f"runtime.device: CUDA requested but not available ({name!r} on a "
                          "machine without a usable CUDA GPU); use auto or cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"runtime.device: {name!r} names GPU {device.index}, but this machine "
                          f"has {count} (cuda:0 to cuda:{count - 1}); {fix}")
    return device


def get_submodule(model: nn.Module, path: str, *, field: str) -> nn.Module:
    """Look up a dotted module path, with an error listing valid top-level names."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        paths = [n for n, _ in model.named_modules() if n]
        names = [n for n, _ in model.named_children()]
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-3:]
        hint = f"; its last convolutions are {', '.join(convs)}" if convs else ""
        raise ModelError(
            f"{field}: the model has no module {path!r}{did_you_mean(path, paths)}; use a dotted "
            f"module path; the top-level modules are {shown}{hint}"
        ) from None
