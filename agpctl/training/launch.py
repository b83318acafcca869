"""The driver of `agpctl train`: checks, writes the run's configuration, starts Ray, runs one
Ray Train job (or one per category with ``--per-category``) and shows its progress.

A one-worker run on the embedded Ray is a Ray Train job in local mode: the training loop runs
in this process, and no Ray instance, controller or worker actor is started, so the first
step comes 4.0 s after the command instead of 15.7 s on an idle 2-core machine
(benchmarks/startup.py). Multi-worker runs, remote clusters, ``--dashboard``,
``--max-failures`` and ``--worker-actor`` use a worker group.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from typing import Any

import torch

from agpctl import runs
from agpctl.cluster.connect import Terminated, address_kind, ray_session, sigterm_as_interrupt
from agpctl.cluster.events import make_channel, make_local_channel
from agpctl.cluster.trainer import make_torch_trainer, resolve_cpus_per_worker, worker_resources
from agpctl.config import RunConfig, requested_gpus
from agpctl.errors import Interrupted, UserError, first_line, remote_error
from agpctl.paths import absolute
from agpctl.training.preflight import check_config, check_data_and_model
from agpctl.training.progress import ProgressView
from agpctl.training.worker import in_process_loop, worker_loop


def launch_training(cfg: RunConfig, *, resume: str | None = None, console=None, quiet: bool = False) -> dict[str, Any]:
    """Runs one Ray Train job (or one per category with ``per_category``) and returns the
    metrics table of the finished run(s)."""
    check_config(cfg)
    if resume:
        run_uri = absolute(resume.rstrip("/"))
        cfg = runs.resume_config(run_uri, cfg)
    else:
        cfg.storage.name = cfg.storage.name or runs.default_run_name(cfg)
        run_uri = runs.run_uri_for(cfg.storage.out, cfg.storage.name)
        if runs.has_run_config(run_uri):
            raise UserError(f"run {run_uri} already exists; pass --resume {run_uri} to continue it or choose another --name")
    if address_kind(cfg.cluster.address) == "local":
        check_fits_this_machine(cfg)
    view = ProgressView(console, quiet=quiet)
    with view.task("checking images") as on_progress:  # fail fast, before Ray starts
        splits, notes = check_data_and_model(cfg, pin_pretrained=not resume, on_progress=on_progress)
    for note in notes:
        view.warning(note)
    if not splits.val:
        view.warning(f"no held-out normal images ({len(splits.train)} training images, --val-fraction "
                     f"{cfg.data.val_fraction}): no thresholds will be calibrated, so predict will need --threshold")
    if not resume:
        runs.write_run_config(run_uri, cfg)
    view.run_started(cfg, run_uri, in_process=trains_in_process(cfg))

    categories: list[str | None] = list(splits.categories) if cfg.data.per_category else [None]
    tables: dict[str, Any] = {}
    try:
        with training_session(cfg):
            for category in categories:
                sub_cfg, sub_uri = cfg, run_uri
                if category is not None:
                    sub_cfg, sub_uri = runs.category_sub_run(cfg, run_uri, category)
                    if not runs.has_run_config(sub_uri):
                        runs.write_run_config(sub_uri, sub_cfg)
                    elif resume and runs.has_metrics(sub_uri):
                        tables.update(runs.category_rows(runs.read_metrics(sub_uri)))
                        continue
                    view.message(f"category {category}")
                table = fit_one(sub_cfg, sub_uri, view, resumed=bool(resume) and runs.has_checkpoint(sub_uri))
                tables.update(runs.category_rows(table) if category is not None else table)
    except KeyboardInterrupt as exc:
        raise interrupted(run_uri, fresh=not resume, terminated=isinstance(exc, Terminated)) from None
    except BaseException:
        if not resume:
            runs.discard_if_unstarted(run_uri)  # a rerun with the same --name must not be refused
        raise
    if cfg.data.per_category:
        tables = runs.with_mean(tables)
        runs.write_per_category_metrics(run_uri, tables)
    view.run_finished(tables, run_uri)
    return {"run": run_uri, "metrics": tables}


def trains_in_process(cfg: RunConfig) -> bool:
    """One worker on the embedded Ray, and nothing asked of a worker group: Ray Train's local mode."""
    cluster = cfg.cluster
    return (address_kind(cluster.address) == "local" and cluster.workers == 1 and not cluster.worker_actor
            and not cluster.dashboard and cluster.max_failures == 0)


def training_session(cfg: RunConfig):
    """What the run's jobs need around them: Ray for a worker group; for a run in this process
    only SIGTERM handled as Ctrl-C is (as ray_session does)."""
    if trains_in_process(cfg):
        return sigterm_as_interrupt()
    return ray_session(cfg.cluster.address, dashboard=cfg.cluster.dashboard)


def interrupted(run_uri: str, *, fresh: bool, terminated: bool) -> Interrupted:
    """What is left of a stopped run, and how to go on."""
    how = "terminated (SIGTERM)" if terminated else "interrupted"
    code = 143 if terminated else 130
    if fresh and runs.discard_if_unstarted(run_uri):
        return Interrupted(f"training {how} before its first checkpoint; nothing was kept, run the same command "
                           "again to start over", code)
    return Interrupted(f"training {how}; {run_uri} keeps its checkpoints; continue with: "
                       f"agpctl train --resume {run_uri}", code)


def check_fits_this_machine(cfg: RunConfig) -> None:
    """On the embedded Ray, workers that cannot all be placed would wait forever: say so now."""
    cpus = os.cpu_count() or 1
    per_worker = resolve_cpus_per_worker(cfg, cpus)
    workers = cfg.cluster.workers
    if workers * per_worker > cpus:
        raise UserError(f"{workers} worker(s) × {per_worker:g} CPU(s) need {workers * per_worker:g} CPUs, this "
                        f"machine has {cpus}; lower --workers or --cpus-per-worker, or use a cluster (--address)")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    per_worker_gpus = requested_gpus(cfg.cluster, gpus)
    if workers * per_worker_gpus > gpus:
        raise UserError(f"{workers} worker(s) × {per_worker_gpus:g} GPU(s) need more GPUs than this "
                        f"machine's {gpus}; lower --workers or --gpus-per-worker, or use a cluster (--address)")


CLUSTER_GROWTH_WAIT_S = 60  # how long a remote (possibly autoscaling) cluster may take to grow


def check_fits_cluster(cfg: RunConfig, resources, view: ProgressView | None = None,
                       wait_s: float = 0.0) -> None:
    """Workers that need more than the whole cluster has are never placed. ``resources()``
    gives the cluster's totals; a cluster that may still grow gets ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        missing = _shortfall(cfg, resources())
        if missing is None:
            return
        if time.monotonic() >= deadline:
            raise UserError(missing)
        if view is not None and not announced:
            view.message(f"{missing.split(';')[0]}; waiting up to {wait_s:.0f} s for the cluster to grow")
            announced = True
        time.sleep(2)


def _shortfall(cfg: RunConfig, totals: dict[str, float]) -> str | None:
    if cfg.cluster.gpus_per_worker == "auto":
        cfg = cfg.with_overrides({"cluster.gpus_per_worker": requested_gpus(cfg.cluster, totals.get("GPU", 0.0))})
    for name, amount in worker_resources(cfg).items():
        total = float(totals.get(name, 0.0))
        if cfg.cluster.workers * amount > total:
            flag = {"CPU": "--cpus-per-worker", "GPU": "--gpus-per-worker"}.get(name, name)
            return (f"{cfg.cluster.workers} worker(s) × {amount:g} {name} need {cfg.cluster.workers * amount:g}, "
                    f"the Ray cluster has {total:g}; lower --workers or {flag}")
    return None


def fit_one(cfg: RunConfig, run_uri: str, view: ProgressView, resumed: bool) -> dict[str, Any]:
    """One Ray Train job for the (sub-)run at ``run_uri``; returns its metrics table."""
    if resumed:
        # The loop itself continues from the run's newest valid checkpoint.
        latest = runs.load_latest_checkpoint(run_uri)
        for skipped in latest.skipped:
            view.warning(f"skipped unreadable checkpoint {skipped}")
        view.message(f"resuming from {latest.uri} (epoch {latest.epoch})")
    if trains_in_process(cfg):
        fit_in_process(cfg, run_uri, view)
    else:
        fit_on_worker_group(cfg, run_uri, view)
    return runs.read_metrics(run_uri)


def fit_in_process(cfg: RunConfig, run_uri: str, view: ProgressView) -> None:
    """The job in Ray Train's local mode: training on this (main) thread, so that Ctrl-C and
    SIGTERM stop it where it is; the progress is rendered by a thread of its own."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cfg = cfg.with_overrides({  # auto resolved against this machine; the saved config stays auto
        "cluster.cpus_per_worker": resolve_cpus_per_worker(cfg, os.cpu_count() or 1),
        "cluster.gpus_per_worker": requested_gpus(cfg.cluster, gpus),
    })
    quiet_ray_train_logs()
    channel = make_local_channel()
    trainer = make_torch_trainer(in_process_loop, {"run": cfg.to_dict(), "run_uri": run_uri, "progress": channel},
                                 cfg, name=cfg.storage.name, storage_out=cfg.storage.out, in_process=True)
    done = threading.Event()
    failed: list[BaseException] = []

    def render() -> None:
        try:
            view.follow(channel, lambda: not done.is_set(), redirect=False)
        except BaseException as exc:  # the display broke; training goes on, the error is told below
            failed.append(exc)

    renderer = threading.Thread(target=render, name="agp-train-progress", daemon=True)
    renderer.start()
    try:
        trainer.fit()  # local mode raises the loop's own exceptions, the user's mistakes as UserError
    finally:
        done.set()
        renderer.join()
        # A per-category run trains its categories one after another in this process: free
        # each one's model, caches and loader processes before the next starts.
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if failed:
        view.warning(f"the progress display stopped: {first_line(failed[0])}; the run itself finished")


def quiet_ray_train_logs() -> None:
    """In local mode Ray Train logs, at INFO in the user's terminal, that it runs locally and
    every metric reported; the progress view already shows what matters."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)


def fit_on_worker_group(cfg: RunConfig, run_uri: str, view: ProgressView) -> None:
    """The job on Ray Train workers (the embedded Ray or a cluster, started by the caller)."""
    import ray  # deferred: see agpctl.cluster (ray_session has started it by now)

    if cfg.cluster.cpus_per_worker is None:  # auto, resolved against the live cluster; the saved config stays auto
        cpus = resolve_cpus_per_worker(cfg, ray.cluster_resources().get("CPU", 1.0))
        cfg = cfg.with_overrides({"cluster.cpus_per_worker": cpus})
    if cfg.cluster.gpus_per_worker == "auto":  # likewise
        gpus = requested_gpus(cfg.cluster, ray.cluster_resources().get("GPU", 0.0))
        cfg = cfg.with_overrides({"cluster.gpus_per_worker": gpus})
    remote = address_kind(cfg.cluster.address) != "local"
    check_fits_cluster(cfg, ray.cluster_resources, view, wait_s=CLUSTER_GROWTH_WAIT_S if remote else 0.0)
    channel = make_channel()
    trainer = make_torch_trainer(worker_loop, {"run": cfg.to_dict(), "run_uri": run_uri, "progress": channel}, cfg,
                                 name=cfg.storage.name, storage_out=cfg.storage.out)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # surfaced on the driver thread below
            outcome["error"] = exc

    def waiting() -> str:
        return (f"no worker has started yet: Ray is waiting to place {cfg.cluster.workers} worker(s) with "
                f"{worker_resources(cfg)} each; free now: {_rounded(ray.available_resources())}. "
                "Lower --workers / --cpus-per-worker / --gpus-per-worker if this does not change")

    thread = threading.Thread(target=fit, name="agp-train-fit", daemon=True)
    thread.start()
    view.follow(channel, thread.is_alive, waiting=waiting)
    thread.join()
    if "error" in outcome:
        raise remote_error(outcome["error"])
    result = outcome["result"]
    if getattr(result, "error", None):
        raise remote_error(result.error)


def _rounded(resources: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in resources.items() if k in ("CPU", "GPU", "memory")}
