"""The one place a Ray Train ``TorchTrainer`` is built, for `agpctl train` and for sweep trials
with several workers (a one-worker trial trains inside its Tune trial: tuning.trial)."""

from __future__ import annotations

import os
from typing import Any, Callable

from agp_data import storage
from agpctl.cluster.connect import local_cpu_share
from agpctl.cluster.runtime_env import worker_runtime_env
from agpctl.config import RunConfig


def storage_location(out: str) -> tuple[Any, str]:
    """(pyarrow filesystem or None, storage_path) for Ray Train's RunConfig."""
    if storage.is_s3(out):
        fs, path = storage.pyarrow_filesystem(out)
        return fs, path
    return None, os.path.abspath(out)


def resolve_cpus_per_worker(cfg: RunConfig, cluster_cpus: float, concurrent_runs: int = 1) -> float:
    """``cluster.cpus_per_worker``, or for auto (None) the embedded instance's CPUs shared by
    all workers of ``concurrent_runs`` runs (a laptop run uses every core), 1 on a remote cluster."""
    if cfg.cluster.cpus_per_worker is not None:
        return cfg.cluster.cpus_per_worker
    if cfg.cluster.address:
        return 1.0
    return local_cpu_share(cluster_cpus, cfg.cluster.workers * concurrent_runs)


def worker_resources(cfg: RunConfig) -> dict[str, float]:
    if cfg.cluster.cpus_per_worker is None:
        raise ValueError("cluster.cpus_per_worker is auto: resolve it with resolve_cpus_per_worker() first")
    if cfg.cluster.gpus_per_worker == "auto":
        raise ValueError("cluster.gpus_per_worker is auto: resolve it with agpctl.config.requested_gpus() first")
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.gpus_per_worker > 0:
        resources["GPU"] = cfg.cluster.gpus_per_worker
    return resources


def make_torch_trainer(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], cfg: RunConfig, *,
                       name: str, storage_out: str, callbacks: list | None = None, in_process: bool = False):
    """A TorchTrainer running ``loop(loop_config)`` on ``cfg.cluster.workers`` workers, persisting
    checkpoints to ``<storage_out>/<name>`` (local or s3://). ``in_process``: Ray Train's local
    mode (``num_workers=0``), ``loop`` runs in this process and needs no Ray instance.

    No ``resume_from_checkpoint``: Ray Train V2 refuses it, and the loop finds its run's newest
    valid checkpoint in the run directory itself."""
    import ray.train  # deferred: see agpctl.cluster
    from ray.train.torch import TorchTrainer

    fs, storage_path = storage_location(storage_out)
    if in_process:
        scaling = ray.train.ScalingConfig(num_workers=0)
    else:
        scaling = ray.train.ScalingConfig(num_workers=cfg.cluster.workers, use_gpu=cfg.cluster.gpus_per_worker > 0,
                                          resources_per_worker=worker_resources(cfg))
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(1, cfg.train.keep_checkpoints)),
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            worker_runtime_env=worker_runtime_env(),
            **({"callbacks": callbacks} if callbacks else {}),
        ),
    )
