"""Inside each Ray Train worker: the whole run on one worker — build, train, checkpoint,
calibrate thresholds, validate, evaluate on the test split, write the results.

:func:`train_on_worker` is free of Ray (testable in a plain process); :func:`worker_loop`
connects it to a Ray Train worker group, :func:`in_process_loop` to Ray Train's local mode.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from agp_data import storage
from agp_data.anomaly_synthesis import SynthesisConfig
from agp_data.integrity import verify_images
from agp_data.splits import build_datasets, split_samples
from agp_data.tiling import Tiling
from agp_data.training_view import TrainingView
from agp_data.validation import SyntheticValidationSet
from agpctl import checkpoint as ckpt
from agpctl import runs
from agpctl.cluster.connect import use_assigned_cpus
from agpctl.config import RunConfig, resolve_recipe
from agpctl.distributed import WorkerContext
from agpctl.errors import UserError
from agpctl.inference.categories import PAYLOAD_KEY, CategoryPrototypes, category_prototypes
from agpctl.inference.scoring import calibrate_thresholds, predict_dataset
from agpctl.models import (backbone_summary, build_model, device_name, loader_generator, move_batch, resolve_precision,
                           seed_everything)
from agpctl.training.preflight import all_samples
from agpctl.training.progress import ProgressSender
from agpctl.training.sharding import ShardedBatchSampler
from agpctl.training.steps import Trainer
from agpctl.training.tracking import Tracking, start_tracking

OBJECTIVE_METRICS = ("i_auroc", "p_auroc", "pro")


def worker_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: ``config`` holds the run's configuration, its
    directory and the progress channel."""
    import ray.train  # deferred: see agpctl.cluster
    import ray.train.torch

    context = ray.train.get_context()
    ctx = WorkerContext(
        rank=context.get_world_rank(), world_size=context.get_world_size(), device=ray.train.torch.get_device()
    )
    run = RunSpec.from_config(config)
    use_assigned_cpus()
    progress = ProgressSender(config.get("progress"), enabled=ctx.is_main)
    payload = latest_payload(ray.train.get_checkpoint(), run.run_uri, warn=progress.warning)

    def report(metrics: dict[str, Any], checkpoint_payload: dict[str, Any] | None, epoch: int | None) -> None:
        if checkpoint_payload is None or not ctx.is_main:
            ray.train.report(metrics, checkpoint_dir_name=ckpt.checkpoint_dir_name(epoch) if checkpoint_payload else None)
            return
        with tempfile.TemporaryDirectory(prefix="agp-ckpt-") as tmp:
            data = ckpt.serialise(checkpoint_payload)
            with open(os.path.join(tmp, ckpt.CHECKPOINT_FILE), "wb") as fh:
                fh.write(data)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=ckpt.checkpoint_dir_name(epoch),
            )

    def wrap(model):
        if ctx.world_size == 1:
            return model
        return ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": True, "broadcast_buffers": False}
        )

    train_on_worker(run, ctx, wrap, report, progress, payload)


def in_process_loop(config: dict[str, Any]) -> None:
    """The train function of Ray Train's local mode (a one-worker run on the embedded Ray,
    in the agpctl process): ``config`` as for :func:`worker_loop`, with the run's CPUs and
    GPUs per worker resolved to numbers. Local mode keeps reported checkpoints in memory
    only, so they go to the run directory here, as a worker group's reports do there."""
    import ray.train  # deferred: see agpctl.cluster
    import torch

    run = RunSpec.from_config(config)
    torch.set_num_threads(max(1, int(run.cfg.cluster.cpus_per_worker)))
    use_gpu = float(run.cfg.cluster.gpus_per_worker) > 0 and torch.cuda.is_available()
    ctx = WorkerContext(device=torch.device("cuda", 0) if use_gpu else torch.device("cpu"))
    progress = ProgressSender(config.get("progress"), enabled=True)
    payload = latest_payload(None, run.run_uri, warn=progress.warning)
    # A run a worker group started and this process continues: Ray Train's list of its
    # checkpoints stops matching the directory, and a later worker group would restore and
    # prune by that stale list; without it, it starts from the run directory.
    storage.delete(storage.join(run.run_uri, runs.RAY_CHECKPOINT_SNAPSHOT))
    keep = run.cfg.train.keep_checkpoints

    def report(metrics: dict[str, Any], checkpoint_payload: dict[str, Any] | None, epoch: int | None) -> None:
        if checkpoint_payload is not None:
            runs.save_checkpoint(run.run_uri, checkpoint_payload, epoch, keep)
        ray.train.report(metrics)

    train_on_worker(run, ctx, lambda model: model, report, progress, payload)


def latest_payload(ray_checkpoint, run_uri: str, warn: Callable[[str], None] = lambda text: None
                   ) -> dict[str, Any] | None:
    """The newest valid checkpoint of this run, whether Ray hands one over (resume) or not:
    after a worker-group restart Ray Train may start the new group without one, and the
    run directory is the source of truth either way. Unreadable (e.g. half-written)
    checkpoints are skipped, each named through ``warn``."""
    candidates = []
    skipped: set[str] = set()
    if ray_checkpoint is not None:
        try:
            with ray_checkpoint.as_directory() as directory:
                with open(os.path.join(directory, ckpt.CHECKPOINT_FILE), "rb") as fh:
                    candidates.append(ckpt.deserialise(fh.read(), ray_checkpoint.path))
        except (OSError, UserError):
            skipped.add(str(ray_checkpoint.path).rstrip("/"))
    try:
        latest = runs.load_latest_checkpoint(run_uri)
        candidates.append(latest.payload)
        skipped.update(latest.skipped)
    except UserError:  # a new run, or no checkpoint loads: nothing to continue from
        pass
    for path in sorted(skipped):
        warn(f"skipped unreadable checkpoint {path}")
    return max(candidates, key=lambda p: p["epoch"]) if candidates else None


@dataclass
class RunSpec:
    cfg: RunConfig
    run_uri: str

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RunSpec":
        cfg = resolve_recipe(RunConfig.from_dict(config["run"]))  # a no-op for configs the driver resolved
        storage.configure_s3(cfg.storage.s3_endpoint)
        return cls(cfg=cfg, run_uri=config["run_uri"])


def train_on_worker(run: RunSpec, ctx: WorkerContext, wrap, report, progress: ProgressSender,
                    resume_payload: dict[str, Any] | None) -> dict[str, Any] | None:
    """The whole run on one worker: train, checkpoint, calibrate, evaluate on the test split.

    ``wrap`` puts the model under DDP, ``report(metrics, checkpoint_payload, epoch)`` hands
    results to Ray Train. Kept free of Ray so that it is testable in a plain process.
    """
    cfg = run.cfg
    seed_everything(cfg.train.seed + ctx.rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(cfg, ctx.device)
    for w in caught:
        progress.warning(str(w.message))
    splits = split_samples(cfg.data, cfg.train.seed)
    if ctx.is_main and cfg.data.root and storage.is_s3(cfg.data.root):
        # The driver decoded only a sample of remote data: all of it, before any training time is spent.
        progress.phase("checking every image")
        verify_images(all_samples(splits), cache_dir=cfg.data.cache_dir)
    train_set, val_set, test_set = build_datasets(
        cfg.data, splits, cfg.model.image_size, model.backbone.mean, model.backbone.std
    )
    base_train_set = train_set
    validation_set = build_validation_set(cfg, val_set, test_set)
    last_validation: dict[str, float] = {}
    validated = False  # on every rank alike (only rank 0 gets metrics back)
    if model.batch_extras:
        synthesis = SynthesisConfig(probability=model.pseudo_anomaly_probability, texture_root=cfg.data.texture_root)

        train_set = TrainingView(train_set, model.batch_extras, synthesis=synthesis, seed=cfg.train.seed)
    # The shuffle order and loader seeds depend on (seed, epoch) only, so a resumed run
    # sees exactly the batches an uninterrupted one would.
    batch_size = min(cfg.train.batch_size, max(1, len(train_set) // ctx.world_size))
    sampler = ShardedBatchSampler(len(train_set), batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                  seed=cfg.train.seed)
    generator = loader_generator(cfg.train.seed)
    loader = DataLoader(
        train_set, batch_sampler=sampler, num_workers=cfg.data.loader_workers, generator=generator,
        persistent_workers=cfg.data.loader_workers > 0, pin_memory=ctx.device.type == "cuda",
    )
    wrapped = wrap(model)
    trainer = Trainer(model, wrapped, cfg, steps_per_epoch=len(loader), ctx=ctx)
    if resume_payload is not None:
        trainer.restore(resume_payload)
        progress.message(f"resumed from epoch {trainer.state.epoch}")
    thresholds: dict[str, Any] = resume_payload.get("thresholds", {}) if resume_payload else {}
    categories = category_state(model, base_train_set, cfg, ctx, resume_payload)
    epochs = cfg.train.epochs
    progress.start(epochs=epochs, steps_per_epoch=len(loader), start_epoch=trainer.state.epoch,
                   backbone=backbone_summary(model), train_images=len(base_train_set),
                   device=device_name(ctx.device), precision=resolve_precision(cfg.train.precision, ctx.device))
    tracking = (start_tracking(cfg, run.run_uri, start_epoch=trainer.state.epoch, resumed=resume_payload is not None,
                               warn=progress.warning) if ctx.is_main else Tracking())
    while trainer.state.epoch < epochs:
        epoch = trainer.state.epoch
        sampler.set_epoch(epoch)
        generator.manual_seed(cfg.train.seed * 1000 + epoch)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        started = time.perf_counter()
        losses = trainer.train_epoch(loader, on_step=lambda i, v: progress.step(epoch, i, v))
        seconds = time.perf_counter() - started
        done = trainer.state.epoch
        save = done == epochs or done % max(1, cfg.train.checkpoint_every) == 0
        validate_now = validation_set is not None and (done == epochs or done % max(1, cfg.train.validate_every) == 0)
        payload = None
        if save or validate_now:  # validation predicts with the fitted inference state
            thresholds = finalise_inference_state(model, base_train_set, val_set, cfg, ctx, progress)
        if validate_now:  # before the checkpoint: its RNG state must include what validation drew
            last_validation, validated = validate(model, validation_set, cfg, ctx), True
        if save:
            payload = trainer.checkpoint_payload({"thresholds": thresholds, "backbone": backbone_summary(model),
                                                  **({PAYLOAD_KEY: categories.to_payload()} if categories else {})})
        metrics = {"epoch": done, "seconds": seconds, **{f"train/{k}": v for k, v in losses.items()}}
        # Between validations the last one travels on: a sweep's scheduler needs its metric in every report.
        metrics.update(last_validation)
        if ctx.is_main:  # before the checkpoint is reported: a rerun of this epoch replaces its line
            record = history_record(done, losses, trainer, len(train_set), seconds,
                                    last_validation if validate_now else None)
            runs.append_history(run.run_uri, record)
            tracking.epoch(record)
        progress.epoch_end(done, losses, seconds, saved=save, validation=last_validation if validate_now else None,
                           lr=current_lr(trainer))
        report(metrics, payload, done)

    if validation_set is not None and not validated:  # resumed after the last epoch: no epoch ran here
        finalise_inference_state(model, base_train_set, val_set, cfg, ctx, progress)
        last_validation = validate(model, validation_set, cfg, ctx)
    progress.phase("evaluating on the test split")
    predictions = predict_dataset(model, test_set, ctx, cfg.train.eval_batch_size, cfg.train.precision,
                                  on_batch=progress.eval_step, loader_workers=cfg.data.loader_workers,
                                  tiling=Tiling.from_config(cfg.data))
    if not ctx.is_main:
        report({"epoch": epochs, "final": 1, **last_validation}, None, None)
        return None
    table = predictions.metrics()
    summary = {
        "method": cfg.method,
        "dataset": cfg.data.dataset,
        "categories": splits.categories,
        "epochs": epochs,
        "workers": ctx.world_size,
        "train_images": len(base_train_set),
        "val_images": len(val_set) if val_set is not None else 0,
        "test_images": len(test_set),
        "backbone": backbone_summary(model),
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    if categories is not None:
        runs.write_categories(run.run_uri, categories.summary())
    runs.write_results(run.run_uri, table, summary, thresholds)
    tracking.finished(table, epochs)
    mean = table.get("mean", {})
    # The last validation metrics travel with the final report, so every report of a run
    # carries the selection metric (Ray Tune requires it in each result).
    report({"epoch": epochs, "final": 1, **last_validation, **{f"test/{k}": v for k, v in mean.items()}}, None, None)
    progress.finished(table)
    return table


def history_record(epoch: int, losses: dict[str, float], trainer: Trainer, images: int, seconds: float,
                   validation: dict[str, float] | None) -> dict[str, Any]:
    """One epoch's line of the run's history.jsonl (the format is in :mod:`agpctl.runs`);
    ``images`` are the epoch's training images of all workers, ``validation`` the
    :func:`validate` metrics when this epoch validated (``train.validate_every``)."""
    record: dict[str, Any] = {
        "epoch": epoch,
        "loss": losses["loss"],
        "losses": dict(losses),
        "lr": current_lr(trainer),
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
    }
    if validation is not None:
        record["val"] = {name: validation.get(f"val/{name}") for name in (*OBJECTIVE_METRICS, "objective")}
    record["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return record


def current_lr(trainer: Trainer) -> float:
    """The lr the epoch's last step used (first optimiser). The scheduler has already moved
    on to the next step's, which a cosine schedule brings to 0 after the last epoch."""
    optimizer, scheduler = trainer.optimizers[0]
    group = optimizer.param_groups[0]
    if not isinstance(scheduler, LambdaLR) or trainer.state.step == 0:
        return float(group["lr"])
    return float(group["initial_lr"] * scheduler.lr_lambdas[0](trainer.state.step - 1))


def build_validation_set(cfg: RunConfig, val_set, test_set):
    """The per-epoch validation dataset of ``cfg.train.validation``, or None (also for
    ``synthetic`` without held-out normal images, e.g. a few-shot run that holds none out)."""
    mode = cfg.train.validation
    if mode == "none":
        return None
    if mode == "synthetic" and (val_set is None or len(val_set) == 0):
        return None
    if mode == "test":
        return test_set
    synthesis = SynthesisConfig(texture_root=getattr(cfg.data, "texture_root", None))
    return SyntheticValidationSet(val_set, seed=cfg.train.seed, synthesis=synthesis)


def validate(model, dataset, cfg: RunConfig, ctx: WorkerContext) -> dict[str, float]:
    """val/i_auroc, val/p_auroc, val/pro and val/objective (their mean, NaN skipped) on
    rank 0; the other ranks return {} (only rank 0's metrics reach Ray)."""
    predictions = predict_dataset(model, dataset, ctx, cfg.train.eval_batch_size, cfg.train.precision,
                                  loader_workers=cfg.data.loader_workers, tiling=Tiling.from_config(cfg.data))
    model.train()
    if predictions is None:
        return {}
    mean = predictions.metrics().get("mean", {})
    values = {name: float(mean.get(name, float("nan"))) for name in OBJECTIVE_METRICS}
    finite = [v for v in values.values() if not math.isnan(v)]
    return {**{f"val/{k}": v for k, v in values.items()}, "val/objective": sum(finite) / len(finite) if finite else 0.0}


def finalise_inference_state(model, train_set, val_set, cfg: RunConfig, ctx: WorkerContext,
                             progress: ProgressSender) -> dict[str, Any]:
    """Inference state (prompt pools, score statistics) from normal training images, then
    thresholds from held-out normal images. Identical on every worker."""
    model.eval()
    loader = DataLoader(train_set, batch_size=cfg.train.eval_batch_size, shuffle=False,
                        num_workers=cfg.data.loader_workers)
    model.fit_inference_state(_to_device(loader, ctx.device))
    val = None
    if val_set is not None:
        val = predict_dataset(model, val_set, WorkerContext(device=ctx.device), cfg.train.eval_batch_size,
                              cfg.train.precision, loader_workers=cfg.data.loader_workers,
                              tiling=Tiling.from_config(cfg.data))
    model.train()
    thresholds = calibrate_thresholds(val, cfg.train.threshold_quantile)
    for line in thresholds["warnings"]:  # the driver prints each distinct line once
        progress.warning(line)
    return thresholds


def category_state(model, train_set, cfg: RunConfig, ctx: WorkerContext,
                   resume_payload: dict[str, Any] | None) -> CategoryPrototypes | None:
    """The category prototypes predict matches images against (agpctl.inference.categories),
    on rank 0 only, which alone writes checkpoints: those of the checkpoint resumed from, else
    computed once on the normal training images. The backbone is frozen, so they never change
    as training goes on."""
    if not ctx.is_main:
        return None
    stored = CategoryPrototypes.from_payload((resume_payload or {}).get(PAYLOAD_KEY))
    if stored is not None:
        return stored
    return category_prototypes(model, train_set, ctx.device, cfg.train.eval_batch_size, cfg.train.precision,
                               loader_workers=cfg.data.loader_workers)


def _to_device(loader, device):
    for batch in loader:
        yield move_batch(batch, device)
