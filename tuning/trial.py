"""One sweep trial, inside its Ray Tune actor: the trial's RunConfig and its training run.

A trial with one worker runs the training loop (``agpctl.training.worker.train_on_worker``)
in the trial itself, as a Tune function trainable that reports each epoch with
``ray.tune.report``. Launching a Ray Train worker group per trial — a controller, a
placement group and its cleaner, a synchronisation actor and the worker, each a fresh
process that imports Ray and torch — cost about 20 s per trial against 1–2 s of work in the
tests. The trial then reserves the worker's resources itself (:func:`trial_resources`).

A trial with several workers runs the same ``TorchTrainer(worker_loop)`` that ``agpctl
train`` runs, with a ``TuneReportCallback`` forwarding every report to Tune; that trial
only waits, so it reserves no CPU (1 MiB of Ray's logical memory keeps its placement bundle
non-empty) and the Train workers get the CPUs — what lets trials follow one another on a
2-CPU machine without deadlock.

Both write the same run directory ``runs/<trial id>/`` (agpctl.runs): checkpoints as
``checkpoint_epoch-NNNN/`` (the newest ``train.keep_checkpoints`` kept), history,
thresholds, metrics; and both report the same metrics (each report's ``epoch``,
``val/objective``…, ``final`` with the test metrics, and ``checkpoint_path`` when the
report saved one). A trial run again by ``--resume`` continues from its run directory's
newest valid checkpoint either way.
"""

from __future__ import annotations

import contextlib
from typing import Any

from agp_data import storage
from agpctl import runs
from agpctl.cluster.connect import use_assigned_cpus
from agpctl.cluster.trainer import make_torch_trainer, worker_resources
from agpctl.config import RunConfig
from agpctl.distributed import WorkerContext
from agpctl.training.progress import ProgressSender
from agpctl.training.worker import RunSpec, latest_payload, train_on_worker, worker_loop
from tuning.space import SearchSpace, parse_space
from tuning.state import RUNS_DIR, TRIAL_KEY, error_line, trial_error_uri

TRIAL_MEMORY_BYTES = 1 << 20  # a waiting multi-worker trial's only reservation (see module docstring)
CHECKPOINT_PATH_KEY = "checkpoint_path"  # as Ray Tune's TuneReportCallback names it


def trial_config(base: dict[str, Any], space: SearchSpace, sampled: dict[str, Any], runs_uri: str,
                 trial_id: str) -> RunConfig:
    cfg = RunConfig.from_dict(base, "sweep").with_overrides(space.overrides(sampled))
    cfg.storage.out, cfg.storage.name = runs_uri, trial_id
    return cfg


def trains_in_trial(cfg: RunConfig) -> bool:
    """One worker: the trial runs the training loop itself, no Ray Train worker group
    (unless ``--worker-actor`` asks for one, as it does of `agpctl train`)."""
    return cfg.cluster.workers == 1 and not cfg.cluster.worker_actor


def trial_resources(cfg: RunConfig) -> dict[str, float]:
    """What each trial reserves: the worker's own resources when it trains in the trial,
    else (a waiting driver of a worker group) none but a token of memory. ``cfg`` has its
    CPUs and GPUs per worker resolved."""
    if trains_in_trial(cfg):
        return worker_resources(cfg)
    return {"CPU": 0, "memory": TRIAL_MEMORY_BYTES}


def run_trial(config: dict[str, Any], base: dict[str, Any], space_raw: dict[str, Any], method: str,
              sweep_uri: str, points: dict[str, dict[str, Any]]) -> None:
    """Tune function trainable: one full training run of the planned trial
    ``config[TRIAL_KEY]`` in ``runs/<trial id>/``."""
    storage.configure_s3(base.get("storage", {}).get("s3_endpoint"))
    space = parse_space(space_raw, method, "sweep space")
    trial_id = config[TRIAL_KEY]
    runs_uri = storage.join(sweep_uri, RUNS_DIR)
    error_uri = trial_error_uri(sweep_uri, trial_id)
    storage.delete(error_uri)  # an earlier attempt's
    try:
        cfg = trial_config(base, space, points[trial_id], runs_uri, trial_id)
        run_uri = storage.join(runs_uri, trial_id)
        if not runs.has_run_config(run_uri):
            runs.write_run_config(run_uri, cfg)
        if trains_in_trial(cfg):
            train_in_trial(cfg, run_uri)
        else:
            train_with_worker_group(cfg, run_uri, runs_uri, trial_id)
    except Exception as exc:
        # The driver records this line (Tune's own error files are never read).
        with contextlib.suppress(Exception):
            storage.write_text(error_uri, error_line(exc) + "\n")
        raise


def train_in_trial(cfg: RunConfig, run_uri: str) -> None:
    """The whole run in this trial: the one worker of a Ray Train job, without Ray Train."""
    run = RunSpec.from_config({"run": cfg.to_dict(), "run_uri": run_uri})  # as worker_loop builds it
    use_assigned_cpus()
    ctx = WorkerContext(device=trial_device())
    progress = ProgressSender(None, enabled=False)  # a sweep shows its trials' reports, not their steps
    payload = latest_payload(None, run.run_uri, warn=progress.warning)
    train_on_worker(run, ctx, lambda model: model, TuneReporter(run.run_uri, run.cfg.train.keep_checkpoints),
                    progress, payload)


def train_with_worker_group(cfg: RunConfig, run_uri: str, runs_uri: str, trial_id: str) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback  # deferred: see agpctl.cluster

    trainer = make_torch_trainer(worker_loop, {"run": cfg.to_dict(), "run_uri": run_uri}, cfg, name=trial_id,
                                 storage_out=runs_uri, callbacks=[TuneReportCallback()])
    trainer.fit()


def trial_device():
    """The GPU Ray assigned to this trial (it sees only that one), else the CPU."""
    import ray  # deferred: see agpctl.cluster
    import torch

    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


class TuneReporter:
    """``train_on_worker``'s ``report`` inside a trial: a checkpoint goes to the run directory
    (:func:`agpctl.runs.save_checkpoint`), then the metrics go to Tune — in that order, so that a trial ASHA stops
    on this report keeps the checkpoint it reported."""

    def __init__(self, run_uri: str, keep: int) -> None:
        self.run_uri = run_uri
        self.keep = max(1, keep)

    def __call__(self, metrics: dict[str, Any], checkpoint_payload: dict[str, Any] | None, epoch: int | None) -> None:
        from ray import tune  # deferred: see agpctl.cluster

        result = dict(metrics)
        if checkpoint_payload is not None:
            result[CHECKPOINT_PATH_KEY] = runs.save_checkpoint(self.run_uri, checkpoint_payload, epoch, self.keep)
        tune.report(result)

