"""The run directory: what a training run leaves behind, local or on S3, and how it is read.

    <out>/<name>/                       a run (name: <method>-<dataset>-<time> by default)
        config.yaml                     the resolved configuration: enough to rebuild the model
        checkpoint_epoch-NNNN/model.pt  checkpoints (Ray Train persists a worker group's; agpctl.checkpoint)
        thresholds.json                 calibrated image / pixel thresholds (pooled and per category)
        categories.json                 the categories the model knows (their prototypes: checkpoint payload)
        summary.json                    what was trained on what, and when
        metrics.json                    the test table per category and the mean
        history.jsonl                   one JSON line per trained epoch (losses, lr, speed, validation)
        tracking.json                   where this run's experiment tracking lives (the MLflow run id)
        tensorboard/                    --tensorboard: TensorBoard event files
        <category>/...                  --per-category: one such run per category (sub-runs);
                                        the parent holds config.yaml and the merged metrics.json

Everything that names, writes or loads these files lives here, so training, evaluation,
prediction, export and sweeps agree on one layout.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

import torch

from agp_data import storage
from agp_models.base import AnomalyModel
from agpctl.checkpoint import CHECKPOINT_DIR_PREFIX, CHECKPOINT_FILE, checkpoint_dir_name, deserialise, serialise
from agpctl.config import RunConfig
from agpctl.errors import UserError
from agpctl.models import build_model, default_device
from agpctl.strict_json import to_json

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.json"
THRESHOLDS_FILE = "thresholds.json"
CATEGORIES_FILE = "categories.json"
HISTORY_FILE = "history.jsonl"
TRACKING_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"
_CHECKPOINT_DIR = re.compile(re.escape(CHECKPOINT_DIR_PREFIX) + r"(\d+)$")


# -- naming --------------------------------------------------------------------------------
def default_run_name(cfg: RunConfig) -> str:
    return f"{cfg.method}-{cfg.data.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_uri_for(out: str, name: str) -> str:
    return storage.join(out if storage.is_s3(out) else os.path.abspath(out), name)


def category_sub_run(cfg: RunConfig, run_uri: str, category: str) -> tuple[RunConfig, str]:
    """The configuration and directory of a per-category run's model for ``category``."""
    sub_cfg = cfg.with_overrides({"data.categories": [category], "data.per_category": False,
                                  "storage.name": f"{cfg.storage.name}/{category}"})
    return sub_cfg, storage.join(run_uri, category)


def sub_runs(run_uri: str) -> list[str]:
    """The model directories of a run: itself, or one per category for --per-category."""
    cfg = load_run_config(run_uri)
    if not cfg.data.per_category:
        return [run_uri]
    runs = []
    for path in storage.list_files(run_uri, recursive=True):
        if path.endswith("/" + CONFIG_FILE) and path != storage.join(run_uri, CONFIG_FILE):
            runs.append(path[: -len(CONFIG_FILE) - 1])
    if not runs:
        raise UserError(f"per-category run {run_uri} holds no category runs yet")
    return sorted(runs)


def select_model_run(run_uri: str, category: str | None = None) -> str:
    """The model directory to use: the run itself, or for a per-category run the category's
    (``category`` required unless the run holds a single one)."""
    run_uri = run_uri.rstrip("/")
    runs = sub_runs(run_uri)
    if runs == [run_uri]:
        return run_uri
    names = {r.rstrip("/").rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1]: r for r in runs}
    if category is None:
        if len(names) == 1:
            return next(iter(names.values()))
        raise UserError(f"{run_uri} holds one model per category ({', '.join(sorted(names))}); pass --category NAME")
    if category not in names:
        raise UserError(f"{run_uri} has no model for category {category!r}; choose one of {', '.join(sorted(names))}")
    return names[category]


# -- configuration -------------------------------------------------------------------------
def load_run_config(run_uri: str) -> RunConfig:
    path = storage.join(run_uri, CONFIG_FILE)
    if not storage.exists(path):
        raise UserError(f"{path} not found: {run_uri} is not an agp run directory")
    return RunConfig.from_yaml(storage.read_text(path), source=path)


def write_run_config(run_uri: str, cfg: RunConfig) -> None:
    storage.write_text(storage.join(run_uri, CONFIG_FILE), cfg.to_yaml())


def has_run_config(run_uri: str) -> bool:
    return storage.exists(storage.join(run_uri, CONFIG_FILE))


def discard_if_unstarted(run_uri: str) -> bool:
    """A run that never reached its first checkpoint keeps nothing worth resuming: remove the
    config files written for it (the run's and its sub-runs'), so the same command (same
    --name) can run again. A run with any checkpoint is left exactly as it is. True when the
    run held no checkpoint."""
    if not storage.exists(run_uri) and not storage.is_dir(run_uri):
        return True
    files = storage.list_files(run_uri, recursive=True)
    if any(path.endswith("/" + CHECKPOINT_FILE) or path.endswith(os.sep + CHECKPOINT_FILE) for path in files):
        return False
    for path in files:
        if path.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1] == CONFIG_FILE:
            storage.delete(path)
    return True


def resume_config(run_uri: str, cli_cfg: RunConfig) -> RunConfig:
    """The saved configuration of the run at ``run_uri``, with where-to-run from ``cli_cfg``."""
    cfg = load_run_config(run_uri)
    # Where to run may change on resume; what to train may not. The run may have moved:
    # its location is where it is now.
    cfg.cluster = cli_cfg.cluster
    cfg.storage.s3_endpoint = cli_cfg.storage.s3_endpoint or cfg.storage.s3_endpoint
    # How to watch it may change too: --tensorboard / --mlflow given on resume switch tracking on.
    cfg.train.tensorboard = cfg.train.tensorboard or cli_cfg.train.tensorboard
    cfg.train.mlflow = cli_cfg.train.mlflow or cfg.train.mlflow
    parent, _, name = run_uri.rstrip("/").rpartition("/")
    cfg.storage.out, cfg.storage.name = parent, name
    return cfg


# -- checkpoints ---------------------------------------------------------------------------
@dataclass
class LoadedCheckpoint:
    uri: str  # the checkpoint directory
    epoch: int
    payload: dict[str, Any]
    skipped: list[str] = field(default_factory=list)  # newer checkpoints that did not load


def list_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(epoch, directory) pairs, oldest first."""
    if not storage.exists(run_uri) and not storage.is_dir(run_uri):
        raise UserError(f"run {run_uri} does not exist; pass the directory `agpctl train` printed")
    found: dict[int, str] = {}
    for path in storage.list_files(run_uri, recursive=True):
        if not path.endswith("/" + CHECKPOINT_FILE) and not path.endswith("\\" + CHECKPOINT_FILE):
            continue
        parent = path[: -len(CHECKPOINT_FILE) - 1]
        match = _CHECKPOINT_DIR.search(parent)
        if match and _same_run(run_uri, parent):
            found[int(match.group(1))] = parent
    return sorted(found.items())


# Ray Train's list of a worker group's checkpoints, in the run directory.
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


def save_checkpoint(run_uri: str, payload: dict[str, Any], epoch: int | None, keep: int) -> str:
    """Writes ``payload`` as the run's checkpoint of ``epoch`` (atomically) and removes the
    oldest beyond ``keep``, as Ray Train does for a worker group's reports; for runs that
    train without one (in the agpctl process, in a sweep trial). Returns its directory."""
    directory = storage.join(run_uri, checkpoint_dir_name(epoch))
    storage.write_bytes(storage.join(directory, CHECKPOINT_FILE), serialise(payload))
    for _, older in list_checkpoints(run_uri)[: -max(1, keep)]:
        storage.delete(older)
    return directory


def _same_run(run_uri: str, checkpoint_dir: str) -> bool:
    rest = checkpoint_dir[len(run_uri.rstrip("/")) :].strip("/\\")
    return "/" not in rest and "\\" not in rest


def has_checkpoint(run_uri: str) -> bool:
    try:
        return bool(list_checkpoints(run_uri))
    except UserError:
        return False


def load_latest_checkpoint(run_uri: str) -> LoadedCheckpoint:
    """The newest checkpoint whose file loads; half-written ones are skipped."""
    checkpoints = list_checkpoints(run_uri)
    if not checkpoints:
        raise UserError(f"run {run_uri} has no checkpoint yet; train it (or resume it) first")
    skipped = []
    for epoch, directory in reversed(checkpoints):
        try:
            payload = deserialise(storage.read_bytes(storage.join(directory, CHECKPOINT_FILE)), directory)
        except UserError:
            skipped.append(directory)
            continue
        return LoadedCheckpoint(directory, epoch, payload, skipped)
    raise UserError(f"run {run_uri}: every checkpoint is unreadable ({', '.join(skipped)}); retrain")


# -- a trained model -----------------------------------------------------------------------
@dataclass
class LoadedRun:
    uri: str
    cfg: RunConfig
    model: AnomalyModel
    checkpoint: LoadedCheckpoint
    thresholds: dict[str, Any]

    def info(self) -> dict[str, Any]:
        """What predictions record about the model that made them."""
        return {"run": self.uri, "method": self.cfg.method, "epoch": self.checkpoint.epoch,
                "image_size": self.cfg.model.image_size}


def load_run(run_uri: str, device: torch.device | None = None, warn: Callable[[str], None] | None = None
             ) -> LoadedRun:
    """The model of one (sub-)run from its newest valid checkpoint, in eval mode; newer
    checkpoints that do not load are skipped and named through ``warn``."""
    run_uri = run_uri.rstrip("/")
    cfg = load_run_config(run_uri)
    storage.configure_s3(cfg.storage.s3_endpoint or storage.s3_endpoint())
    loaded = load_latest_checkpoint(run_uri)
    for skipped in loaded.skipped:
        if warn is not None:
            warn(f"skipped unreadable checkpoint {skipped}; using {loaded.uri} (epoch {loaded.epoch})")
    if loaded.payload.get("method") != cfg.method:
        raise UserError(f"{loaded.uri} was written by method {loaded.payload.get('method')!r}, config says {cfg.method!r}")
    model = build_model(cfg, device or default_device())
    model.load_state_dict(loaded.payload["model"])
    model.eval()
    return LoadedRun(run_uri, cfg, model, loaded, loaded.payload.get("thresholds") or {})


def stored_thresholds(run_uri: str) -> dict[str, Any] | None:
    """thresholds.json of a finished run, or None before the run finished."""
    path = storage.join(run_uri, THRESHOLDS_FILE)
    return read_json(path) if storage.exists(path) else None


def stored_categories(run_uri: str) -> list[str] | None:
    """The category names categories.json records, or None (a run from before it was written,
    or not finished yet)."""
    path = storage.join(run_uri, CATEGORIES_FILE)
    return list(read_json(path).get("categories") or []) if storage.exists(path) else None


# -- results -------------------------------------------------------------------------------
def write_categories(run_uri: str, categories: dict[str, Any]) -> None:
    """categories.json: the names of the categories the model knows and how images are matched to them."""
    write_json(storage.join(run_uri, CATEGORIES_FILE), categories)


def write_results(run_uri: str, table: dict[str, Any], summary: dict[str, Any], thresholds: dict[str, Any]) -> None:
    """A finished run's thresholds, summary and metrics; metrics.json last, as it marks the run finished."""
    write_json(storage.join(run_uri, THRESHOLDS_FILE), thresholds)
    write_json(storage.join(run_uri, SUMMARY_FILE), summary)
    write_json(storage.join(run_uri, METRICS_FILE), {"metrics": table, "summary": summary})


def read_metrics(run_uri: str) -> dict[str, Any]:
    """The metrics table of a finished (sub-)run."""
    return read_json(storage.join(run_uri, METRICS_FILE))["metrics"]


def has_metrics(run_uri: str) -> bool:
    return storage.exists(storage.join(run_uri, METRICS_FILE))


def write_per_category_metrics(run_uri: str, table: dict[str, Any]) -> None:
    write_json(storage.join(run_uri, METRICS_FILE), {"metrics": table, "summary": {"per_category": True}})


def category_rows(table: dict[str, Any]) -> dict[str, Any]:
    """A metrics table without its mean row."""
    return {k: v for k, v in table.items() if k != "mean"}


def with_mean(rows: dict[str, Any]) -> dict[str, Any]:
    """Category rows, sorted, plus their mean (metrics undefined for a category left out)."""
    names = sorted({k for row in rows.values() for k in row})
    mean = {}
    for name in names:
        values = [row[name] for row in rows.values() if name in row and row[name] is not None and not math.isnan(row[name])]
        mean[name] = sum(values) / len(values) if values else float("nan")
    return {**dict(sorted(rows.items())), "mean": mean}


# -- training history and tracking -----------------------------------------------------------
# history.jsonl: one strict-JSON object per line, one line per trained epoch, written by rank 0
# as each epoch ends (agpctl.training.worker) and read by reports:
#   {"epoch": int, "loss": float, "losses": {"<name>": float, ...}, "lr": float,
#    "images_per_s": float, "seconds": float,
#    "val": {"i_auroc": float, "p_auroc": float, "pro": float, "objective": float},  (with train.validation)
#    "time": "<ISO 8601>"}
# "losses" holds every loss the method returns, averaged over the epoch (the total "loss" too);
# "lr" is the first parameter group's of the first optimiser after the epoch; "images_per_s"
# counts the epoch's training images of all workers. A metric undefined for the data is null.


def append_history(run_uri: str, record: dict[str, Any]) -> None:
    """Adds ``record`` (one epoch's line) to the run's history.jsonl. Lines of that epoch or a
    later one are dropped first: a run resumed from an older checkpoint trains those epochs
    again (e.g. stopped after epoch 5's line but before its checkpoint), and each epoch keeps
    one line. Lines that are not history records are kept as they are.

    The whole file is rewritten (atomically; on S3 one put): it is a few hundred bytes per epoch."""
    epoch = int(record["epoch"])
    path = storage.join(run_uri, HISTORY_FILE)
    kept = []
    if storage.exists(path):
        for line in _history_lines(path):
            earlier = _history_record(line)
            if line.strip() and (earlier is None or earlier["epoch"] < epoch):
                kept.append(line)
    kept.append(to_json(record, indent=None))
    storage.write_text(path, "\n".join(kept) + "\n")


def read_history(run_uri: str, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The epochs of the run's history.jsonl in order ([] before its first epoch). A line that
    is not a history record (an edit, a damaged file) is skipped and named through ``warn``
    (by default a Python warning), never fatal."""
    path = storage.join(run_uri, HISTORY_FILE)
    if not storage.exists(path):
        return []
    records = []
    for number, line in enumerate(_history_lines(path), 1):
        if not line.strip():
            continue
        record = _history_record(line)
        if record is None:
            message = f"{path} line {number} is not a history record (JSON with an integer epoch); skipped"
            if warn is None:
                warnings.warn(message, stacklevel=2)
            else:
                warn(message)
            continue
        records.append(record)
    return sorted(records, key=lambda r: r["epoch"])


def _history_lines(path: str) -> list[str]:
    # Undecodable bytes become U+FFFD, so a damaged line fails to parse instead of the whole file.
    return storage.read_bytes(path).decode("utf-8", errors="replace").splitlines()


def _history_record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    epoch = record.get("epoch") if isinstance(record, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        return None
    return record


def read_tracking(run_uri: str) -> dict[str, Any]:
    """The run's tracking.json (which experiment-tracking runs it logs to); {} when it has none
    or it does not parse, so tracking then starts afresh."""
    path = storage.join(run_uri, TRACKING_FILE)
    if not storage.exists(path):
        return {}
    try:
        data = read_json(path)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def write_tracking(run_uri: str, data: dict[str, Any]) -> None:
    write_json(storage.join(run_uri, TRACKING_FILE), data)


# -- JSON ----------------------------------------------------------------------------------
def write_json(uri: str, data: Any) -> None:
    storage.write_text(uri, to_json(data) + "\n")


def read_json(uri: str) -> Any:
    return json.loads(storage.read_text(uri))
