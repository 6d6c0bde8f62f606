"""PNG figures: the paper's stage grids per image, and similarity curves per test.

Each figure is built as a ``matplotlib.figure.Figure`` without pyplot, so nothing here selects
or changes a backend (a notebook's inline plots keep working) and the API can return the
figures (``Result.plot_curves``, ``Result.plot_grid``) as well as save them."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from saliencycheck.results import RANDOM_MAP, SummaryRow
from saliencycheck.verdicts import interval_text

REFERENCE_LINES = (RANDOM_MAP, "random_vectors")  # drawn grey and dashed: what chance gives
MAP_CMAP = "inferno"  # one colormap for every absolute map, fixed range [0, 1]


def save(fig: Figure, path: Path, **options: object) -> None:
    """Write ``fig`` as a PNG at ``path`` (110 dpi), making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, **options)


def stage_grid_figure(
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    stage_names: list[str],
    *,
    title: str,
) -> Figure:
    """Input image first, then one row per method and one column per stage (trained first).

    `maps[method]` is (stages, H, W) of absolute maps in [0, 1], all shown on one scale.
    """
    # One mosaic image with text labels instead of a subplot per cell: the same picture, drawn
    # ~10x faster (measured: 2 s -> 0.2 s for a 7 x 13 grid), which matters with many stages.
    methods = list(maps)
    height, width = image.shape[:2]
    gap = max(2, width // 16)
    cols = len(stage_names) + 1
    mosaic = np.ones(((height + gap) * len(methods), (width + gap) * cols, 3), dtype=np.float32)
    colormap = matplotlib.colormaps[MAP_CMAP]
    mosaic[:height, :width] = image
    for row, method in enumerate(methods):
        top = row * (height + gap)
        for col, frame in enumerate(maps[method][: len(stage_names)], start=1):
            left = col * (width + gap)
            rgb = colormap(np.clip(frame.astype(np.float32), 0, 1))[..., :3]
            mosaic[top:top + height, left:left + width] = rgb
    cell = 1.3
    fig = Figure(figsize=(cell * cols, cell * len(methods)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([(width + gap) * c + width / 2 for c in range(cols)])
    ax.set_xticklabels(["input", *stage_names], fontsize=7, rotation=30 if cols > 8 else 0,
                       ha="left" if cols > 8 else "center")
    ax.xaxis.tick_top()
    ax.set_yticks([(height + gap) * r + height / 2 for r in range(len(methods))])
    ax.set_yticklabels(methods, fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=9, pad=28 if cols > 8 else 16)
    return fig


def _metric_grid(metrics: list[str]):
    """One panel per metric, three to a row; unused panels hidden."""
    cols = min(3, len(metrics))
    nrows = -(-len(metrics) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.3 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    flat = axes.ravel()
    for ax in flat[len(metrics):]:
        ax.axis("off")
    return fig, axes, flat


def percent(level: float) -> str:
    """A confidence level as the figures print it: 0.95 → '95 %', 0.975 → '97.5 %'."""
    return f"{100 * level:g} %"


def _axis_style(ax, metric: str) -> None:  # noqa: ANN001
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_title(metric, fontsize=9)
    if metric != "entropy_rise":  # similarities are bounded; the entropy rise is not
        # signed correlations span [-1, 1]; the others may dip below 0 too (a Spearman of
        # absolute maps, SSIM): then the axis opens to -1 rather than clip the curve
        signed = metric in ("spearman", "pearson") or ax.dataLim.y0 < -0.05
        ax.set_ylim(-1.05 if signed else -0.05, 1.05)


def curves_figure(summary: list[SummaryRow], test: str, metrics: list[str],
                  floors: dict[tuple[str, str], SummaryRow] | None = None,
                  level: float = 0.95, *, title: str | None = None,
                  ylabel: str = "similarity to trained map") -> Figure:
    """Each metric against the stage, one line per method: mean with its CI band (at
    ``level``, the one summary.csv's intervals were computed at), and
    the method's random-network floor (``floors[(method, metric)]``, its summary row) as a
    dotted line in a faint band (its own interval)."""
    rows = [s for s in summary if s.test == test]
    stages = sorted({(s.stage_index, s.stage) for s in rows})
    fig, axes, flat = _metric_grid(metrics)
    for ax, metric in zip(flat, metrics):
        by_method: dict[str, list[SummaryRow]] = defaultdict(list)
        for s in rows:
            if s.metric == metric:
                by_method[s.method].append(s)
        for method, series in by_method.items():
            series.sort(key=lambda s: s.stage_index)
            x = [s.stage_index for s in series]
            style = (dict(color="grey", linestyle="--",
                          label=f"{method} (control)" if method == RANDOM_MAP else method)
                     if method in REFERENCE_LINES else dict(label=method))
            (line,) = ax.plot(x, [s.mean for s in series], marker="o", markersize=3, **style)
            floor = (floors or {}).get((method, metric))
            if floor is not None and np.isfinite(floor.mean):
                ax.axhline(floor.mean, color=line.get_color(), linestyle=":", linewidth=1)
                if np.isfinite(floor.ci_low) and np.isfinite(floor.ci_high):
                    ax.axhspan(floor.ci_low, floor.ci_high, color=line.get_color(), alpha=0.08)
            low = [s.ci_low if np.isfinite(s.ci_low) else s.mean for s in series]
            high = [s.ci_high if np.isfinite(s.ci_high) else s.mean for s in series]
            ax.fill_between(x, low, high, alpha=0.2, color=line.get_color())
        _axis_style(ax, metric)
        ax.set_xticks([i for i, _ in stages])
        ax.set_xticklabels([name for _, name in stages], rotation=70, fontsize=6)
    for row in axes:
        row[0].set_ylabel(ylabel, fontsize=8)
    handles, labels = flat[0].get_legend_handles_labels()
    spare = len(metrics) % axes.shape[1]  # an empty panel takes the legend
    fig.suptitle(f"{title or test + ' randomization'} (mean and {percent(level)} CI over images"
                 + ("; dotted, faint band: random-network floor)" if floors else ")"), fontsize=10)
    if spare:
        fig.legend(handles, labels, fontsize=7, loc="lower right")
        fig.tight_layout()
    else:  # a row under the title, clear of it and of the panels
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        fig.legend(handles, labels, fontsize=7, loc="upper center", ncols=len(labels),
                   bbox_to_anchor=(0.5, 0.955), frameon=False)
    return fig


def comparison_bars(path: Path, summary: list[SummaryRow], test: str, metrics: list[str],
                    title: str, ylabel: str = "similarity to trained map",
                    methods: list[str] | None = None, level: float = 0.95) -> None:
    """Each metric, one group of bars per method: one bar per compared model (the stages of
    ``test`` after the trained one), mean with its CI (at ``level``) as an error bar. For
    tests whose stages are alternatives, not a sequence (label randomization: random labels,
    control)."""
    rows = [s for s in summary if s.test == test and s.stage_index > 0]
    stages = sorted({(s.stage_index, s.stage) for s in rows})
    present = {s.method for s in rows}  # in the config's order when given
    methods = [m for m in methods if m in present] if methods else sorted(present)
    fig, axes, flat = _metric_grid(metrics)
    width = 0.8 / max(1, len(stages))
    for ax, metric in zip(flat, metrics):
        found = {(s.method, s.stage_index): s for s in rows if s.metric == metric}
        for k, (index, name) in enumerate(stages):
            cells = [found.get((m, index)) for m in methods]
            means = [c.mean if c else np.nan for c in cells]
            low = [c.mean - c.ci_low if c and np.isfinite(c.ci_low) else 0.0 for c in cells]
            high = [c.ci_high - c.mean if c and np.isfinite(c.ci_high) else 0.0 for c in cells]
            ax.bar(np.arange(len(methods)) + (k - (len(stages) - 1) / 2) * width, means, width,
                   yerr=[low, high], capsize=2, label=name)
        _axis_style(ax, metric)
        ax.set_xticks(np.arange(len(methods)))
        ax.set_xticklabels(methods, rotation=70, fontsize=6)
    for row in axes:
        row[0].set_ylabel(ylabel, fontsize=8)
    handles, labels = flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="upper right")
    fig.suptitle(f"{title} (mean and {percent(level)} CI over images)", fontsize=10)
    fig.tight_layout()
    save(fig, path)


VERDICT_COLOURS = {"PASS": "#4caf50", "FAIL": "#e53935", "INVALID": "#bdbdbd"}


def verdict_heatmap(path: Path, verdicts: list, level: float = 0.95) -> None:
    """Methods × tests (``verdicts``: list[Verdict]), each cell coloured by its verdict and
    labelled with the statistic, its interval (at ``level``) and the limit applied."""
    from matplotlib.colors import to_rgb

    methods = list(dict.fromkeys(v.method for v in verdicts))
    tests = list(dict.fromkeys(v.test for v in verdicts))
    cells = {(v.method, v.test): v for v in verdicts}
    image = np.ones((len(methods), len(tests), 3))
    fig = Figure(figsize=(max(4.5, 1.8 + 2.2 * len(tests)), 1.1 + 0.55 * len(methods)))
    ax = fig.subplots()
    for i, method in enumerate(methods):
        for j, test in enumerate(tests):
            v = cells.get((method, test))
            if v is None:
                continue
            image[i, j] = to_rgb(VERDICT_COLOURS[v.verdict])
            limits = [f"≤ {v.max:.2f}" if np.isfinite(v.max) else "",
                      f"≥ {v.min:.2f}" if np.isfinite(v.min) else ""]
            ax.text(j, i, f"{v.verdict}\n{v.metric} "
                    f"{interval_text(v.statistic, v.ci_low, v.ci_high)}\n"
                    + " ".join(x for x in limits if x), ha="center", va="center", fontsize=6)
    ax.imshow(image, aspect="auto")
    ax.set_xticks(range(len(tests)), tests, fontsize=8)
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    ax.set_title(f"verdicts: mean [{percent(level)} CI], limit\nPASS: randomization changed "
                 "the maps\n(input invariance: the shift did not)", fontsize=8)
    fig.tight_layout()
    save(fig, path)
