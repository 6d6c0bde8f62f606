"""Print the README's config reference table from the pydantic schema (so the two never drift)."""

from __future__ import annotations

from pydantic import BaseModel

from saliencycheck.config import Config


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    defaults = model() if prefix else Config()
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += rows(annotation, path + ".")
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
