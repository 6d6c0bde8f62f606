"""Completeness (Sundararajan et al. 2017): do the attributions sum to what they explain?

A method registered with a ``reference`` input x′ (integrated gradients and DeepLIFT: their
baseline; gradient × input and LRP-ε: zero) claims Σ attributions = f(x) − f(x′) for the class
explained. The test scores the relative error of that sum per image on the trained model and
judges itself by ``tolerance``, not by a threshold.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from rich.table import Table

from saliencycheck.checks.base import TRAINED, Check, Engine, Group, View, register_check
from saliencycheck.metrics import Scores
from saliencycheck.results import SummaryRow
from saliencycheck.sections import Section
from saliencycheck.verdicts import Verdict, completeness_verdicts

COMPLETENESS_METRIC = "relative_error"


class CompletenessConfig(Section):
    enabled: bool = Field(
        False, description="Completeness (Sundararajan et al. 2017) of integrated_gradients, "
        "gradient_x_input, deeplift and lrp with rule epsilon: |Σ attributions − (f(x) − "
        "f(baseline))| / |f(x) − f(baseline)| (gradient × input and LRP-ε are complete on "
        "networks without biases only).",
    )
    tolerance: float = Field(
        0.05, gt=0, description="Largest relative error (upper confidence bound) that passes.",
    )


@register_check
class Completeness(Check):
    name = "completeness"
    title = "completeness (Σ attributions against f(x) − f(x′))"
    section = CompletenessConfig
    description = "Completeness test."
    thresholds = False
    judged_metrics = (COMPLETENESS_METRIC,)

    def validate(self, config: Any) -> None:
        """At least one method it can check."""
        # imported here: the methods import the model loader, which imports the config, which
        # is assembled from this registry
        from saliencycheck.methods.registry import complete_methods

        names = {m if isinstance(m, str) else m.name for m in config.methods}
        complete = complete_methods()
        if self.enabled(config) and not names & set(complete):
            raise ValueError(f"tests.completeness: it checks {', '.join(complete)}, and methods "
                             "has none of them; add one or disable the test")

    def score(self, engine: Engine, group: Group) -> None:
        """Relative error of Σ attributions against f(x) − f(x′), per image; NaN (with the
        reason) where f(x) = f(x′) leaves nothing to complete."""
        setup = engine.setup
        model = engine.model()
        inputs, targets = group.inputs, group.targets
        scores = {}
        for method in setup.methods:
            if method.spec.reference is None:
                continue
            reference = method.spec.reference(inputs, setup.context, **dict(method.params))
            if reference is None:  # not complete with these parameters (LRP's z⁺ rule)
                continue
            with torch.no_grad():
                logits = model(inputs)
                gap = (logits - model(reference)).gather(1, targets[:, None])[:, 0]
            total = group.trained[method.label].flatten(1).sum(dim=1)
            error = (total - gap).abs() / gap.abs()
            flat = gap.abs() <= 1e-12 * (1 + logits.abs().amax())
            error = torch.where(flat, torch.full_like(error, float("nan")), error)
            scores[method.label] = {COMPLETENESS_METRIC: Scores(error.double(), tuple(
                "f(x) = f(baseline): no gap to complete" if f else "" for f in flat.tolist()))}
        if scores:
            engine.record(self.name, 0, TRAINED, group.ids, targets, targets, {}, scores)

    def verdicts(self, summary: list[SummaryRow], setup: Any, *, invalid: str = "",
                 level: float) -> list[Verdict]:
        return completeness_verdicts(summary, setup.config.tests.completeness.tolerance,
                                     level=level, test=self.name)

    def compares_trained(self) -> bool:
        return True

    def table(self, view: View) -> Table | None:
        """Each checked method's mean relative error and its interval."""
        rows = view.rows(self.name)
        if not rows:
            return None
        table = Table(title=f"{self.name}: relative error of Σ attributions against "
                            "f(x) − f(x′), mean over images", title_justify="left")
        for column in ("method", "relative error", "interval"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for method in view.methods:
            row = rows.get((method, COMPLETENESS_METRIC))
            if row is not None:
                table.add_row(method, _sci(row.mean), f"[{_sci(row.ci_low)}, {_sci(row.ci_high)}]")
        return table


def _sci(value: float) -> str:
    return f"{value:.2e}" if math.isfinite(value) else "n/a"
