"""The quickstart's cascading randomization from Python, as a notebook runs it.

The digits ResNet-18 is built in memory (trained once, ~30 s on 2 CPU cores, then cached in
$SALIENCYCHECK_CACHE or ~/.cache/saliencycheck), the images are the quickstart's 8 held-out
digits, and `saliencycheck.check` runs the paper's cascading test on it. As in the paper, the
gradient's maps stop resembling the trained model's once every block is randomized, and
guided backprop's do not.

    .venv/bin/python examples/notebook_quickstart.py

In a notebook, `result` displays its verdicts as a table; `result.plot_curves()` and
`result.plot_grid(0)` return the figures; `result.save("runs/notebook")` writes the CLI's files.
"""

from pathlib import Path

import saliencycheck as sc
from saliencycheck.zoo import digits_resnet18

DIGITS = Path(__file__).resolve().parent.parent / "sample_images" / "digits"

model = digits_resnet18()
result = sc.check(
    model,
    DIGITS,
    image_settings={"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "limit": 8},
    methods=["gradient", "gradient_x_input",
             sc.method("integrated_gradients", steps=16, baseline="black"),
             "guided_backprop", "gradcam", "guided_gradcam",
             sc.method("smoothgrad", samples=16, noise=0.15)],
    tests={"cascading": {"granularity": "block", "order": "top_down"}},
    metrics=["spearman_abs", "spearman", "ssim", "hog", "pearson"],
    thresholds={"cascading": {"metric": "spearman", "stage": "final", "max": 0.25}},
    fail_on=["gradient"],
    device="cpu",
    output_settings={"figure_images": 2},
)

for verdict in result.verdicts:
    print(f"{verdict.method:22} {verdict.verdict:8} {verdict.reason}")
print("gate:", "passed" if result.passed else "FAILED")
