"""Which relevance rules ignore the layers above them? LRP and friends on trained digits models.

Sixt, Granz & Landgraf (ICML 2020) proved that LRP-z⁺ and αβ, Deep Taylor and guided backprop
produce explanations that do not depend on the parameters of later layers, while the gradient,
LRP-ε and DeepLIFT do. Two trained models, the quickstart's digits ResNet-18 and a VGG-style
network (:func:`saliencycheck.zoo.digits_vgg`), are randomized block by block from the logits
down (cascading: mean abs-Spearman of each method's maps on the 20 sample digits with the
trained model's, next to the random-map control), and each method's cosine similarity
convergence is measured (CSC: random relevance injected at each block, from the logits down).

    .venv/bin/python examples/lrp_digits.py [--model resnet18|vgg] [--figure PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import saliencycheck as sc
from saliencycheck.zoo import digits_resnet18, digits_vgg

DIGITS = Path(__file__).resolve().parent.parent / "sample_images" / "digits"
METHODS = ["gradient", sc.method("lrp", rule="epsilon"), sc.method("lrp", rule="zplus"),
           sc.method("lrp", rule="alpha_beta", alpha=1, beta=0),
           sc.method("lrp", composite="epsilon_plus"), "deep_taylor", "guided_backprop",
           "deeplift"]
LABELS = ["gradient", "lrp_epsilon", "lrp_zplus", "lrp_alpha_beta", "lrp_epsilon_plus",
          "deep_taylor", "guided_backprop", "deeplift"]
MODELS = {"resnet18": (digits_resnet18, 64), "vgg": (digits_vgg, 32)}


def check_rules(cache: str | None = None, *, model: str = "resnet18", images: int | None = None,
                blocks: list[str] | None = None, csc_samples: int | None = 32) -> sc.Result:
    """The run on a trained digits ``model`` (the first ``images`` digits and only ``blocks``,
    for a quicker look; ``csc_samples`` None: no CSC test)."""
    build, size = MODELS[model]
    only = {"blocks": blocks} if blocks else {}
    tests = {"cascading": {"granularity": "block", **only}}
    if csc_samples:
        tests["csc"] = {"enabled": True, "samples": csc_samples, **only}
    return sc.check(
        build(cache=cache),
        DIGITS,
        image_settings={"size": size, "mean": [0.5] * 3, "std": [0.5] * 3,
                        **({"limit": images} if images else {})},
        methods=METHODS,
        tests=tests,
        metrics=["spearman_abs"],
        device="cpu",
        output_settings={"figures": False},
    )


def table(result: sc.Result) -> str:
    """Mean abs-Spearman with the trained maps per method at each stage (Markdown), then the
    random-map control and the random-network floor."""
    rows = {(s.test, s.method, s.stage): s.mean for s in result.run.summary
            if s.metric == "spearman_abs"}
    columns = [*LABELS, "random_map"]
    stages = result.setup.stage_names["cascading"][1:]
    lines = ["| stage randomized (cumulative) | " + " | ".join(
                 f"{m} (control)" if m == "random_map" else m for m in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for stage in stages:
        lines.append(f"| `{stage}` | " + " | ".join(
            f"{rows[('cascading', m, stage)]:.2f}" for m in columns) + " |")
    floor = [rows.get(("random_floor", m, "random_vs_random")) for m in LABELS]
    if all(f is not None for f in floor):
        lines.append("| random-network floor | " + " | ".join(f"{f:.2f}" for f in floor)
                     + " | |")
    return "\n".join(lines)


def csc_table(result: sc.Result, points: int = 4) -> str:
    """Mean CSC per method at the first ``points`` injection points from the logits down."""
    rows = {(s.method, s.stage): s.mean for s in result.run.summary if s.test == "csc"}
    stages = result.setup.stage_names["csc"][1:points + 1]
    lines = ["| CSC, injected at | " + " | ".join(f"`{s}`" for s in stages) + " |",
             "|---|" + "---:|" * len(stages)]
    for method in [*LABELS, "random_vectors"]:
        lines.append(f"| {method} | " + " | ".join(f"{rows[(method, s)]:.2f}" for s in stages)
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    parser.add_argument("--figure", type=Path, help="save the cascading curves here (PNG)")
    parser.add_argument("--csc-figure", type=Path, help="save the CSC curves here (PNG)")
    args = parser.parse_args()
    result = check_rules(model=args.model)
    print(table(result), "", csc_table(result), sep="\n")
    if args.figure:
        result.plot_curves("cascading").savefig(args.figure, dpi=110, bbox_inches="tight")
    if args.csc_figure:
        result.plot_curves("csc").savefig(args.csc_figure, dpi=110, bbox_inches="tight")
