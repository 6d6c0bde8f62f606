"""Print docs/config.md's config reference table from the pydantic schema (the two never drift)."""

from __future__ import annotations

from types import UnionType
from typing import Union, get_args, get_origin

from pydantic import BaseModel

from saliencycheck.config import Config


def _section(annotation: object) -> type[BaseModel] | None:
    """The config section a field holds (also behind ``| None``), or None for a plain value."""
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else ()
    for candidate in (annotation, *options):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _keyed_section(annotation: object) -> type[BaseModel] | None:
    """The section a ``dict[name, Section]`` field maps each name to, else None."""
    if get_origin(annotation) is dict:
        return _section(get_args(annotation)[1])
    return None


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    defaults = model.model_construct() if prefix else Config()
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        keyed = _keyed_section(info.annotation)
        if keyed is not None:
            out.append(f"| `{path}` | — | {info.description} |")
            out += rows(keyed, path + ".<test>.")
            continue
        section = _section(info.annotation)
        if section is not None and section is not type(None):
            if section is not info.annotation:  # an optional section: say what leaving it out does
                out.append(f"| `{path}` | — | {info.description} |")
            out += rows(section, path + ".")
            continue
        if info.is_required():
            out.append(f"| `{path}` | required | {info.description} |")
            continue
        value = getattr(defaults, name)
        if name == "methods":
            value = "gradient, guided_backprop"
        elif isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        shown = "—" if value is None or value == {} else f"`{value}`"
        out.append(f"| `{path}` | {shown} | {info.description} |")
    return out


if __name__ == "__main__":
    print("| key | default | meaning |\n|---|---|---|")
    print("\n".join(rows(Config)))
