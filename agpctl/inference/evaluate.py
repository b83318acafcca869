"""``agpctl eval``: reload a finished run and recompute its metrics on a test split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agp_data import storage
from agpctl import checkpoint as ckpt
from agpctl.config import RunConfig
from agpctl.data_setup import build_datasets, split_samples
from agpctl.engine import Predictions, WorkerContext, build_model, default_device, predict_dataset
from agpctl.errors import UserError


@dataclass
class LoadedRun:
    uri: str
    cfg: RunConfig
    model: Any
    checkpoint: ckpt.LoadedCheckpoint
    thresholds: dict[str, Any]


def sub_runs(run_uri: str) -> list[str]:
    """The model directories of a run: itself, or one per category for --per-category."""
    cfg = ckpt.load_run_config(run_uri)
    if not cfg.data.per_category:
        return [run_uri]
    runs = []
    for path in storage.list_files(run_uri, recursive=True):
        if path.endswith("/" + ckpt.CONFIG_FILE) and path != storage.join(run_uri, ckpt.CONFIG_FILE):
            runs.append(path[: -len(ckpt.CONFIG_FILE) - 1])
    if not runs:
        raise UserError(f"per-category run {run_uri} holds no category runs yet")
    return sorted(runs)


def load_run(run_uri: str, device=None) -> LoadedRun:
    run_uri = run_uri.rstrip("/")
    cfg = ckpt.load_run_config(run_uri)
    storage.configure_s3(cfg.storage.s3_endpoint or storage.s3_endpoint())
    loaded = ckpt.load_latest_checkpoint(run_uri)
    if loaded.payload.get("method") != cfg.method:
        raise UserError(f"{loaded.uri} was written by method {loaded.payload.get('method')!r}, config says {cfg.method!r}")
    model = build_model(cfg, device or default_device())
    model.load_state_dict(loaded.payload["model"])
    model.eval()
    return LoadedRun(run_uri, cfg, model, loaded, loaded.payload.get("thresholds") or {})


def evaluate_run(run_uri: str, *, dataset: str | None = None, root: str | None = None,
                 batch_size: int | None = None, on_batch=None) -> tuple[dict[str, Any], list[Predictions]]:
    """Per-category metrics of every model in the run on its (or another) test split."""
    table: dict[str, Any] = {}
    all_predictions = []
    runs = sub_runs(run_uri)
    device = default_device()
    for sub in runs:
        run = load_run(sub, device)
        cfg = run.cfg
        if dataset or root:
            overrides = {}
            if dataset:
                overrides["data.dataset"] = dataset
            if root:
                overrides["data.root"] = root
            cfg = cfg.with_overrides(overrides)
        splits = split_samples(cfg.data, cfg.train.seed)
        _, _, test_set = build_datasets(cfg.data, splits, cfg.model.image_size, run.model.backbone.mean,
                                        run.model.backbone.std)
        predictions = predict_dataset(run.model, test_set, WorkerContext(device=device), batch_size or cfg.train.eval_batch_size,
                                      cfg.train.precision, on_batch=on_batch)
        all_predictions.append(predictions)
        rows = predictions.metrics()
        if len(runs) > 1:
            rows = {k: v for k, v in rows.items() if k != "mean"}
        table.update(rows)
    if len(runs) > 1:
        from agpctl.train import _with_mean

        table = _with_mean(table)
    return table, all_predictions


def merge_predictions(parts: list[Predictions]) -> Predictions:
    import numpy as np

    if len(parts) == 1:
        return parts[0]
    return Predictions(
        indices=np.arange(sum(len(p.scores) for p in parts)),
        scores=np.concatenate([p.scores for p in parts]),
        maps=np.concatenate([p.maps for p in parts]),
        masks=np.concatenate([p.masks for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        categories=[c for p in parts for c in p.categories],
        paths=[x for p in parts for x in p.paths],
    )
