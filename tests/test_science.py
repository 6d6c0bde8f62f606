"""The paper's headline result, reproduced on a trained digits ResNet-18 (Adebayo et al. 2018).

After cascading randomization the gradient's signed Spearman falls to about 0 and its
abs-Spearman drops as soon as the logits are randomized, while guided backprop stays near 1 at
the top stages and clearly above the gradient at the end. Abs-Spearman between unrelated
networks is far from 0 on these images, so orderings and signed values are asserted, not an
absolute abs-score near 0 (REFERENCE.md section 3).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import saliencycheck as sc
from saliencycheck.zoo import DIGITS_TRAIN_COUNT, accuracy, digits_tensors

ROOT = Path(__file__).resolve().parents[1]


def test_digits_model_is_trained(digits_model) -> None:
    inputs, labels = digits_tensors()
    held_out = accuracy(digits_model, inputs[DIGITS_TRAIN_COUNT:], labels[DIGITS_TRAIN_COUNT:])
    assert held_out > 0.9


@pytest.fixture(scope="module")
def cascading_summary(digits_model):
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    result = sc.check(digits_model, ROOT / "sample_images" / "digits",
                      image_settings={"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
                      methods=["gradient", "guided_backprop"],
                      tests={"cascading": {"enabled": True, "granularity": "block"}},
                      metrics=["spearman_abs", "spearman"], device="cpu",
                      runtime={"batch_size": 20}, output_settings={"figures": False})
    assert len(result.setup.images) == 20
    # The run randomized a working copy only: the user's model is bit-identical afterwards.
    after = digits_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and p.requires_grad for p in digits_model.parameters())
    return {(s.method, s.stage, s.metric): s for s in result.run.summary}


def test_gradient_is_sensitive_to_the_top_layers(cascading_summary) -> None:
    s = cascading_summary
    # Randomizing the logits layer alone already moves the gradient's map a lot ...
    assert s[("gradient", "fc", "spearman_abs")].mean < 0.8
    # ... and after full randomization its signed rank correlation is about zero.
    final = s[("gradient", "conv1", "spearman")]
    assert abs(final.mean) < 0.1
    assert final.ci_low < 0.1 and final.ci_high > -0.1


def test_guided_backprop_is_invariant_to_the_top_layers(cascading_summary) -> None:
    s = cascading_summary
    for stage in ("fc", "layer4.1"):
        assert s[("guided_backprop", stage, "spearman_abs")].mean > 0.95
        assert s[("guided_backprop", stage, "spearman_abs")].mean > \
            s[("gradient", stage, "spearman_abs")].mean + 0.2
    # At full randomization guided backprop still resembles its trained map more than the
    # gradient does (both on absolute and on signed maps).
    assert s[("guided_backprop", "conv1", "spearman_abs")].ci_low > \
        s[("gradient", "conv1", "spearman_abs")].ci_high
    assert s[("guided_backprop", "conv1", "spearman")].mean > \
        s[("gradient", "conv1", "spearman")].mean + 0.2
