"""Experiment tracking of a training run besides its own history.jsonl: TensorBoard event
files (``train.tensorboard``) and an MLflow run (``train.mlflow``), driven by rank 0 of the
worker loop.

Each :class:`Tracker` is told every epoch's history record (see :mod:`agpctl.runs`) and, at
the end, the test table. Tracking never stops a training: a tracker that fails (a server
gone, a full disk) is named in one warning and switched off for the rest of the run; the
run's history.jsonl still has every epoch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Callable
from urllib.parse import urlparse

from agp_data import storage
from agpctl import runs
from agpctl.config import RunConfig
from agpctl.errors import UserError, first_line

DEFAULT_EXPERIMENT = "agp"  # MLflow experiment of agp runs; MLFLOW_EXPERIMENT_NAME overrides it
REACHABLE_TIMEOUT_S = 5.0


# -- before Ray starts -----------------------------------------------------------------------
def check_tracking(cfg: RunConfig) -> None:
    """The chosen trackers' packages are installed, and the MLflow server of a run on this
    machine answers (a remote cluster may reach servers this machine cannot: its worker warns)."""
    if cfg.train.tensorboard and not _installed("tensorboardX"):
        raise UserError("--tensorboard needs the tensorboardX package: pip install 'agp[tensorboard]'")
    if cfg.train.mlflow:
        if not _installed("mlflow"):
            raise UserError("--mlflow needs the mlflow package: pip install 'agp[mlflow]'")
        if cfg.cluster.address is None:
            check_reachable(cfg.train.mlflow)


def _installed(module: str) -> bool:
    # find_spec instead of an import: importing mlflow costs seconds on every `agpctl train`.
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def check_reachable(uri: str, timeout: float = REACHABLE_TIMEOUT_S) -> None:
    """An http(s) tracking URI answers at all (any HTTP status will do); other kinds of URI
    (databricks, sqlite:, file:) are left to MLflow."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # the server answered, with an error status: it is there
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"--mlflow {uri}: no server answers there ({reason}); start the MLflow server "
                        "or fix the URI") from None


# -- the trackers ----------------------------------------------------------------------------
class Tracker:
    """One place a run's progress is sent to."""

    name = "tracker"

    def log_epoch(self, record: dict[str, Any]) -> None:
        """One epoch's history record (:func:`agpctl.runs.append_history`'s format)."""

    def log_results(self, table: dict[str, Any], epoch: int) -> None:
        """The test table (per category and ``mean``) of the finished run."""

    def close(self) -> None:
        """The run finished: write out and release what the tracker holds."""


class TensorBoardTracker(Tracker):
    """Scalars per epoch (step = epoch) and the test table, as TensorBoard event files in
    ``<run>/tensorboard/``. For an ``s3://`` run the files are written below the local cache
    (``$AGP_CACHE_DIR/tensorboard/``) and uploaded at every epoch end."""

    name = "TensorBoard"

    def __init__(self, run_uri: str, start_epoch: int):
        from tensorboardX import SummaryWriter  # optional package (agp[tensorboard])

        self.target = storage.join(run_uri, runs.TENSORBOARD_DIR)
        if storage.is_s3(run_uri):
            key = hashlib.sha256(run_uri.encode()).hexdigest()[:16]
            self.logdir = os.path.join(storage.cache_root(), "tensorboard", key)
        else:
            self.logdir = self.target
        # A resumed run trains epochs after start_epoch again: TensorBoard hides the events an
        # interrupted attempt logged from that step on.
        # Event files are named by the second they were opened in: an attempt resumed within the
        # same second would overwrite the earlier file. The nanosecond suffix keeps every
        # attempt's file and sorts them in the order they were written.
        self.writer = SummaryWriter(self.logdir, purge_step=start_epoch + 1, filename_suffix=f".{time.time_ns()}")

    def log_epoch(self, record: dict[str, Any]) -> None:
        for name, value in epoch_metrics(record).items():
            self.writer.add_scalar(name, value, record["epoch"])
        self._flush()

    def log_results(self, table: dict[str, Any], epoch: int) -> None:
        for name, value in result_metrics(table).items():
            self.writer.add_scalar(name, value, epoch)
        self.writer.add_text("test", markdown_table(table), epoch)
        self._flush()

    def close(self) -> None:
        self.writer.close()
        self._upload()

    def _flush(self) -> None:
        self.writer.flush()
        self._upload()

    def _upload(self) -> None:
        if self.logdir != self.target and os.path.isdir(self.logdir):
            storage.upload_dir(self.logdir, self.target)


class MLflowTracker(Tracker):
    """An MLflow run on the tracking server ``uri``: the flattened resolved config as
    parameters, every epoch's metrics (step = epoch), the test table per category and mean.
    Its id is kept in the run directory's tracking.json, so a resumed run continues it."""

    name = "MLflow"

    def __init__(self, cfg: RunConfig, run_uri: str, resumed: bool, warn: Callable[[str], None]):
        from mlflow.tracking import MlflowClient  # optional package (agp[mlflow])

        self.uri = cfg.train.mlflow
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = self._continued_run(run_uri, warn) if resumed else None
        if self.run_id is None:
            self.run_id = self._new_run(cfg, run_uri)
            tracking = runs.read_tracking(run_uri)
            tracking["mlflow"] = {"tracking_uri": self.uri, "run_id": self.run_id}
            runs.write_tracking(run_uri, tracking)

    def _continued_run(self, run_uri: str, warn: Callable[[str], None]) -> str | None:
        previous = runs.read_tracking(run_uri).get("mlflow") or {}
        if not previous.get("run_id") or previous.get("tracking_uri") != self.uri:
            return None
        try:
            self.client.update_run(previous["run_id"], status="RUNNING")
        except Exception as exc:  # noqa: BLE001 - deleted, or another server's: start a new MLflow run
            warn(f"MLflow run {previous['run_id']} could not be continued ({first_line(exc)}); logging to a new one")
            return None
        return previous["run_id"]

    def _new_run(self, cfg: RunConfig, run_uri: str) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(name)
            except Exception:  # noqa: BLE001 - another run created it first
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        run = self.client.create_run(experiment_id, run_name=cfg.storage.name,
                                     tags={"agp.run_dir": run_uri, "agp.method": cfg.method})
        self._log_params(run.info.run_id, flat_params(cfg.to_dict()))
        return run.info.run_id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param  # optional package (agp[mlflow])

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow's limit per batch
            self.client.log_batch(run_id, params=items[start: start + 100])

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # optional package (agp[mlflow])

        now = int(time.time() * 1000)
        items = [Metric(key, value, now, step) for key, value in metrics.items()]
        for start in range(0, len(items), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=items[start: start + 1000])

    def log_epoch(self, record: dict[str, Any]) -> None:
        self._log_metrics(epoch_metrics(record), record["epoch"])

    def log_results(self, table: dict[str, Any], epoch: int) -> None:
        self._log_metrics(result_metrics(table), epoch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


class Tracking:
    """The trackers of one run (none on ranks other than 0). A tracker that fails is named in
    one warning and dropped; training goes on."""

    def __init__(self, trackers: list[Tracker] | None = None, warn: Callable[[str], None] = lambda text: None):
        self.trackers = list(trackers or [])
        self.warn = warn

    def epoch(self, record: dict[str, Any]) -> None:
        self._each(lambda tracker: tracker.log_epoch(record))

    def finished(self, table: dict[str, Any], epoch: int) -> None:
        """The test table, then every tracker closed."""
        self._each(lambda tracker: tracker.log_results(table, epoch))
        self._each(lambda tracker: tracker.close())
        self.trackers = []

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 - tracking must never end a training
                self.trackers.remove(tracker)
                self.warn(f"{tracker.name} tracking stopped: {first_line(exc)} (history.jsonl still has every epoch)")


def start_tracking(cfg: RunConfig, run_uri: str, *, start_epoch: int, resumed: bool,
                   warn: Callable[[str], None]) -> Tracking:
    """The trackers ``cfg.train`` asks for (rank 0 only); one that cannot start is warned about
    and left out."""
    makers: list[tuple[str, Callable[[], Tracker]]] = []
    if cfg.train.tensorboard:
        makers.append(("TensorBoard", lambda: TensorBoardTracker(run_uri, start_epoch)))
    if cfg.train.mlflow:
        makers.append(("MLflow", lambda: MLflowTracker(cfg, run_uri, resumed, warn)))
    trackers = []
    for name, make in makers:
        try:
            trackers.append(make())
        except Exception as exc:  # noqa: BLE001 - ImportError on a worker, a server that is not there
            warn(f"{name} tracking is off for this run: {first_line(exc)}")
    return Tracking(trackers, warn)


# -- what is logged --------------------------------------------------------------------------
def epoch_metrics(record: dict[str, Any]) -> dict[str, float]:
    """An epoch's history record as metric name -> value: every loss by the method's name for
    it (``loss``, ``loss_feature`` ...), ``lr``, ``images_per_s``, ``epoch_seconds`` and
    ``val/<metric>``. Undefined values (null) are left out."""
    metrics: dict[str, Any] = {**record.get("losses", {}), "loss": record.get("loss"), "lr": record.get("lr"),
                               "images_per_s": record.get("images_per_s"), "epoch_seconds": record.get("seconds")}
    metrics.update({f"val/{name}": value for name, value in (record.get("val") or {}).items()})
    return {_metric_key(name): float(value) for name, value in metrics.items() if _defined(value)}


def result_metrics(table: dict[str, Any]) -> dict[str, float]:
    """The test table as ``test/<metric>`` (the mean) and ``test/<category>/<metric>``."""
    metrics = {}
    for category, row in table.items():
        prefix = "test" if category == "mean" else f"test/{category}"
        for name, value in row.items():
            if _defined(value):
                metrics[_metric_key(f"{prefix}/{name}")] = float(value)
    return metrics


def markdown_table(table: dict[str, Any]) -> str:
    """The test table as Markdown (TensorBoard's text tab renders it)."""
    names = sorted({name for row in table.values() for name in row})
    lines = ["| category | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for category, row in table.items():
        cells = [f"{row[name]:.4f}" if _defined(row.get(name)) else "-" for name in names]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted names -> text (``train.epochs`` -> ``"3"``), within MLflow's
    limit on a parameter's length."""
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params.update(flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            params[name] = text[:6000]
    return params


def _defined(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


_METRIC_KEY_CHARS = re.compile(r"[^\w\-. /:]")


def _metric_key(name: str) -> str:
    # MLflow accepts letters, digits, _ - . space / and : in names; a category may hold others.
    return _METRIC_KEY_CHARS.sub("_", name)
