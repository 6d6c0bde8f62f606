"""Which relevance rules ignore the layers above them? LRP and friends on the trained digits ResNet.

Sixt, Granz & Landgraf (ICML 2020) proved that LRP-z⁺ and αβ, Deep Taylor and guided backprop
produce explanations that do not depend on the parameters of later layers, while the gradient,
LRP-ε and DeepLIFT do. Here the quickstart's trained digits ResNet-18 is randomized block by
block from the logits down (cascading), and each method's maps on the 20 sample digits are
compared with the trained model's (mean abs-Spearman).

    .venv/bin/python examples/lrp_digits.py [--figure docs/lrp_curves_cascading.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import saliencycheck as sc
from saliencycheck.zoo import digits_resnet18

DIGITS = Path(__file__).resolve().parent.parent / "sample_images" / "digits"
METHODS = ["gradient", sc.method("lrp", rule="epsilon"), sc.method("lrp", rule="zplus"),
           sc.method("lrp", rule="alpha_beta", alpha=1, beta=0),
           sc.method("lrp", composite="epsilon_plus"), "deep_taylor", "guided_backprop"]
LABELS = ["gradient", "lrp_epsilon", "lrp_zplus", "lrp_alpha_beta", "lrp_epsilon_plus",
          "deep_taylor", "guided_backprop"]


def check_rules(cache: str | None = None, *, images: int | None = None,
                blocks: list[str] | None = None) -> sc.Result:
    """The run: cascading block by block on the trained digits ResNet-18 (the first
    ``images`` digits and only ``blocks``, for a quicker look)."""
    cascading = {"granularity": "block", **({"blocks": blocks} if blocks else {})}
    return sc.check(
        digits_resnet18(cache=cache),
        DIGITS,
        image_settings={"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
                        **({"limit": images} if images else {})},
        methods=METHODS,
        tests={"cascading": cascading},
        metrics=["spearman_abs"],
        device="cpu",
        output_settings={"figures": False},
    )


def table(result: sc.Result) -> str:
    """Mean abs-Spearman with the trained maps per method at each stage (Markdown), and the
    random-network floor."""
    rows = {(s.test, s.method, s.stage): s.mean for s in result.run.summary
            if s.metric == "spearman_abs"}
    stages = result.setup.stage_names["cascading"][1:]
    lines = ["| stage randomized (cumulative) | " + " | ".join(LABELS) + " |",
             "|---|" + "---:|" * len(LABELS)]
    for stage in stages:
        lines.append(f"| `{stage}` | " + " | ".join(
            f"{rows[('cascading', m, stage)]:.2f}" for m in LABELS) + " |")
    floor = [rows.get(("random_floor", m, "random_vs_random")) for m in LABELS]
    if all(f is not None for f in floor):
        lines.append("| random-network floor | " + " | ".join(f"{f:.2f}" for f in floor)
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", type=Path, help="save the cascading curves here (PNG)")
    args = parser.parse_args()
    result = check_rules()
    print(table(result))
    if args.figure:
        result.plot_curves("cascading").savefig(args.figure, dpi=110, bbox_inches="tight")
