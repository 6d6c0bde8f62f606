"""The figures show every score they plot: no curve is clipped by the axis."""

from __future__ import annotations

import math

from saliencycheck.report.figures import curves_figure
from saliencycheck.results import SummaryRow


def _row(method: str, stage: int, metric: str, mean: float) -> SummaryRow:
    return SummaryRow(method, "cascading", stage, f"s{stage}", metric, mean, 0.0, mean - 0.05,
                      mean + 0.05, 4, 0)


def test_a_score_below_zero_is_inside_the_axis_and_positive_ones_keep_it_tight() -> None:
    summary = [_row("gradcam", i, "spearman_abs", v) for i, v in enumerate([1.0, 0.4, -0.6])]
    summary += [_row("gradcam", i, "hog", v) for i, v in enumerate([1.0, 0.5, 0.3])]
    fig = curves_figure(summary, "cascading", ["spearman_abs", "hog"], level=0.95)
    dipping, positive = fig.axes[:2]
    assert dipping.get_ylim()[0] <= -0.65  # the band's lower edge, -0.65, is shown
    assert math.isclose(positive.get_ylim()[0], -0.05)  # non-negative scores: from 0
