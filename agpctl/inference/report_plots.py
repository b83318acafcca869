"""The report's plots as PNG bytes: ROC / PR / PRO curves, score histograms and learning
curves. matplotlib's object API with the Agg canvas: no pyplot, no display, no global
backend switch, so it runs headless and leaves other users of matplotlib alone."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
# A curve of millions of pixel-level points is thinned to about this many for drawing: far
# more than the plot's width in pixels, so the drawn shape does not change.
MAX_CURVE_POINTS = 4000
NORMAL_COLOUR = "#3b7dd8"
DEFECT_COLOUR = "#d8473b"
THRESHOLD_COLOUR = "#222222"


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def thin_curve(x: np.ndarray, y: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``max_points`` points of the polyline (x, y), evenly spaced along its
    length, always with both ends and its first point past every length step."""
    if len(x) <= max_points:
        return x, y
    length = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(x)) + np.abs(np.diff(y)))])
    step = length[-1] / max_points if length[-1] > 0 else 1.0
    keep = np.flatnonzero(np.diff(np.floor(length / step), prepend=-1.0) > 0)
    keep = np.union1d(keep, [len(x) - 1])
    return x[keep], y[keep]


def curve_plot(title: str, xlabel: str, ylabel: str, series: dict[str, tuple[np.ndarray, np.ndarray]], *,
               xlim: tuple[float, float] = (0.0, 1.0), chance_diagonal: bool = False, steps: bool = False) -> bytes:
    """One line per category (``series``: legend label -> points); empty series are left out."""
    figure = Figure(figsize=(4.0, 3.6), layout="constrained")  # three side by side on a laptop screen
    axes = figure.add_subplot()
    # tab10 repeats after ten lines; MVTec-AD has 15 categories
    palette = colormaps["tab10" if len(series) <= 10 else "tab20"].colors
    drawn = 0
    for label, (x, y) in series.items():
        if len(x) == 0:
            continue
        x, y = thin_curve(np.asarray(x, float), np.asarray(y, float))
        axes.plot(x, y, label=label, linewidth=1.4, drawstyle="steps-pre" if steps else "default",
                  color=palette[drawn % len(palette)])
        drawn += 1
    if chance_diagonal:
        axes.plot(xlim, xlim, color="#aaaaaa", linewidth=0.8, linestyle=":")
    if not drawn:
        axes.text(0.5, 0.5, "undefined: needs normal and defective samples", ha="center", va="center",
                  transform=axes.transAxes, color="#777777")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=xlim, ylim=(0.0, 1.02))
    axes.grid(alpha=0.3)
    if drawn:
        axes.legend(fontsize=7, loc="best", ncols=2 if drawn > 8 else 1)
    return _png(figure)


def score_histogram(category: str, normal: np.ndarray, defective: np.ndarray, threshold: float | None,
                    threshold_label: str) -> bytes:
    """Image scores of normal and defective test images, on shared bins, and the threshold."""
    figure = Figure(figsize=(4.0, 3.0), layout="constrained")
    axes = figure.add_subplot()
    values = np.concatenate([normal, defective, [threshold] if threshold is not None else []]).astype(float)
    values = values[np.isfinite(values)]
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if high <= low:  # all scores equal: a bin around them
        low, high = low - 0.5, high + 0.5
    bins = np.linspace(low, high, 31)
    for scores, colour, name in ((normal, NORMAL_COLOUR, "normal"), (defective, DEFECT_COLOUR, "defective")):
        if len(scores):
            axes.hist(scores, bins=bins, color=colour, alpha=0.55, label=f"{name} ({len(scores)})")
    if threshold is not None:
        axes.axvline(threshold, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1.2,
                     label=f"{threshold_label} {threshold:.4g}")
    axes.set(title=category, xlabel="image score", ylabel="images")
    axes.locator_params(axis="x", nbins=5)  # scores like 13.625 need room
    axes.grid(alpha=0.3)
    figure.legend(fontsize=7, loc="outside lower center", ncols=3, frameon=False)  # never over the bars
    return _png(figure)


# Validation fields of a history record, in the order drawn.
VALIDATION_FIELDS = (("i_auroc", "I-AUROC"), ("p_auroc", "P-AUROC"), ("pro", "PRO"), ("objective", "objective"))


def learning_curves(title: str, records: list[dict[str, Any]]) -> bytes:
    """Loss (total and parts), validation metrics (when recorded) and learning rate per epoch."""
    epochs = [int(r["epoch"]) for r in records]
    has_validation = any(isinstance(r.get("val"), dict) for r in records)
    panels = 3 if has_validation else 2
    figure = Figure(figsize=(4.0 * panels, 3.0), layout="constrained")
    loss_axes = figure.add_subplot(1, panels, 1)
    loss_axes.plot(epochs, [as_number(r.get("loss")) for r in records], marker="o", markersize=3, label="loss")
    parts = sorted({name for r in records for name in (r.get("losses") or {}) if name != "loss"})
    for name in parts:
        loss_axes.plot(epochs, [as_number((r.get("losses") or {}).get(name)) for r in records], linestyle="--",
                       linewidth=1, marker=".", label=name)  # the marker: one epoch draws no line
    loss_axes.set(title="training loss", xlabel="epoch")
    loss_axes.legend(fontsize=7)
    if has_validation:
        val_axes = figure.add_subplot(1, panels, 2)
        for key, label in VALIDATION_FIELDS:
            values = [as_number((r.get("val") or {}).get(key)) for r in records]
            if any(np.isfinite(values)):
                val_axes.plot(epochs, values, marker="o", markersize=3, label=label)
        val_axes.set(title="validation", xlabel="epoch")
        val_axes.legend(fontsize=7)
    lr_axes = figure.add_subplot(1, panels, panels)
    rates = [as_number(r.get("lr")) for r in records]
    lr_axes.plot(epochs, rates, marker="o", markersize=3, color="#555555")
    if all(v > 0 for v in rates if np.isfinite(v)) and any(np.isfinite(rates)):
        lr_axes.set_yscale("log")
    lr_axes.set(title="learning rate", xlabel="epoch")
    for axes in figure.axes:
        axes.grid(alpha=0.3)
        if len(epochs) < 12:  # whole epochs only
            axes.set_xticks(epochs)
    if title:
        figure.suptitle(title)
    return _png(figure)


def as_number(value: Any) -> float:
    """A history field as a float; NaN (drawn as a gap) when missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
