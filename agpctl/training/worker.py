"""Training as a Ray Train job: the per-worker loop and the driver that launches it."""

from __future__ import annotations

import os
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch
from torch.utils.data import DataLoader

from agp_data import storage
from agpctl import checkpoint as ckpt
from agpctl.config import RunConfig
from agpctl.data_setup import build_datasets, split_samples
from agpctl.engine import (
    Trainer,
    WorkerContext,
    build_model,
    calibrate_thresholds,
    loader_generator,
    predict_dataset,
    seed_everything,
)
from agpctl.errors import UserError, user_error_from_remote
from agpctl.progress import ProgressSender
from agpctl.sharding import ShardedBatchSampler


# ---------------------------------------------------------------------------------------
# inside each Ray Train worker
# ---------------------------------------------------------------------------------------
def worker_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from agpctl.cluster import use_assigned_cpus

    context = ray.train.get_context()
    ctx = WorkerContext(
        rank=context.get_world_rank(), world_size=context.get_world_size(), device=ray.train.torch.get_device()
    )
    run = RunSpec.from_config(config)
    use_assigned_cpus()
    progress = ProgressSender(config.get("progress"), enabled=ctx.is_main)
    payload = _latest_payload(ray.train.get_checkpoint(), run.run_uri)

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


def _latest_payload(ray_checkpoint, run_uri: str) -> dict[str, Any] | None:
    """The newest valid checkpoint of this run, whether Ray hands one over (resume) or not:
    after a worker-group restart Ray Train may start the new group without one, and the
    run directory is the source of truth either way. Half-written checkpoints are skipped."""
    candidates = []
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as directory:
            with open(os.path.join(directory, ckpt.CHECKPOINT_FILE), "rb") as fh:
                candidates.append(ckpt.deserialise(fh.read(), ray_checkpoint.path))
    try:
        candidates.append(ckpt.load_latest_checkpoint(run_uri).payload)
    except UserError:  # a new run: nothing saved yet
        pass
    return max(candidates, key=lambda p: p["epoch"]) if candidates else None


@dataclass
class RunSpec:
    cfg: RunConfig
    run_uri: str

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RunSpec":
        cfg = RunConfig.from_dict(config["run"])
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
    train_set, val_set, test_set = build_datasets(
        cfg.data, splits, cfg.model.image_size, model.backbone.mean, model.backbone.std
    )
    base_train_set = train_set
    validation_set = build_validation_set(cfg, val_set, test_set)
    last_validation: dict[str, float] = {}
    validated = False  # on every rank alike (only rank 0 gets metrics back)
    if model.batch_extras:
        from agp_data.anomaly_synthesis import SynthesisConfig
        from agp_data.training_view import TrainingView

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
    epochs = cfg.train.epochs
    progress.start(epochs=epochs, steps_per_epoch=len(loader), start_epoch=trainer.state.epoch,
                   backbone=_backbone_summary(model), train_images=len(base_train_set))
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
        payload = None
        if save or validation_set is not None:  # validation predicts with the fitted inference state
            thresholds = finalise_inference_state(model, base_train_set, val_set, cfg, ctx, progress)
        if save:
            payload = trainer.checkpoint_payload({"thresholds": thresholds, "backbone": _backbone_summary(model)})
        metrics = {"epoch": done, "seconds": seconds, **{f"train/{k}": v for k, v in losses.items()}}
        if validation_set is not None:
            last_validation, validated = validate(model, validation_set, cfg, ctx), True
            metrics.update(last_validation)
        progress.epoch_end(done, losses, seconds, saved=save)
        report(metrics, payload, done)

    if validation_set is not None and not validated:  # resumed after the last epoch: no epoch ran here
        finalise_inference_state(model, base_train_set, val_set, cfg, ctx, progress)
        last_validation = validate(model, validation_set, cfg, ctx)
    progress.phase("evaluating on the test split")
    predictions = predict_dataset(model, test_set, ctx, cfg.train.eval_batch_size, cfg.train.precision,
                                  on_batch=progress.eval_step, loader_workers=cfg.data.loader_workers)
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
        "backbone": _backbone_summary(model),
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    ckpt.write_json(storage.join(run.run_uri, ckpt.THRESHOLDS_FILE), thresholds)
    ckpt.write_json(storage.join(run.run_uri, ckpt.SUMMARY_FILE), summary)
    ckpt.write_json(storage.join(run.run_uri, ckpt.METRICS_FILE), {"metrics": table, "summary": summary})
    mean = table.get("mean", {})
    # The last validation metrics travel with the final report, so every report of a run
    # carries the selection metric (Ray Tune requires it in each result).
    report({"epoch": epochs, "final": 1, **last_validation, **{f"test/{k}": v for k, v in mean.items()}}, None, None)
    progress.finished(table)
    return table


VALIDATION_MODES = ("none", "synthetic", "test")
OBJECTIVE_METRICS = ("i_auroc", "p_auroc", "pro")


def build_validation_set(cfg: RunConfig, val_set, test_set):
    """The per-epoch validation dataset of ``cfg.train.validation``, or None."""
    mode = cfg.train.validation
    if mode == "none":
        return None
    if mode == "test":
        return test_set
    from agp_data.anomaly_synthesis import SynthesisConfig
    from agp_data.validation import SyntheticValidationSet

    synthesis = SynthesisConfig(texture_root=getattr(cfg.data, "texture_root", None))
    return SyntheticValidationSet(val_set, seed=cfg.train.seed, synthesis=synthesis)


def validate(model, dataset, cfg: RunConfig, ctx: WorkerContext) -> dict[str, float]:
    """val/i_auroc, val/p_auroc, val/pro and val/objective (their mean, NaN skipped) on
    rank 0; the other ranks return {} (only rank 0's metrics reach Ray)."""
    import math

    predictions = predict_dataset(model, dataset, ctx, cfg.train.eval_batch_size, cfg.train.precision,
                                  loader_workers=cfg.data.loader_workers)
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
                              cfg.train.precision, loader_workers=cfg.data.loader_workers)
    model.train()
    return calibrate_thresholds(val, cfg.train.threshold_quantile)


def _to_device(loader, device):
    from agpctl.engine import move_batch

    for batch in loader:
        yield move_batch(batch, device)


def _backbone_summary(model) -> dict[str, Any]:
    backbone = model.backbone
    return {
        "name": backbone.name,
        "pretrained": bool(backbone.pretrained),
        "weight_source": backbone.weight_source,
    }


# ---------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------
def default_run_name(cfg: RunConfig) -> str:
    return f"{cfg.method}-{cfg.data.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def storage_location(out: str) -> tuple[Any, str]:
    """(pyarrow filesystem or None, storage_path) for Ray Train's RunConfig."""
    if storage.is_s3(out):
        fs, path = storage.pyarrow_filesystem(out)
        return fs, path
    return None, os.path.abspath(out)


def run_uri_for(out: str, name: str) -> str:
    return storage.join(out if storage.is_s3(out) else os.path.abspath(out), name)


def resolve_pretrained(cfg: RunConfig) -> list[str]:
    """Builds the backbone once here so that configuration mistakes fail before any
    cluster work starts, and pins ``pretrained: auto`` to what actually happened, so that
    evaluation later rebuilds exactly the same backbone. Returns warnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(cfg)
    backbone_cfg = cfg.model.backbone
    if backbone_cfg.pretrained == "auto":
        backbone_cfg.pretrained = "yes" if (model.backbone.pretrained and not backbone_cfg.weights) else "no"
    return [str(w.message) for w in caught]


def launch_training(cfg: RunConfig, *, resume: str | None = None, console=None, quiet: bool = False) -> dict[str, Any]:
    """Runs one Ray Train job (or one per category with ``per_category``) and returns the
    metrics table of the finished run(s)."""
    from agpctl.progress import ProgressView

    storage.configure_s3(cfg.storage.s3_endpoint)
    _validate(cfg)
    _absolute_local_paths(cfg)
    if resume:
        run_uri = resume.rstrip("/")
        cfg = _resume_config(run_uri, cfg)
    else:
        cfg.storage.name = cfg.storage.name or default_run_name(cfg)
        run_uri = run_uri_for(cfg.storage.out, cfg.storage.name)
        if storage.exists(storage.join(run_uri, ckpt.CONFIG_FILE)):
            raise UserError(f"run {run_uri} already exists; pass --resume {run_uri} to continue it or choose another --name")
    split_samples(cfg.data, cfg.train.seed)  # fail fast on data mistakes, before Ray starts
    notes = resolve_pretrained(cfg) if not resume else []
    view = ProgressView(console, quiet=quiet)
    for note in notes:
        view.warning(note)
    if not resume:
        storage.write_text(storage.join(run_uri, ckpt.CONFIG_FILE), cfg.to_yaml())
    view.run_started(cfg, run_uri)

    categories = [None]
    if cfg.data.per_category:
        categories = split_samples(cfg.data, cfg.train.seed).categories
    from agpctl.cluster import ray_session

    tables: dict[str, Any] = {}
    with ray_session(cfg.cluster.address):
        for category in categories:
            sub_cfg, sub_uri = cfg, run_uri
            if category is not None:
                sub_cfg = cfg.with_overrides({"data.categories": [category], "data.per_category": False,
                                              "storage.name": f"{cfg.storage.name}/{category}"})
                sub_uri = storage.join(run_uri, category)
                if not storage.exists(storage.join(sub_uri, ckpt.CONFIG_FILE)):
                    storage.write_text(storage.join(sub_uri, ckpt.CONFIG_FILE), sub_cfg.to_yaml())
                elif resume and storage.exists(storage.join(sub_uri, ckpt.METRICS_FILE)):
                    tables.update(_category_rows(ckpt.read_json(storage.join(sub_uri, ckpt.METRICS_FILE))["metrics"]))
                    continue
                view.message(f"category {category}")
            table = _fit_one(sub_cfg, sub_uri, view, resumed=bool(resume) and _has_checkpoint(sub_uri))
            tables.update(_category_rows(table) if category is not None else table)
    if cfg.data.per_category:
        tables = _with_mean(tables)
        ckpt.write_json(storage.join(run_uri, ckpt.METRICS_FILE), {"metrics": tables, "summary": {"per_category": True}})
    view.run_finished(tables, run_uri)
    return {"run": run_uri, "metrics": tables}


def _has_checkpoint(run_uri: str) -> bool:
    try:
        return bool(ckpt.list_checkpoints(run_uri))
    except UserError:
        return False


def _fit_one(cfg: RunConfig, run_uri: str, view, resumed: bool) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from agpctl.progress import make_channel

    fs, storage_path = storage_location(cfg.storage.out)
    if cfg.cluster.cpus_per_worker is None:  # auto, resolved against the live cluster; the saved config stays auto
        cpus = resolve_cpus_per_worker(cfg, ray.cluster_resources().get("CPU", 1.0))
        cfg = cfg.with_overrides({"cluster.cpus_per_worker": cpus})
    channel = make_channel()
    if resumed:
        # The worker itself continues from the run's newest valid checkpoint; Ray Train V2
        # refuses resume_from_checkpoint, so it is not handed over here.
        latest = ckpt.load_latest_checkpoint(run_uri)
        view.message(f"resuming from {latest.uri} (epoch {latest.epoch})")
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"run": cfg.to_dict(), "run_uri": run_uri, "progress": channel},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.workers,
            use_gpu=cfg.cluster.gpus_per_worker > 0,
            resources_per_worker=_worker_resources(cfg),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.storage.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(1, cfg.train.keep_checkpoints)),
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            worker_runtime_env=_worker_env(cfg),
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # surfaced on the driver thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="agp-train-fit", daemon=True)
    thread.start()
    view.follow(channel, thread)
    thread.join()
    if "error" in outcome:
        raise _training_error(outcome["error"])
    result = outcome["result"]
    if getattr(result, "error", None):
        raise _training_error(result.error)
    return ckpt.read_json(storage.join(run_uri, ckpt.METRICS_FILE))["metrics"]


def resolve_cpus_per_worker(cfg: RunConfig, cluster_cpus: float, concurrent_runs: int = 1) -> float:
    """``cluster.cpus_per_worker``, or for auto (None) the embedded instance's CPUs shared by
    all workers of ``concurrent_runs`` runs (a laptop run uses every core), 1 on a remote cluster."""
    if cfg.cluster.cpus_per_worker is not None:
        return cfg.cluster.cpus_per_worker
    if cfg.cluster.address:
        return 1.0
    from agpctl.cluster import local_cpu_share

    return local_cpu_share(cluster_cpus, cfg.cluster.workers * concurrent_runs)


def _worker_resources(cfg: RunConfig) -> dict[str, float]:
    assert cfg.cluster.cpus_per_worker is not None, "resolve_cpus_per_worker() first"
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.gpus_per_worker > 0:
        resources["GPU"] = cfg.cluster.gpus_per_worker
    return resources


def _worker_env(cfg: RunConfig) -> dict[str, Any]:
    # Endpoints and cache locations travel; credentials stay in the standard chain.
    names = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AGP_CACHE_DIR", "AGP_CACHE_MAX_GB")
    env = {k: os.environ[k] for k in names if k in os.environ}
    return {"env_vars": env} if env else {}


def _training_error(exc: BaseException) -> BaseException:
    return user_error_from_remote(exc) or exc


def _validate(cfg: RunConfig) -> None:
    if cfg.train.epochs < 1:
        raise UserError("--epochs must be at least 1")
    if cfg.train.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if cfg.train.validation not in VALIDATION_MODES:
        raise UserError(f"train.validation {cfg.train.validation!r}: use one of {', '.join(VALIDATION_MODES)}")
    if cfg.train.validation == "synthetic" and cfg.data.val_fraction <= 0 and not cfg.data.shots:
        raise UserError("train.validation synthetic needs held-out normal images; set --val-fraction above 0")
    if cfg.train.precision not in ("fp32", "bf16"):
        raise UserError(f"--precision {cfg.train.precision!r}: use fp32 or bf16")
    if cfg.cluster.workers < 1:
        raise UserError("--workers must be at least 1")
    if cfg.cluster.gpus_per_worker > 0 and cfg.cluster.address is None and not torch.cuda.is_available():
        raise UserError("--gpus-per-worker > 0 but this machine has no CUDA GPU; drop the flag or use --address")


def _absolute_local_paths(cfg: RunConfig) -> None:
    """Ray workers run in their own directories: relative paths must not reach them."""
    def absolute(path: str | None) -> str | None:
        return path if not path or storage.is_s3(path) else os.path.abspath(os.path.expanduser(path))

    for section, names in ((cfg.data, ("root", "normal_dir", "abnormal_dir", "mask_dir", "cache_dir", "texture_root")),
                           (cfg.model.backbone, ("weights",))):
        for name in names:
            setattr(section, name, absolute(getattr(section, name)))


def _resume_config(run_uri: str, cli_cfg: RunConfig) -> RunConfig:
    cfg = ckpt.load_run_config(run_uri)
    # Where to run may change on resume; what to train may not. The run may have moved:
    # its location is where it is now.
    cfg.cluster = cli_cfg.cluster
    cfg.storage.s3_endpoint = cli_cfg.storage.s3_endpoint or cfg.storage.s3_endpoint
    parent, _, name = run_uri.rstrip("/").rpartition("/")
    cfg.storage.out, cfg.storage.name = parent, name
    return cfg


def _category_rows(table: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if k != "mean"}


def _with_mean(rows: dict[str, Any]) -> dict[str, Any]:
    import math

    names = sorted({k for row in rows.values() for k in row})
    mean = {}
    for name in names:
        values = [row[name] for row in rows.values() if name in row and row[name] is not None and not math.isnan(row[name])]
        mean[name] = sum(values) / len(values) if values else float("nan")
    return {**dict(sorted(rows.items())), "mean": mean}
