"""Print the README's config reference table from the pydantic schema (so the two never drift)."""

from __future__ import annotations

from typing import get_args

from pydantic import BaseModel

from saliencycheck.config import Config


def _section(annotation: object) -> type[BaseModel] | None:
    """The config section a field holds (also behind ``| None``), or None for a plain value."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    defaults = model.model_construct() if prefix else Config()
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        section = _section(info.annotation)
        if section is not None and section is not type(None):
            if section is not info.annotation:  # an optional section: say what leaving it out does
                out.append(f"| `{path}` | — | {info.description} |")
            out += rows(section, path + ".")
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
