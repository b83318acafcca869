"""``agpctl eval``: reload a finished run and recompute its metrics on a test split."""

from __future__ import annotations

from typing import Any, Callable

from agp_data.integrity import check_masks
from agp_data.splits import build_datasets, split_samples
from agp_data.tiling import Tiling
from agpctl import runs
from agpctl.distributed import WorkerContext
from agpctl.inference.scoring import Predictions, predict_dataset
from agpctl.models import default_device


def evaluate_run(run_uri: str, *, dataset: str | None = None, root: str | None = None,
                 batch_size: int | None = None, on_batch=None, on_load: Callable[[runs.LoadedRun], None] | None = None,
                 on_warning: Callable[[str], None] | None = None) -> tuple[dict[str, Any], list[Predictions]]:
    """Per-category metrics of every model in the run on its (or another) test split;
    ``on_load`` hears of each model loaded (which checkpoint, which epoch)."""
    table: dict[str, Any] = {}
    all_predictions = []
    models = runs.sub_runs(run_uri)
    device = default_device()
    for sub in models:
        run = runs.load_run(sub, device, warn=on_warning)
        if on_load is not None:
            on_load(run)
        cfg = run.cfg
        if dataset or root:
            overrides = {}
            if dataset:
                overrides["data.dataset"] = dataset
            if root:
                overrides["data.root"] = root
            cfg = cfg.with_overrides(overrides)
        splits = split_samples(cfg.data, cfg.train.seed)
        for note in check_masks(splits.test, strict=cfg.data.strict):
            if on_warning is not None:
                on_warning(note)
        _, _, test_set = build_datasets(cfg.data, splits, cfg.model.image_size, run.model.backbone.mean,
                                        run.model.backbone.std)
        predictions = predict_dataset(run.model, test_set, WorkerContext(device=device), batch_size or cfg.train.eval_batch_size,
                                      cfg.train.precision, on_batch=on_batch, tiling=Tiling.from_config(cfg.data))
        all_predictions.append(predictions)
        rows = predictions.metrics()
        table.update(runs.category_rows(rows) if len(models) > 1 else rows)
    if len(models) > 1:
        table = runs.with_mean(table)
    return table, all_predictions


def merge_predictions(parts: list[Predictions]) -> Predictions:
    """The predictions of a per-category run's models as one set (for --save-maps)."""
    return parts[0] if len(parts) == 1 else Predictions.concatenate(parts, reindex=True)
