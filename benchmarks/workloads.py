"""The benchmark's workloads: one model and one ``saliencycheck.check`` call each, shared by
all four contenders."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

from PIL import Image, ImageOps
from torch import nn

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "sample_images" / "digits"
PHOTOS = REPO / "sample_images" / "photos"


@dataclass(frozen=True)
class Workload:
    """What every contender computes: model, images, methods, stages, metrics."""

    key: str  # "a" or "b"
    title: str
    model: dict
    images: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    methods: list
    granularities: tuple[str, ...]
    metrics: tuple[str, ...] = ("spearman_abs", "ssim")
    batch_size: int = 8
    chunk_size: int = 128
    image_source: str = "digits"  # "digits" or "photos" (variants generated in a temp folder)
    stage_limit: int | None = None  # the first stages of each case, for every contender
    notes: list[str] = field(default_factory=list)

    def build_model(self) -> nn.Module:
        """The workload's model, in memory (its factory called as a config's model.factory)."""
        module, _, name = self.model["factory"].partition(":")
        return getattr(import_module(module), name)(num_classes=self.model["num_classes"])

    def check_arguments(self, *, granularity: str, device: str,
                        reuse_host_memory: bool = True, blocks: list[str] | None = None
                        ) -> dict:
        """The keyword arguments of ``saliencycheck.check`` (the config's sections) after the
        model and the image folder; ``blocks`` cuts the cascade to those blocks."""
        cascading = {"enabled": True, "granularity": granularity, "order": "top_down"}
        if blocks:
            cascading["blocks"] = blocks
        return {
            "image_settings": {"size": self.size, "mean": list(self.mean),
                               "std": list(self.std), "limit": self.images},
            "targets": "predicted",
            "methods": self.methods,
            "tests": {"cascading": cascading, "independent": {"enabled": False},
                      "init": "reset", "target_on_randomized": "original"},
            "metrics": list(self.metrics),
            "device": device, "seed": 0,
            "runtime": {"batch_size": self.batch_size, "chunk_size": self.chunk_size,
                        "reuse_host_memory": reuse_host_memory},
            "output_settings": {"figures": False, "save_maps": False},
            "baselines": {"random_floor": False},  # Quantus computes no floor: same work
        }

    def describe(self) -> str:
        names = ", ".join(_method_text(m) for m in self.methods)
        limit = (f", the first {self.stage_limit} stages of each granularity (every "
                 "contender)" if self.stage_limit else "")
        return (f"{self.model.get('factory') or self.model['name']}, {self.size}×{self.size}, "
                f"{self.images} images, methods: {names}; cascading top-down, "
                f"granularity {' and '.join(self.granularities)}{limit}; metrics "
                f"{', '.join(self.metrics)}; batch {self.batch_size} images, "
                f"≤ {self.chunk_size} rows per pass")


def _method_text(entry: str | dict) -> str:
    if isinstance(entry, str):
        return entry
    extra = ", ".join(f"{k}={v}" for k, v in entry.items() if k != "name")
    return f"{entry['name']}({extra})"


DIGITS_MODEL = {"name": "resnet18", "factory": "saliencycheck.zoo:digits_resnet18",
                "num_classes": 10}
RESNET50_MODEL = {"name": "resnet50", "factory": "benchmarks.models:resnet50_seeded",
                  "num_classes": 1000}
VIT_MODEL = {"name": "vit_b_16", "factory": "benchmarks.models:vit_b_16_seeded",
             "num_classes": 1000}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def workload_a(*, quick: bool = False) -> Workload:
    """(a) the CPU workload: trained digits ResNet-18, 64×64, 8 images, 3 methods, layers."""
    return Workload(
        key="a", title="(a) CPU workload: digits ResNet-18",
        model=DIGITS_MODEL, images=2 if quick else 8, size=64, mean=(0.5,) * 3, std=(0.5,) * 3,
        methods=["gradient", {"name": "integrated_gradients", "steps": 4 if quick else 16,
                              "baseline": "black"}, "guided_backprop"],
        granularities=("layer",), stage_limit=3 if quick else None)


def workload_b(*, gpu: bool, quick: bool = False, images: int | None = None,
               stages: int | None = None) -> Workload:
    """(b) resnet50, six methods; full size on a GPU, reduced on the CPU (block only).
    ``images`` and ``stages`` shrink the GPU run to fit a time budget (every contender alike;
    benchmarks/gpu_check.sh)."""
    steps = 4 if quick else 32
    methods = ["gradient", "gradient_x_input",
               {"name": "integrated_gradients", "steps": steps, "baseline": "black"},
               {"name": "smoothgrad", "samples": steps, "noise": 0.15},
               "guided_backprop", "gradcam"]
    if gpu and not quick:
        return Workload(key="b", title="(b) GPU workload: ResNet-50", model=RESNET50_MODEL,
                        images=images or 64, size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        methods=methods, granularities=("block", "layer"), batch_size=32,
                        image_source="photos", stage_limit=stages)
    return Workload(
        key="b", title="(b) ResNet-50, reduced for the CPU", model=RESNET50_MODEL,
        images=1 if quick else 2, size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        methods=methods, granularities=("block",), batch_size=8, image_source="photos",
        stage_limit=3 if quick else None,
        notes=["Reduced on the CPU: 64×64 instead of 224×224, 2 images instead of 64, block "
               "granularity only (19 stages; layer granularity has 107), hence no Quantus column: "
               "Quantus has no block granularity."])


def workload_c(*, gpu: bool, quick: bool = False, images: int | None = None,
               stages: int | None = None) -> Workload:
    """(c) ViT-B/16 at 224×224, layer granularity (the granularity Quantus has): every
    contender randomizes the same number of modules, top-down. On a GPU: gradient, IG-32 and
    SmoothGrad-32, 64 images; on the CPU, reduced: gradient and IG-16, 2 images, the first 3
    stages."""
    full = gpu and not quick
    if full:
        methods = ["gradient", {"name": "integrated_gradients", "steps": 32, "baseline": "black"},
                   {"name": "smoothgrad", "samples": 32, "noise": 0.15}]
    else:
        methods = ["gradient", {"name": "integrated_gradients", "steps": 4 if quick else 16,
                                "baseline": "black"}]
    notes = ["Quantus randomizes the modules that have `reset_parameters` (it skips ViT's "
             "attention in-projections, position embedding and class token); saliencycheck's "
             "layer granularity randomizes every module with parameters. Both run the same "
             "number of randomized models over the same images, so the passes are the same "
             "work; which weights each stage changes differs (the ResNets' lists are equal)."]
    if not full:
        notes.append("Reduced on the CPU: 2 images and the first 3 of 77 layer stages (top-down: "
                     "the head, the final LayerNorm, the last MLP's second linear layer), "
                     "gradient and IG-16 only.")
    return Workload(
        key="c", title="(c) ViT-B/16" + ("" if full else ", reduced for the CPU"),
        model=VIT_MODEL, images=(images or 64) if full else 1 if quick else 2, size=224,
        mean=(0.5,) * 3, std=(0.5,) * 3, methods=methods, granularities=("layer",),
        batch_size=32 if full else 2, image_source="photos",
        stage_limit=stages if full else 2 if quick else 3, notes=notes)


def prepare_images(workload: Workload, folder: Path) -> Path:
    """The image folder of a workload: the digits, or ``images`` variants of the four photos
    (crops and mirror images, deterministic) written to ``folder``."""
    if workload.image_source == "digits":
        return DIGITS
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(workload.images):
        with Image.open(photos[i % len(photos)]) as img:
            img = img.convert("RGB")
            variant = i // len(photos)
            w, h = img.size
            shrink = 1.0 - 0.04 * (variant % 8)
            cw, ch = int(w * shrink), int(h * shrink)
            left, top = (w - cw) * (variant % 3) // 2, (h - ch) * ((variant // 3) % 3) // 2
            img = img.crop((left, top, left + cw, top + ch))
            if variant % 2:
                img = ImageOps.mirror(img)
            img.save(folder / f"img{i:03d}.png")
    return folder
