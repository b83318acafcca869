"""What ``agpctl report`` shows, gathered from a run: its configuration, the predictions on
its test split (evaluated now, or read from ``agpctl eval --save-maps``), the thresholds that
apply to each category and the training history. Pictures and HTML are made elsewhere
(``report_plots``, ``report_panels``, ``report``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from agp_data import storage
from agp_data.errors import DataError
from agp_data.splits import split_samples
from agp_data.tiled import working_shapes
from agp_data.tiling import Tiling
from agpctl import runs
from agpctl.config import RunConfig
from agpctl.errors import UserError
from agpctl.inference.evaluate import evaluate_run, merge_predictions
from agpctl.inference.scoring import Predictions
from agpctl.inference.tiled_scoring import evaluation_shape
from agpctl.inference.thresholds import ThresholdPolicy


@dataclass
class CategoryThresholds:
    """The thresholds that apply to one category's images, and where they come from."""

    image: float | None
    pixel: float | None
    source: str  # e.g. "the category's own (40 images)", "pooled over all categories", "none"
    stable: bool | None = None  # whether the category's own thresholds rest on enough images; None: it has none


@dataclass
class ReportInputs:
    """Everything one report shows, before any picture is drawn."""

    run_uri: str
    configuration: list[tuple[str, str]]  # (label, value) rows of the configuration summary
    table: dict[str, dict[str, float]]  # per category and "mean", fractions
    predictions: Predictions  # the test split, every sub-run together
    thresholds: dict[str, CategoryThresholds]  # per category
    history: dict[str, list[dict[str, Any]]]  # (sub-)run label -> epoch records, oldest first
    source: str  # where the predictions come from
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # evaluated: {"checkpoint", "epoch"}
    notes: list[str] = field(default_factory=list)  # what the reader should know (skipped lines ...)

    @property
    def categories(self) -> list[str]:
        return sorted(set(self.predictions.categories))


def gather_report_inputs(run_uri: str, *, maps_file: str | None = None, batch_size: int | None = None,
                         on_batch: Callable[[int, int], None] | None = None,
                         on_load: Callable[[runs.LoadedRun], None] | None = None,
                         on_warning: Callable[[str], None] | None = None) -> ReportInputs:
    """Everything the report of ``run_uri`` shows. With ``maps_file`` the predictions come from
    that file and no model is run; otherwise the run is evaluated on its test split."""
    run_uri = run_uri.rstrip("/")
    cfg = runs.load_run_config(run_uri)
    notes: list[str] = []
    checkpoints: list[dict[str, Any]] = []

    def loaded(run: runs.LoadedRun) -> None:
        checkpoints.append({"run": run.uri, "checkpoint": run.checkpoint.uri, "epoch": run.checkpoint.epoch})
        if on_load is not None:
            on_load(run)

    sub_runs = runs.sub_runs(run_uri)
    if maps_file:
        predictions = Predictions.load_npz(maps_file)
        table = predictions.metrics()
        source = f"saved predictions {maps_file} (agpctl eval --save-maps); the model was not run"
        expected = saved_map_shape(cfg, sub_runs)
        if expected is not None and predictions.maps.shape[1:] != expected:
            notes.append(f"{maps_file} holds {predictions.maps.shape[1]}×{predictions.maps.shape[2]} maps but the run "
                         f"gives {expected[0]}×{expected[1]} ones: the file may come from another run or test set")
    else:
        table, parts = evaluate_run(run_uri, batch_size=batch_size, on_batch=on_batch, on_load=loaded,
                                    on_warning=on_warning)
        predictions = merge_predictions(parts)
        source = "evaluated now on the run's test split"
    categories = sorted(set(predictions.categories))
    history, history_notes = _histories(run_uri, sub_runs)
    notes.extend(history_notes)
    return ReportInputs(
        run_uri=run_uri,
        configuration=_configuration(run_uri, cfg, sub_runs, categories, checkpoints, maps_file),
        table=table,
        predictions=predictions,
        thresholds=category_thresholds(run_uri, sub_runs, categories),
        history=history,
        source=source,
        checkpoints=checkpoints,
        notes=notes,
    )


def saved_map_shape(cfg: RunConfig, sub_runs: list[str]) -> tuple[int, int] | None:
    """(height, width) of the maps ``agpctl eval --save-maps`` writes for this run: the model's
    input size, or for a tiled run the largest evaluation shape of its (sub-runs') test splits,
    read from the test images' headers; None when those cannot be read (the maps file is
    meant for reports without the data, so that is no reason to complain)."""
    if Tiling.from_config(cfg.data) is None:
        return cfg.model.image_size, cfg.model.image_size
    shapes = []
    for sub in sub_runs:
        sub_cfg = runs.load_run_config(sub)
        try:
            test = split_samples(sub_cfg.data, sub_cfg.train.seed).test
            shapes.append(evaluation_shape(working_shapes(test, Tiling.from_config(sub_cfg.data))))
        except (DataError, UserError):
            return None
    return max(h for h, _ in shapes), max(w for _, w in shapes)


# -- thresholds -----------------------------------------------------------------------------
def category_thresholds(run_uri: str, sub_runs: list[str], categories: list[str]) -> dict[str, CategoryThresholds]:
    """Per category, the thresholds of :func:`thresholds_for`: from the category's own model
    in a per-category run, else from the run's thresholds.json."""
    by_name = {_last_part(sub): sub for sub in sub_runs}
    result = {}
    for category in categories:
        own_model = run_uri != sub_runs[0] and category in by_name
        stored = runs.stored_thresholds(by_name[category] if own_model else run_uri) or {}
        result[category] = thresholds_for(stored, category, own_model)
    return result


def thresholds_for(stored: dict[str, Any], category: str, own_model: bool = False) -> CategoryThresholds:
    """The thresholds that decide ``category``'s images in ``agpctl predict`` (its own when
    calibrated on enough images, else the pooled ones), from one thresholds.json."""
    if _number(stored.get("image")) is None or _number(stored.get("pixel")) is None:
        return CategoryThresholds(None, None, "none (the run has no calibrated thresholds)")
    policy = ThresholdPolicy(stored)
    deciding = policy.for_category(category)
    entry = (stored.get("per_category") or {}).get(category)
    if own_model:  # a per-category run: its pooled thresholds are already the category's
        return CategoryThresholds(deciding.image, deciding.pixel, "the category's model")
    if deciding is not policy.default:
        return CategoryThresholds(deciding.image, deciding.pixel,
                                  f"the category's own ({entry.get('images')} held-out images)", True)
    if isinstance(entry, dict) and _number(entry.get("image")) is not None:
        return CategoryThresholds(deciding.image, deciding.pixel,
                                  f"pooled over all categories, as predict uses: the category's own "
                                  f"({float(entry['image']):.4g}) rests on only {entry.get('images')} held-out images",
                                  False)
    return CategoryThresholds(deciding.image, deciding.pixel, "pooled over all categories")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# -- training history -------------------------------------------------------------------------
def _histories(run_uri: str, sub_runs: list[str]) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """history.jsonl of each model (none for runs trained before it was written), labelled by
    category for a per-category run; lines that are no history record are named in the notes."""
    histories: dict[str, list[dict[str, Any]]] = {}
    notes: list[str] = []
    for sub in sub_runs:
        records = runs.read_history(sub, warn=notes.append)
        if records:
            histories["" if sub == run_uri else _last_part(sub)] = records
    return histories, notes


# -- configuration summary -----------------------------------------------------------------------
def _configuration(run_uri: str, cfg: RunConfig, sub_runs: list[str], categories: list[str],
                   checkpoints: list[dict[str, Any]], maps_file: str | None) -> list[tuple[str, str]]:
    summaries = [s for s in (_summary(sub) for sub in sub_runs) if s]
    first = summaries[0] if summaries else {}
    backbone = first.get("backbone") or {}
    weights = backbone.get("weight_source") or ("pretrained" if cfg.model.backbone.pretrained == "yes" else "random")
    setting = "one model per category" if cfg.data.per_category else "one model for all categories"
    if cfg.data.shots:
        setting += f", few-shot ({cfg.data.shots} images per category)"
    if maps_file:
        newest = [epoch for sub in sub_runs for epoch, _ in runs.list_checkpoints(sub)[-1:]]
        evaluated = f"unknown: maps from {maps_file} (newest checkpoint: epoch {_join_numbers(newest)})"
    else:
        evaluated = f"epoch {_join_numbers([c['epoch'] for c in checkpoints])}"
    finished = [s["finished"] for s in summaries if s.get("finished")]
    counts = [(name, sum(int(s.get(key) or 0) for s in summaries))
              for name, key in (("train", "train_images"), ("held-out", "val_images"), ("test", "test_images"))]
    return [
        ("run", run_uri),
        ("method", cfg.method),
        ("backbone", f"{cfg.model.backbone.name} ({weights} weights)"),
        ("dataset", f"{cfg.data.dataset} at {cfg.data.root}" if cfg.data.root else cfg.data.dataset),
        ("categories", ", ".join(categories)),
        ("setting", setting),
        ("epochs", str(cfg.train.epochs)),
        ("image size", f"{cfg.model.image_size} px"),
        ("checkpoint evaluated", evaluated),
        ("trained", max(finished) if finished else "not finished (no summary.json)"),
        ("images", ", ".join(f"{count} {name}" for name, count in counts) if summaries else "unknown"),
    ]


def _summary(run_uri: str) -> dict[str, Any]:
    path = storage.join(run_uri, runs.SUMMARY_FILE)
    return runs.read_json(path) if storage.exists(path) else {}


def _join_numbers(numbers: list[int]) -> str:
    distinct = sorted(set(numbers))
    return ", ".join(str(n) for n in distinct) if distinct else "unknown"


def _last_part(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1]
