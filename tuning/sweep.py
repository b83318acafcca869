"""``agpctl tune``: a Ray Tune sweep whose every trial is a full training run — the driver.

Each Tune trial is a *function trainable* (tuning.trial) that builds the trial's RunConfig
(the sweep's fixed config + the trial's planned values) and runs it: a one-worker trial runs
the training loop itself, a multi-worker trial the same ``TorchTrainer(worker_loop)`` that
``agpctl train`` runs; tuning.trial says why and what each reserves. The run evaluates the
objective after every epoch (``train.validation``: held-out normals + pseudo anomalies by
default), so ASHA can stop weak trials early.

The sweep directory, the planned trials and why ``--resume`` reads only agp's JSON (never
Tune's pickles): tuning.state. The results files: tuning.results. The live table and the
Tune callback: tuning.view.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from datetime import datetime
from typing import Any

from agp_data import storage
from agp_models.backbones import BackboneError, check_layer_sets
from agpctl.cluster.connect import (address_kind, announce_dashboard, embedded_ray_options, ray_session,
                                    use_token_if_available)
from agpctl.cluster.trainer import resolve_cpus_per_worker, storage_location
from agpctl.config import RunConfig, requested_gpus
from agpctl.errors import UserError
from agpctl.training.preflight import check_config, check_data_and_model
from tuning.results import SweepOutcome, collect_trials, summarise
from tuning.space import SearchSpace
from tuning.state import (
    METRIC,
    RUNS_DIR,
    SWEEP_FILE,
    TRIAL_KEY,
    TUNE_DIR,
    SweepSettings,
    TrialRecorder,
    finished_runs,
    load_sweep_state,
    new_record,
    plan_trials,
    read_early_stopped,
    read_trial_records,
    sweep_state_json,
    trials_to_run,
    validate_settings,
)
from tuning.trial import run_trial, trains_in_trial, trial_config, trial_resources
from tuning.view import SweepView, sweep_callback

# SweepSettings and SweepOutcome are the callers' (agpctl.cli.tune) view of a sweep, and the
# trial function and config (tuning.trial) were defined here: they stay importable from here.
__all__ = ["SweepOutcome", "SweepSettings", "run_sweep", "run_trial", "trial_config"]

VALIDATION_FOR_OBJECTIVE = {"synthetic-val": "synthetic", "test": "test"}
TEST_OBJECTIVE_WARNING = ("--objective test selects hyper-parameters on the test split: the reported "
                          "test metrics of the best trial are optimistic, not an unbiased estimate")


# ---------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------
def default_sweep_name(cfg: RunConfig) -> str:
    return f"tune-{cfg.method}-{cfg.data.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def space_layer_sets(space: SearchSpace) -> list[list[int]]:
    """Every value the space can give ``model.layers`` (choices and groups)."""
    sets: list[list[int]] = []
    for dim in space.dimensions:
        if dim.kind == "choice" and dim.key == "model.layers":
            sets += [list(v) for v in dim.values]
        elif dim.kind == "group":
            sets += [list(v["model.layers"]) for v in dim.values if "model.layers" in v]
    return sets


def check_space_fits_backbone(space: SearchSpace, cfg: RunConfig) -> None:
    """Layer sets of the space that the run's backbone does not have fail here, in one line,
    instead of as errored trials (the default AGPNet space varies ViT blocks, for example)."""
    sets = space_layer_sets(space)
    if not sets or any(p.startswith("model.backbone") for d in space.dimensions for p in d.paths()):
        return
    try:
        check_layer_sets(cfg.model.backbone, sets)
    except BackboneError as exc:
        raise UserError(f"search space {space.source}: {exc}; pass --space with layer sets for this backbone "
                        f"(copy tuning/spaces/{cfg.method}.yaml and edit model.layers)") from None


def default_max_concurrent(cfg: RunConfig, resources: dict[str, float]) -> int:
    """As many trials as the cluster holds at once, but 1 on small machines (≤ 4 CPUs),
    where concurrent trials only slow each other down."""
    cpus = float(resources.get("CPU", 1.0))
    if cpus <= 4:
        return 1
    fits = cpus // max(1e-9, cfg.cluster.workers * (cfg.cluster.cpus_per_worker or 1.0))
    gpus = requested_gpus(cfg.cluster, float(resources.get("GPU", 0.0)))
    if gpus > 0:
        fits = min(fits, float(resources.get("GPU", 0.0)) // (cfg.cluster.workers * gpus))
    return max(1, int(fits))


def run_sweep(cfg: RunConfig | None, space: SearchSpace | None, settings: SweepSettings | None, *,
              resume: str | None = None, console=None, quiet: bool = False) -> SweepOutcome:
    """Runs (or, with ``resume``, continues) a sweep and writes its results."""
    if cfg is not None and address_kind(cfg.cluster.address) != "local":  # tune_cli always passes cfg, resume too
        use_token_if_available()  # before anything imports Ray: Ray reads its auth mode once
    started = time.perf_counter()
    warnings_seen: list[str] = []
    if resume:
        # Only agp's JSON is read here; Tune's files in the folder are never loaded.
        sweep_uri = resume.rstrip("/")
        sweep_uri = sweep_uri if storage.is_s3(sweep_uri) else os.path.abspath(sweep_uri)
        cli_endpoint = cfg.storage.s3_endpoint if cfg is not None else None
        storage.configure_s3(cli_endpoint)
        state = load_sweep_state(sweep_uri)
        address = cfg.cluster.address if cfg is not None else None
        cfg, space, settings, plan = state.cfg, state.space, state.settings, state.plan
        cfg.cluster.address = address  # where to run may change on resume; what to run may not
        cfg.storage.s3_endpoint = cli_endpoint or cfg.storage.s3_endpoint
    else:
        assert cfg is not None and space is not None and settings is not None
        storage.configure_s3(cfg.storage.s3_endpoint)
        validate_settings(settings, space)
        if space.method != cfg.method:
            raise UserError(f"the search space is for {space.method} but --method is {cfg.method}")
        cfg.train.validation = VALIDATION_FOR_OBJECTIVE[settings.objective]
        check_config(cfg)
        # An existing sweep is the first thing to report: nothing else matters if it would be overwritten.
        name = cfg.storage.name or default_sweep_name(cfg)
        out = cfg.storage.out if storage.is_s3(cfg.storage.out) else os.path.abspath(cfg.storage.out)
        sweep_uri = storage.join(out, name)
        if storage.exists(storage.join(sweep_uri, SWEEP_FILE)):
            raise UserError(f"sweep {sweep_uri} already exists; pass --resume {sweep_uri} to continue it or choose another --name")
        check_space_fits_backbone(space, cfg)
        splits, notes = check_data_and_model(cfg)  # data and backbone mistakes fail before Ray starts
        if settings.objective == "synthetic-val" and not splits.val:
            raise UserError(f"no held-out normal images for the synthetic validation (--val-fraction "
                            f"{cfg.data.val_fraction} of {len(splits.train)} training images); raise --val-fraction")
        warnings_seen += notes
        cfg.storage.out, cfg.storage.name = out, name
        plan = plan_trials(space, settings)
        storage.write_text(storage.join(sweep_uri, SWEEP_FILE), sweep_state_json(cfg, space, settings, plan))
    storage.configure_s3(cfg.storage.s3_endpoint)
    if settings.objective == "test":
        warnings_seen.append(TEST_OBJECTIVE_WARNING)
    runs_uri = storage.join(sweep_uri, RUNS_DIR)
    points = {trial["id"]: trial["params"] for trial in plan}
    records = read_trial_records(sweep_uri, list(points)) if resume else {i: new_record(i) for i in points}
    early_stopped = read_early_stopped(sweep_uri, strict=True) if resume else set()
    todo = trials_to_run(plan, records, early_stopped, finished_runs(runs_uri, records))

    view = SweepView(console, space, sweep_uri, quiet=quiet, objective=settings.objective, points=points)
    for note in warnings_seen:
        view.warning(note)
    view.message(f"sweep [cyan]{sweep_uri}[/]: {cfg.method} on {cfg.data.dataset}, "
                 f"{settings.samples if settings.search == 'random' else f'{space.grid_size()}×{settings.samples}'} trial(s), "
                 f"{cfg.train.epochs} epoch(s) each, {settings.scheduler}, objective {settings.objective}")
    if resume:
        view.message(f"resuming: {len(todo)} of {len(plan)} trial(s) to run"
                     + (f" ({', '.join(todo[:8])}{', …' if len(todo) > 8 else ''})" if todo else ""))
    if todo:
        _run_trials(cfg, space, settings, sweep_uri, [t for t in plan if t["id"] in set(todo)], records, view)
        records = read_trial_records(sweep_uri, list(points))
        early_stopped = read_early_stopped(sweep_uri)
    trials = collect_trials(plan, records, space, runs_uri, early_stopped, finished_runs(runs_uri, records))
    outcome = summarise(cfg, space, settings, sweep_uri, trials, warnings_seen)
    outcome.wall_seconds = time.perf_counter() - started
    view.finished(outcome)
    return outcome


def _run_trials(cfg: RunConfig, space: SearchSpace, settings: SweepSettings, sweep_uri: str,
                todo: list[dict[str, Any]], records: dict[str, dict[str, Any]], view: SweepView) -> None:
    """One Tune run over the planned trials ``todo`` (a grid over their ids), recording
    every trial's progress in agp's records."""
    from ray import tune  # deferred: after the token set-up (see agpctl.cluster)

    dashboard = cfg.cluster.dashboard or not trains_in_trial(cfg)
    with _sweep_ray(cfg.cluster.address, dashboard), ray_session(cfg.cluster.address) as ray:
        max_concurrent = settings.max_concurrent or default_max_concurrent(cfg, ray.cluster_resources())
        trial_base = cfg
        if cfg.cluster.cpus_per_worker is None:  # auto: concurrent trials share the CPUs (best.yaml keeps auto)
            trial_base = cfg.with_overrides({"cluster.cpus_per_worker": resolve_cpus_per_worker(
                cfg, ray.cluster_resources().get("CPU", 1.0), concurrent_runs=max_concurrent)})
        if cfg.cluster.gpus_per_worker == "auto":  # likewise: 1 per worker when the cluster has GPUs
            trial_base = trial_base.with_overrides({"cluster.gpus_per_worker": requested_gpus(
                cfg.cluster, ray.cluster_resources().get("GPU", 0.0))})
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=trial_base.to_dict(), space_raw=space.to_raw(), method=cfg.method,
                                 sweep_uri=sweep_uri, points={t["id"]: t["params"] for t in todo}),
            trial_resources(trial_base),
        )
        fs, storage_path = storage_location(storage.join(sweep_uri, TUNE_DIR))
        recorder = TrialRecorder(sweep_uri, records, cfg.storage.s3_endpoint)
        history = {i: [(e, v) for e, v in r["history"]] for i, r in records.items() if r["history"]}
        tuner = tune.Tuner(
            trainable,
            param_space={TRIAL_KEY: tune.grid_search([t["id"] for t in todo])},
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=1,
                scheduler=_scheduler(settings, cfg.train.epochs, sweep_uri, history),
                search_alg=_search_alg(max_concurrent),
                # Trials that train in their own actor hand it on to the next trial: no process
                # start and no torch / timm import per trial. A trial ASHA stops ends at the
                # report it is blocked in, so the actor is free for the next one.
                reuse_actors=trains_in_trial(cfg),
            ),
            run_config=tune.RunConfig(
                name=_attempt_name(sweep_uri), storage_path=storage_path, storage_filesystem=fs, verbose=0,
                callbacks=[sweep_callback(recorder, view)],
            ),
        )
        view.message(f"{max_concurrent} trial(s) at a time")
        # Tune's newer console output prints its own boxes whatever the verbosity; the
        # classic output with verbose=0 is silent, leaving the terminal to our live table
        # (and stdout to --json).
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        with view.live():
            tuner.fit()  # the ResultGrid is not used: agp's records are the results


def _attempt_name(sweep_uri: str) -> str:
    """A fresh folder under tune/ for this run of the sweep."""
    base = datetime.now().strftime("%Y%m%d-%H%M%S")
    name, n = base, 1
    while storage.exists(storage.join(sweep_uri, TUNE_DIR, name)):
        n += 1
        name = f"{base}-{n}"
    return name


@contextlib.contextmanager
def _sweep_ray(address: str | None, dashboard: bool):
    """The sweep's embedded Ray (remote clusters are left alone), without the signal handling
    of ``ray_session``: Tune handles Ctrl-C itself.

    ``dashboard`` is needed by multi-worker trials: ASHA stops a trial by ending its actor,
    and Ray Train then frees the stopped run's placement group from a detached cleaner actor
    that asks Ray's state API (served by the dashboard) whether the controller is alive;
    without it the stopped trial's CPUs are never released. ``embedded_ray_options`` gives
    the dashboard a port of its own and tells every worker. One-worker trials start no
    worker group, so their sweeps start no dashboard unless asked (``--dashboard``).
    """
    import ray  # deferred: see agpctl.cluster

    if address_kind(address) != "local" or ray.is_initialized():
        yield
        return
    logging.getLogger("ray").setLevel(logging.ERROR)
    context = ray.init(logging_level="WARNING", log_to_driver=False, **embedded_ray_options(dashboard=dashboard))
    if dashboard:
        announce_dashboard(context)
    try:
        yield
    finally:
        ray.shutdown()


def _scheduler(settings: SweepSettings, epochs: int, sweep_uri: str,
               history: dict[str, list[tuple[int, float]]] | None = None):
    from ray.tune.schedulers import FIFOScheduler  # deferred: see agpctl.cluster

    from tuning.schedulers import RecordingASHA

    if settings.scheduler == "fifo":
        return FIFOScheduler()
    # max_t one past the last epoch: reaching max_t makes ASHA stop a trial at once, and the
    # last epoch must still reach its final report (test evaluation, metrics.json).
    return RecordingASHA(sweep_uri=sweep_uri, history=history, time_attr="epoch", max_t=max(1, epochs) + 1,
                         grace_period=min(settings.grace_period, max(1, epochs)),
                         reduction_factor=max(2, settings.reduction_factor))


def _search_alg(max_concurrent: int):
    from ray.tune.search import BasicVariantGenerator  # deferred: see agpctl.cluster

    # The values are planned already (plan_trials): Tune only expands the grid of trial ids,
    # in plan order, at most max_concurrent at a time.
    return BasicVariantGenerator(max_concurrent=max_concurrent)
