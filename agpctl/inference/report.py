"""``agpctl report``: one self-contained HTML page about a run — configuration, metrics,
curves, score histograms, learning curves and example panels. Every picture is embedded as a
``data:`` URI and the page has no script, so it opens anywhere offline and can be mailed as
one file. The inputs come from ``report_inputs``, the plots from ``report_plots`` and the
example pictures from ``report_panels``."""

from __future__ import annotations

import base64
import html
import math
from datetime import datetime
from typing import Callable

import numpy as np

from agp_data import storage
from agp_models.metrics import image_curves, pixel_curves
from agpctl.errors import UserError
from agpctl.runs import HISTORY_FILE
from agpctl.inference import report_plots
from agpctl.inference.report_inputs import CategoryThresholds, ReportInputs
from agpctl.inference.report_panels import (EXAMPLE_GROUPS, ColourScale, colour_bar, colour_scale, example_tiles,
                                            select_examples)
from agpctl.inference.scoring import Predictions
from agpctl.tables import METRIC_COLUMNS, format_percent

REPORT_FILE = "report.html"  # the default name, inside a local run directory
PRO_FPR_LIMIT = 0.3  # as the PRO metric (agp_models.metrics.pro_score's default)
SECTIONS = (
    ("configuration", "Configuration"),
    ("metrics", "Metrics"),
    ("curves", "Curves"),
    ("histograms", "Score histograms"),
    ("history", "Training history"),
    ("examples", "Examples"),
)


def render_report(inputs: ReportInputs, examples: int = 3, on_progress: Callable[[int, int], None] | None = None
                  ) -> str:
    """The report page as one HTML string; ``examples`` images per group and category;
    ``on_progress(done, total)`` hears of each category's plots and panels done."""
    categories = inputs.categories
    steps, done = 2 * len(categories) + 1, 0

    def step() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, steps)

    curves = _curves_section(inputs, step)
    histograms = _histograms_section(inputs)
    step()
    examples_html = _examples_section(inputs, examples, step)
    title = f"agp report · {inputs.run_uri.rstrip('/').rsplit('/', 1)[-1]}"
    body = "\n".join([
        f"<header><h1>{_text(title)}</h1><p class=muted>{_text(inputs.run_uri)} · predictions: "
        f"{_text(inputs.source)} · made {datetime.now().strftime('%Y-%m-%d %H:%M')}</p>",
        "<nav>" + " ".join(f'<a href="#{key}">{_text(name)}</a>' for key, name in SECTIONS) + "</nav></header>",
        _section("configuration", _configuration_section(inputs)),
        _section("metrics", _metrics_section(inputs)),
        _section("curves", curves),
        _section("histograms", histograms),
        _section("history", _history_section(inputs)),
        _section("examples", examples_html),
    ])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_text(title)}</title>
<style>{_STYLE}</style>
</head><body>
{body}
</body></html>
"""


def report_uri(run_uri: str, out: str | None) -> str:
    """Where the report goes: ``out``, else report.html inside a local run. An ``s3://`` run
    needs ``out``: a report is read in a browser, which needs a local file."""
    if out:
        return out
    if storage.is_s3(run_uri):
        raise UserError(f"--out is required for the s3:// run {run_uri}: name a local file (e.g. --out report.html) "
                        "or an s3:// object")
    return storage.join(run_uri.rstrip("/"), REPORT_FILE)


def write_report(page: str, out: str) -> int:
    """Writes the page to ``out`` (local or s3://); returns its size in bytes."""
    data = page.encode("utf-8")
    storage.write_bytes(out, data)
    return len(data)


# -- sections ------------------------------------------------------------------------------------
def _configuration_section(inputs: ReportInputs) -> str:
    rows = "".join(f"<tr><th>{_text(label)}</th><td>{_text(value)}</td></tr>" for label, value in inputs.configuration)
    notes = "".join(f"<p class=note>{_text(note)}</p>" for note in inputs.notes)
    return f"<table class=config>{rows}</table>{notes}"


def _metrics_section(inputs: ReportInputs) -> str:
    present = [(key, label) for key, label in METRIC_COLUMNS if any(key in row for row in inputs.table.values())]
    head = "".join(f"<th>{label}</th>" for _, label in present)
    labels = inputs.predictions.labels
    rows = []
    for name in [n for n in sorted(inputs.table) if n != "mean"] + (["mean"] if "mean" in inputs.table else []):
        row = inputs.table[name]
        chosen = np.array([c == name for c in inputs.predictions.categories], dtype=bool)
        counts = f"{int(np.sum(chosen & (labels == 0)))} / {int(np.sum(chosen & (labels != 0)))}" \
            if name != "mean" else f"{int(np.sum(labels == 0))} / {int(np.sum(labels != 0))}"
        cells = "".join(f"<td>{format_percent(row.get(key))}</td>" for key, _ in present)
        rows.append(f"<tr{' class=mean' if name == 'mean' else ''}><th>{_text(name)}</th>{cells}<td>{counts}</td></tr>")
    return (f"<table class=metrics><thead><tr><th>category</th>{head}<th>normal / defective</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
            "<p class=muted>In %, on the test split; – where a metric is undefined (a single class). "
            f"PRO: normalised area under the per-region overlap curve up to FPR {PRO_FPR_LIMIT}.</p>")


def _curves_section(inputs: ReportInputs, step: Callable[[], None]) -> str:
    pred = inputs.predictions
    image_roc, image_pr, pixel_roc, pixel_pr, pro = {}, {}, {}, {}, {}
    has_maps = pred.maps.ndim == 3 and len(pred.maps) == len(pred.scores)
    for category in inputs.categories:
        chosen = np.flatnonzero([c == category for c in pred.categories])
        row = inputs.table.get(category, {})
        image = image_curves(pred.scores[chosen], pred.labels[chosen])
        image_roc[_legend(category, row, "i_auroc")] = image["roc"]
        image_pr[_legend(category, row, "i_ap")] = image["pr"]
        if has_maps:
            pixel = pixel_curves(pred.maps[chosen], pred.masks[chosen], fpr_limit=PRO_FPR_LIMIT)
            pixel_roc[_legend(category, row, "p_auroc")] = pixel["roc"]
            pixel_pr[_legend(category, row, "p_ap")] = pixel["pr"]
            pro[_legend(category, row, "pro")] = pixel["pro"]
        step()
    plots = [
        report_plots.curve_plot("image ROC", "false positive rate", "true positive rate", image_roc,
                                chance_diagonal=True),
        report_plots.curve_plot("image precision–recall", "recall", "precision", image_pr, steps=True),
    ]
    if has_maps:
        plots += [
            report_plots.curve_plot("pixel ROC", "false positive rate", "true positive rate", pixel_roc,
                                    chance_diagonal=True),
            report_plots.curve_plot("pixel precision–recall", "recall", "precision", pixel_pr, steps=True),
            report_plots.curve_plot(f"PRO up to FPR {PRO_FPR_LIMIT}", "false positive rate (normal pixels)",
                                    "per-region overlap", pro, xlim=(0.0, PRO_FPR_LIMIT)),
        ]
    figures = "".join(f"<figure>{_img(png, 'image/png', 'curve')}</figure>" for png in plots)
    missing = "" if has_maps else "<p class=note>No anomaly maps in these predictions: pixel curves left out.</p>"
    return f"<p class=muted>Per category; the legend gives the area (AUROC, AP or PRO, in %).</p>" \
           f"<div class=grid>{figures}</div>{missing}"


def _histograms_section(inputs: ReportInputs) -> str:
    pred = inputs.predictions
    figures = []
    for category in inputs.categories:
        chosen = np.array([c == category for c in pred.categories], dtype=bool)
        thresholds = inputs.thresholds.get(category) or CategoryThresholds(None, None, "none")
        png = report_plots.score_histogram(category, pred.scores[chosen & (pred.labels == 0)],
                                           pred.scores[chosen & (pred.labels != 0)], thresholds.image,
                                           "image threshold")
        figures.append(f"<figure>{_img(png, 'image/png', f'{category} score histogram')}"
                       f"<figcaption>threshold: {_text(_threshold_text(thresholds))}</figcaption></figure>")
    return "<p class=muted>Image scores of the test images; an image above the dashed line is flagged.</p>" \
           f"<div class=grid>{''.join(figures)}</div>"


def _history_section(inputs: ReportInputs) -> str:
    if not inputs.history:
        return (f"<p class=note>This run has no training history ({HISTORY_FILE}): it was trained before agp "
                "recorded one per epoch.</p>")
    parts = []
    for label, records in inputs.history.items():
        png = report_plots.learning_curves(label, records)
        seconds = np.array([report_plots.as_number(r.get("seconds")) for r in records])
        speeds = np.array([report_plots.as_number(r.get("images_per_s")) for r in records])
        facts = [f"{len(records)} epoch(s) recorded"]
        if np.isfinite(seconds).any():
            facts.append(f"{np.nansum(seconds):.0f} s of training")
        if np.isfinite(speeds).any():
            facts.append(f"{np.nanmean(speeds):.1f} images/s on average")
        parts.append(f"<figure class=wide>{_img(png, 'image/png', f'learning curves {label}'.strip())}"
                     f"<figcaption>{_text((label + ': ') if label else '')}{_text(', '.join(facts))}"
                     "</figcaption></figure>")
    return "".join(parts)


def _examples_section(inputs: ReportInputs, count: int, step: Callable[[], None]) -> str:
    pred = inputs.predictions
    has_maps = pred.maps.ndim == 3 and len(pred.maps) == len(pred.scores)
    if not has_maps or count == 0:
        for _ in inputs.categories:
            step()
        return ("<p class=note>No anomaly maps in these predictions: no example panels.</p>" if not has_maps
                else "<p class=muted>Example panels left out (--examples 0).</p>")
    bar = _img(colour_bar(), "image/png", "colour scale", "bar")
    legend = ("<p class=muted>Each row: image | ground truth | heatmap | predicted mask (map above the pixel "
              f"threshold). Heatmap colours as <code>agpctl predict</code>: {bar} low → high; the pixel "
              "threshold sits mid-scale (per category, given below).</p>")
    blocks = [legend]
    for category in inputs.categories:
        thresholds = inputs.thresholds.get(category) or CategoryThresholds(None, None, "none")
        chosen = np.flatnonzero([c == category for c in pred.categories])
        scale = colour_scale(pred.maps[chosen], thresholds.pixel)
        no_mask = "" if thresholds.pixel is not None else " (no pixel threshold: no predicted masks)"
        selected = select_examples(pred, category, count)
        groups = []
        for key, title, what in EXAMPLE_GROUPS:
            indices = selected[key]
            rows = "".join(_example_row(pred, int(i), scale, thresholds) for i in indices)
            heads = _tile_heads(with_mask=thresholds.pixel is not None)
            groups.append(f"<h4>{_text(title)} <span class=muted>({_text(what)})</span></h4>"
                          + (heads + rows if rows else "<p class=muted>none in this category's test images</p>"))
        blocks.append(f"<h3 id=\"examples-{_text(category)}\">{_text(category)}</h3>"
                      f"<p class=muted>threshold: {_text(_threshold_text(thresholds))}{_text(no_mask)} · heatmap "
                      f"colours from {scale.low:.4g} to {scale.high:.4g}</p>" + "".join(groups))
        step()
    return "".join(blocks)


def _example_row(pred: Predictions, index: int, scale: ColourScale, thresholds: CategoryThresholds) -> str:
    tiles = example_tiles(pred.paths[index], pred.maps[index], pred.masks[index], scale, thresholds.pixel)
    short = "/".join(pred.paths[index].replace("\\", "/").rsplit("/", 2)[-2:])  # e.g. crack/000.png
    score = float(pred.scores[index])
    verdict = ""
    if thresholds.image is not None:
        verdict = " · flagged" if score > thresholds.image else " · passed"
    label = "defective" if pred.labels[index] else "normal"
    pictures = [_img(tiles.image, "image/jpeg", "image"), _img(tiles.ground_truth, "image/png", "ground truth"),
                _img(tiles.heatmap, "image/jpeg", "heatmap")]
    if tiles.predicted is not None:
        pictures.append(_img(tiles.predicted, "image/png", "predicted mask"))
    facts = f"{label} · score {score:.4g}{verdict}"
    if tiles.defect_px is not None:
        facts += f" · predicted area {tiles.defect_px} px"
    unreadable = f"<br><span class=note>{_text(tiles.unreadable)}</span>" if tiles.unreadable else ""
    return (f"<div class=example><div class=tiles>{''.join(pictures)}</div><p>"
            f"<span title=\"{_text(pred.paths[index])}\">{_text(short)}</span><br>{_text(facts)}{unreadable}</p></div>")


def _tile_heads(with_mask: bool) -> str:
    names = ["image", "ground truth", "heatmap"] + (["predicted mask"] if with_mask else [])
    return f"<div class=\"example heads\"><div class=tiles>{''.join(f'<span>{n}</span>' for n in names)}</div></div>"


# -- small pieces ------------------------------------------------------------------------------
def _section(key: str, content: str) -> str:
    title = dict(SECTIONS)[key]
    return f'<section id="{key}"><h2>{_text(title)}</h2>{content}</section>'


def _img(data: bytes, mime: str, alt: str, css_class: str = "") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    extra = f' class="{css_class}"' if css_class else ""
    return f'<img{extra} alt="{_text(alt)}" src="data:{mime};base64,{encoded}">'


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


def _legend(category: str, row: dict, key: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return category
    return f"{category} ({format_percent(value)})"


def _threshold_text(thresholds: CategoryThresholds) -> str:
    if thresholds.image is None:
        return thresholds.source
    text = f"image {thresholds.image:.4g}"
    if thresholds.pixel is not None:
        text += f", pixel {thresholds.pixel:.4g}"
    return f"{text} — {thresholds.source}"


_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 0 24px 48px; color: #1d1d1f; background: #fff; }
header { border-bottom: 1px solid #ddd; margin-bottom: 8px; }
h1 { font-size: 22px; margin: 20px 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #eee; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 22px 0 4px; }
h4 { font-size: 14px; margin: 12px 0 6px; }
nav { margin: 8px 0 12px; } nav a { margin-right: 14px; color: #2456a6; text-decoration: none; }
.muted { color: #666; } .note { color: #8a5a00; }
table { border-collapse: collapse; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; }
table.metrics td { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics thead th { background: #f4f5f7; }
table.metrics tr.mean { font-weight: 600; background: #fafafa; }
table.config th { color: #555; font-weight: 500; white-space: nowrap; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; } figure img { max-width: 100%; display: block; }
figure.wide img { max-width: 100%; }
figcaption { font-size: 12px; color: #555; max-width: 440px; }
.example { display: flex; align-items: center; gap: 12px; margin: 4px 0; }
.example p { margin: 0; font-size: 12px; color: #333; }
.tiles { display: flex; gap: 3px; }
.tiles img { display: block; background: #000; }
.heads .tiles span { width: 160px; font-size: 11px; color: #777; }
img.bar { vertical-align: middle; height: 12px; width: 160px; }
code { background: #f4f5f7; padding: 0 3px; }
"""
