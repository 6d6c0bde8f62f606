"""The deployed methods against Captum on VGG-16, the family Captum's LRP runs on.

    .venv/bin/python benchmarks/methods_vs_captum.py                    # CPU sizes, 2 cores
    .venv/bin/python benchmarks/methods_vs_captum.py --device cuda --size 224 --images 32

The same maps on both sides, on one model object (torchvision's VGG-16, seeded random weights:
none can be downloaded here, and the cost does not depend on them), the same normalised
images and the trained model's predicted classes, fp32:

* ``lrp`` with ``composite: epsilon_plus`` against Captum's ``LRP`` with its z⁺ rule
  (``Alpha1_Beta0_Rule``) on the convolutions and ε (1e-6) on the linear layers. Captum's
  α1β0 keeps the bias and applies W⁺ to the signed pixels of the first layer (zennit and
  saliencycheck split them by sign): the maps differ there, the work does not;
* ``occlusion`` (window and stride that tile the image) against Captum's ``Occlusion`` with a
  window over all channels and ``perturbations_per_eval`` = the chunk size: the same batched
  forward passes, the same maps;
* ``deeplift`` (black baseline) against Captum's ``DeepLift``: VGG calls each ReLU module once,
  where Captum's rule is right, so the maps agree.

Each side is warmed up once, then timed ``--repeat`` times (the minimum is reported, every run
listed); the maps' largest difference relative to the largest value is reported next to the
ratio. Writes ``--output`` (default ``benchmarks/results-methods-cpu.md``).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from saliencycheck.methods import AttributionContext, resolve_method  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def vgg16_seeded() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval()


def captum_lrp(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from captum.attr import LRP
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.rule = Alpha1_Beta0_Rule()
            module.rule.STABILITY_FACTOR = 1e-6
        elif isinstance(module, nn.Linear):
            module.rule = EpsilonRule(epsilon=1e-6)
    return LRP(model).attribute(x, target=targets)


def captum_occlusion(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, *, window: int,
                     stride: int, per_eval: int) -> torch.Tensor:
    from captum.attr import Occlusion

    return Occlusion(model).attribute(x, sliding_window_shapes=(3, window, window),
                                      strides=(3, stride, stride), baselines=0.0,
                                      target=targets, perturbations_per_eval=per_eval)[:, :1]


def captum_deeplift(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from captum.attr import DeepLift

    black = ((torch.zeros(1, 3, 1, 1) - torch.tensor(MEAN).view(1, 3, 1, 1))
             / torch.tensor(STD).view(1, 3, 1, 1)).to(x)
    return DeepLift(model).attribute(x, baselines=black.expand_as(x), target=targets)


def timed(fn, device: torch.device, repeat: int) -> tuple[list[float], torch.Tensor]:
    """Warm-up, then ``repeat`` timed runs; (seconds of each, the last result)."""
    result = fn()
    runs = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
    return runs, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--window", type=int, default=28, help="occlusion window (px)")
    parser.add_argument("--stride", type=int, default=14, help="occlusion stride (px)")
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).parent / "results-methods-cpu.md")
    args = parser.parse_args(argv)
    if (args.size - args.window) % args.stride:
        parser.error("--window and --stride must tile --size (Captum leaves the rest out)")
    device = torch.device(args.device)
    model = vgg16_seeded().to(device)
    for module in model.modules():  # Captum's LRP and DeepLift need out-of-place ReLUs
        if isinstance(module, nn.ReLU):
            module.inplace = False
    x = torch.randn(args.images, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        targets = model(x).argmax(dim=1)
    context = AttributionContext(mean=MEAN, std=STD, chunk_size=args.chunk_size)
    occlusion = {"name": "occlusion", "window": args.window, "stride": args.stride}
    cases = [
        ("lrp (epsilon_plus)", {"name": "lrp", "composite": "epsilon_plus"},
         lambda: captum_lrp(copy.deepcopy(model), x, targets)),
        (f"occlusion ({args.window} px, stride {args.stride})", occlusion,
         lambda: captum_occlusion(model, x, targets, window=args.window, stride=args.stride,
                                  per_eval=args.chunk_size)),
        ("deeplift (black)", {"name": "deeplift", "baseline": "black"},
         lambda: captum_deeplift(model, x, targets)),
    ]
    rows = []
    warnings.filterwarnings("ignore")
    for name, entry, captum in cases:
        method = resolve_method(entry)
        ours_runs, ours = timed(lambda m=method: m(model, x, targets, context), device,
                                args.repeat)
        theirs_runs, theirs = timed(captum, device, args.repeat)
        difference = float((ours - theirs.to(ours)).abs().max() / theirs.abs().max())
        rows.append((name, ours_runs, theirs_runs, difference))
        print(f"{name}: saliencycheck {min(ours_runs):.2f} s, Captum {min(theirs_runs):.2f} s, "
              f"{min(theirs_runs) / min(ours_runs):.2f}×, max |Δ| / max {difference:.1e}")
    import captum

    lines = ["# Deployed methods against Captum (VGG-16)", "",
             f"- {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
             f"device {device}, torch {torch.__version__}, torchvision "
             f"{torchvision.__version__}, captum {captum.__version__}, "
             f"{torch.get_num_threads()} threads",
             f"- VGG-16 (seeded random weights), {args.images} images of {args.size}×{args.size}, "
             f"chunk size {args.chunk_size}, fp32, best of {args.repeat} after a warm-up",
             f"- `python benchmarks/methods_vs_captum.py {' '.join(argv or sys.argv[1:])}`",
             "", "| method | saliencycheck s | Captum s | Captum / saliencycheck | "
             "max abs. difference / max |", "|---|---:|---:|---:|---:|"]
    for name, ours_runs, theirs_runs, difference in rows:
        lines.append(f"| {name} | {min(ours_runs):.2f} | {min(theirs_runs):.2f} | "
                     f"{min(theirs_runs) / min(ours_runs):.2f}× | {difference:.1e} |")
    lines += ["", "The maps: occlusion's are Captum's (the same positions and baseline). LRP's "
              "differ by definition: Captum's z⁺ keeps the biases and applies W⁺ to the signed "
              "pixels of the first layer (`tests/test_lrp.py` checks equality where both define "
              "the rules alike). DeepLIFT's differ at VGG's max pooling, where Captum's rule "
              "misses summation-to-delta (`tests/test_deeplift.py`). The work is the same: one "
              "modified backward per image, or the same batched forwards."]
    lines += ["", "Every run (s): " + "; ".join(
        f"{name}: ours {', '.join(f'{t:.2f}' for t in o)}, Captum "
        f"{', '.join(f'{t:.2f}' for t in t_)}" for name, o, t_, _ in rows), ""]
    args.output.write_text("\n".join(lines))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
