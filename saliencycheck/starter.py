"""The fully commented starter config that `saliencycheck init` writes, generated from the schema.

Generated from the pydantic field descriptions, so it can never drift from what `validate`
accepts.
"""

from __future__ import annotations

import textwrap
from typing import Any, get_args

import yaml
from pydantic import BaseModel

from saliencycheck.config import Config

HEADER = """\
# saliencycheck config. Validate with `saliencycheck validate THIS_FILE`, run with
# `saliencycheck run THIS_FILE`. Every key is optional; shown values are the defaults.
# Reference: docs/config.md (every key, its default and meaning).
"""

EXAMPLE_METHODS = [
    "gradient",
    "gradient_x_input",
    {"name": "integrated_gradients", "steps": 50, "baseline": "black"},
    "guided_backprop",
    {"name": "gradcam"},
    "guided_gradcam",
    {"name": "smoothgrad", "samples": 50, "noise": 0.15},
]


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, 88 - len(indent))]


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=200)
    return text.strip().removesuffix("...").strip()


def _optional_section(annotation: object) -> type[BaseModel] | None:
    """The section class behind an ``X | None`` field (off unless given), else None."""
    return next((a for a in get_args(annotation)
                 if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _section(model: BaseModel, indent: str, *, expand: bool = False) -> list[str]:
    """Each field with its description; ``expand`` also writes optional sections' defaults."""
    lines: list[str] = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        lines += _comment(info.description or "", indent)
        optional = _optional_section(info.annotation)
        if value is None and optional is not None:
            if expand:
                lines.append(f"{indent}{name}:")
                lines += _section(optional.model_construct(), indent + "  ", expand=True)
                continue
            # Off unless given: its keys commented out, ready to uncomment.
            lines.append(f"{indent}# {name}:")
            lines += [f"{indent}# {line[len(indent):]}"
                      for line in _section(optional.model_construct(), indent + "  ",
                                           expand=True)
                      if not line.lstrip().startswith("#")]
        elif isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:")
            lines += _section(value, indent + "  ")
        else:
            dumped = value if not isinstance(value, tuple) else list(value)
            lines.append(f"{indent}{name}: {_scalar(dumped)}")
    return lines


def starter_config() -> str:
    """YAML text of the default config with every field's description as a comment."""
    config = Config(methods=EXAMPLE_METHODS)
    lines = [HEADER]
    for name, info in Config.model_fields.items():
        value = getattr(config, name)
        lines += _comment(info.description or "", "")
        if isinstance(value, BaseModel):
            lines.append(f"{name}:")
            lines += _section(value, "  ")
        elif name == "methods":
            lines.append("methods:")
            lines += [f"  - {_scalar(m)}" for m in EXAMPLE_METHODS]
        else:
            lines.append(f"{name}: {_scalar(value)}")
        lines.append("")
    return "\n".join(lines)
