"""``agpctl tune``: a Ray Tune sweep whose every trial is a full Ray Train run.

Shape (the Ray Train V2 + Tune pattern): each Tune trial is a *function trainable* that
builds the trial's RunConfig (the sweep's fixed config + the sampled overrides) and runs the
same ``TorchTrainer(worker_loop)`` that ``agpctl train`` runs, with a
``TuneReportCallback`` forwarding every per-epoch report to Tune. The workers evaluate the
objective after every epoch (``train.validation``: held-out normals + pseudo anomalies by
default), so ASHA can stop weak trials early.

Resources: the trial function only waits on its TorchTrainer, so it reserves no CPU (1 MiB
of Ray's logical memory keeps its placement bundle non-empty) and the Train controller
reserves none either (Ray's default in Train V2): the CPUs go to the Train workers, which is
what lets trials follow one another on a 2-CPU machine without deadlock.

Sweep directory ``<out>/<name>/`` (local or s3://): Tune's experiment state (``--resume``),
``sweep.json`` (the fixed config, space and settings), ``runs/<trial_id>/`` (each trial's
complete Ray Train run), and at the end ``results.json``, ``results.csv`` and ``best.yaml``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from agp_data import storage
from agpctl import checkpoint as ckpt
from agpctl.config import RunConfig
from agpctl.errors import UserError
from tuning.space import SearchSpace, parse_space

OBJECTIVES = ("synthetic-val", "test")
SCHEDULERS = ("asha", "fifo")
SEARCHES = ("random", "grid")
METRIC = "val/objective"
VALIDATION_FOR_OBJECTIVE = {"synthetic-val": "synthetic", "test": "test"}
TEST_OBJECTIVE_WARNING = ("--objective test selects hyper-parameters on the test split: the reported "
                          "test metrics of the best trial are optimistic, not an unbiased estimate")
SWEEP_FILE = "sweep.json"
RESULTS_JSON, RESULTS_CSV, BEST_CONFIG = "results.json", "results.csv", "best.yaml"
TRIAL_MEMORY_BYTES = 1 << 20  # the trial function's only reservation (see module docstring)


@dataclass
class SweepSettings:
    samples: int = 8
    scheduler: str = "asha"
    search: str = "random"
    max_concurrent: int | None = None  # None: from the cluster's CPUs/GPUs (1 on small machines)
    objective: str = "synthetic-val"
    grace_period: int = 1  # ASHA: epochs every trial gets before it may be stopped
    reduction_factor: int = 2  # ASHA: 1/reduction_factor of the trials go on at each rung
    seed: int = 0  # seeds the random search


@dataclass
class SweepOutcome:
    sweep_uri: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config_uri: str | None
    warnings: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0


# ---------------------------------------------------------------------------------------
# the trial (runs inside a Tune actor)
# ---------------------------------------------------------------------------------------
def trial_config(base: dict[str, Any], space: SearchSpace, sampled: dict[str, Any], runs_uri: str,
                 trial_id: str) -> RunConfig:
    cfg = RunConfig.from_dict(base, "sweep").with_overrides(space.overrides(sampled))
    cfg.storage.out, cfg.storage.name = runs_uri, trial_id
    return cfg


def run_trial(config: dict[str, Any], base: dict[str, Any], space_raw: dict[str, Any], method: str,
              runs_uri: str) -> None:
    """Tune function trainable: one full Ray Train run of the trial's config."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from agpctl.train import _worker_env, _worker_resources, storage_location, worker_loop

    storage.configure_s3(base.get("storage", {}).get("s3_endpoint"))
    space = parse_space(space_raw, method, "sweep space")
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(base, space, config["params"], runs_uri, trial_id)
    run_uri = storage.join(runs_uri, trial_id)
    if not storage.exists(storage.join(run_uri, ckpt.CONFIG_FILE)):
        storage.write_text(storage.join(run_uri, ckpt.CONFIG_FILE), cfg.to_yaml())
    fs, storage_path = storage_location(runs_uri)
    # No resume_from_checkpoint (Train V2 rejects it): a trial restarted by --resume finds
    # its run's latest checkpoint itself (agpctl.train.worker_loop reads the run directory).
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"run": cfg.to_dict(), "run_uri": run_uri},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.workers,
            use_gpu=cfg.cluster.gpus_per_worker > 0,
            resources_per_worker=_worker_resources(cfg),
        ),
        run_config=ray.train.RunConfig(
            name=trial_id,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(1, cfg.train.keep_checkpoints)),
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            worker_runtime_env=_worker_env(cfg),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


# ---------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------
def default_sweep_name(cfg: RunConfig) -> str:
    return f"tune-{cfg.method}-{cfg.data.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def validate_settings(settings: SweepSettings, space: SearchSpace) -> None:
    if settings.objective not in OBJECTIVES:
        raise UserError(f"--objective {settings.objective!r}: use one of {', '.join(OBJECTIVES)}")
    if settings.scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler {settings.scheduler!r}: use one of {', '.join(SCHEDULERS)}")
    if settings.search not in SEARCHES:
        raise UserError(f"--search {settings.search!r}: use one of {', '.join(SEARCHES)}")
    if settings.samples < 1:
        raise UserError("--samples must be at least 1")
    if settings.max_concurrent is not None and settings.max_concurrent < 1:
        raise UserError("--max-concurrent must be at least 1")
    if settings.grace_period < 1:
        raise UserError("--grace-period must be at least 1 epoch")
    if settings.search == "grid":
        space.tune_domains("grid")  # raises for non-choice dimensions


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
    from agp_models.backbones import BackboneError, check_layer_sets

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
    if cfg.cluster.gpus_per_worker > 0:
        fits = min(fits, float(resources.get("GPU", 0.0)) // (cfg.cluster.workers * cfg.cluster.gpus_per_worker))
    return max(1, int(fits))


def run_sweep(cfg: RunConfig | None, space: SearchSpace | None, settings: SweepSettings | None, *,
              resume: str | None = None, console=None, quiet: bool = False) -> SweepOutcome:
    """Runs (or, with ``resume``, continues) a sweep and writes its results."""
    from agpctl.train import _absolute_local_paths, _validate, resolve_cpus_per_worker, resolve_pretrained, storage_location
    from agpctl.data_setup import split_samples

    from agpctl.cluster import address_kind, use_token_if_available

    if cfg is not None and address_kind(cfg.cluster.address) != "local":  # tune_cli always passes cfg, resume too
        use_token_if_available()  # before anything imports Ray (grid domains do): Ray reads its auth mode once
    started = time.perf_counter()
    warnings_seen: list[str] = []
    if resume:
        sweep_uri = resume.rstrip("/")
        saved_file = storage.join(sweep_uri, SWEEP_FILE)
        if not storage.exists(saved_file):
            raise UserError(f"{sweep_uri} is not a sweep directory (no {SWEEP_FILE}); pass the folder agpctl tune printed")
        saved = json.loads(storage.read_text(saved_file))
        address = cfg.cluster.address if cfg is not None else None
        cfg = RunConfig.from_dict(saved["base"], saved_file)
        cfg.cluster.address = address
        space = parse_space(saved["space"], cfg.method, saved_file)
        settings = SweepSettings(**saved["settings"])
    else:
        assert cfg is not None and space is not None and settings is not None
        storage.configure_s3(cfg.storage.s3_endpoint)
        validate_settings(settings, space)
        if space.method != cfg.method:
            raise UserError(f"the search space is for {space.method} but --method is {cfg.method}")
        cfg.train.validation = VALIDATION_FOR_OBJECTIVE[settings.objective]
        _validate(cfg)
        _absolute_local_paths(cfg)
        # An existing sweep is the first thing to report: nothing else matters if it would be overwritten.
        name = cfg.storage.name or default_sweep_name(cfg)
        out = cfg.storage.out if storage.is_s3(cfg.storage.out) else os.path.abspath(cfg.storage.out)
        sweep_uri = storage.join(out, name)
        if storage.exists(storage.join(sweep_uri, SWEEP_FILE)):
            raise UserError(f"sweep {sweep_uri} already exists; pass --resume {sweep_uri} to continue it or choose another --name")
        splits = split_samples(cfg.data, cfg.train.seed)  # data mistakes fail before Ray starts
        if settings.objective == "synthetic-val" and not splits.val:
            raise UserError(f"no held-out normal images for the synthetic validation (--val-fraction "
                            f"{cfg.data.val_fraction} of {len(splits.train)} training images); raise --val-fraction")
        check_space_fits_backbone(space, cfg)
        warnings_seen += resolve_pretrained(cfg)
        cfg.storage.out, cfg.storage.name = out, name
        storage.write_text(storage.join(sweep_uri, SWEEP_FILE), json.dumps({
            "base": cfg.to_dict(), "space": _space_raw(space), "settings": asdict(settings),
            "created": datetime.now().isoformat(timespec="seconds"),
        }, indent=2))
    storage.configure_s3(cfg.storage.s3_endpoint)
    if settings.objective == "test":
        warnings_seen.append(TEST_OBJECTIVE_WARNING)
    view = SweepView(console, space, sweep_uri, quiet=quiet, objective=settings.objective)
    for note in warnings_seen:
        view.warning(note)
    view.message(f"sweep [cyan]{sweep_uri}[/]: {cfg.method} on {cfg.data.dataset}, "
                 f"{settings.samples if settings.search == 'random' else f'{space.grid_size()}×{settings.samples}'} trial(s), "
                 f"{cfg.train.epochs} epoch(s) each, {settings.scheduler}, objective {settings.objective}")

    from ray import tune

    from agpctl.cluster import ray_session

    runs_uri = storage.join(sweep_uri, "runs")
    parent, _, name = sweep_uri.rpartition("/")
    with _sweep_ray(cfg.cluster.address), ray_session(cfg.cluster.address) as ray:
        max_concurrent = settings.max_concurrent or default_max_concurrent(cfg, ray.cluster_resources())
        trial_base = cfg
        if cfg.cluster.cpus_per_worker is None:  # auto: concurrent trials share the CPUs (best.yaml keeps auto)
            trial_base = cfg.with_overrides({"cluster.cpus_per_worker": resolve_cpus_per_worker(
                cfg, ray.cluster_resources().get("CPU", 1.0), concurrent_runs=max_concurrent)})
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=trial_base.to_dict(), space_raw=_space_raw(space), method=cfg.method,
                                 runs_uri=runs_uri),
            {"CPU": 0, "memory": TRIAL_MEMORY_BYTES},
        )
        fs, storage_path = storage_location(parent)
        if resume:
            tuner = tune.Tuner.restore(sweep_uri if storage.is_s3(sweep_uri) else os.path.abspath(sweep_uri),
                                       trainable=trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=fs)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"params": space.tune_domains(settings.search)},
                tune_config=tune.TuneConfig(
                    metric=METRIC, mode="max", num_samples=settings.samples,
                    scheduler=_scheduler(settings, cfg.train.epochs, sweep_uri),
                    search_alg=_search_alg(settings, max_concurrent),
                ),
                run_config=tune.RunConfig(
                    name=name, storage_path=storage_path, storage_filesystem=fs, verbose=0,
                    callbacks=[view.callback()],
                ),
            )
        view.message(f"{max_concurrent} trial(s) at a time")
        # Tune's newer console output prints its own boxes whatever the verbosity; the
        # classic output with verbose=0 is silent, leaving the terminal to our live table
        # (and stdout to --json).
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        with view.live():
            grid = tuner.fit()
        from tuning.schedulers import read_early_stopped

        trials = collect_trials(grid, space, runs_uri, early_stopped=read_early_stopped(sweep_uri))
    outcome = summarise(cfg, space, settings, sweep_uri, trials, warnings_seen)
    outcome.wall_seconds = time.perf_counter() - started
    view.finished(outcome)
    return outcome


@contextlib.contextmanager
def _sweep_ray(address: str | None):
    """An embedded Ray whose state API every process can find.

    ASHA stops trials by ending the trial actor; Ray Train then frees the stopped run's
    placement group from a detached cleaner actor that asks Ray's state API whether the
    controller is alive. Without an address that actor looks for "the" local Ray, and on a
    machine running several Ray instances (shared machines, parallel test runs) it fails
    and the stopped trial's CPUs are never released. So the embedded instance gets a
    known dashboard port and every worker is told it. Remote clusters are left alone.
    """
    import ray

    from agpctl.cluster import address_kind

    if address_kind(address) != "local" or ray.is_initialized():
        yield
        return
    import logging
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("ray").setLevel(logging.ERROR)
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
    try:
        yield
    finally:
        ray.shutdown()


def _scheduler(settings: SweepSettings, epochs: int, sweep_uri: str):
    from ray.tune.schedulers import FIFOScheduler

    from tuning.schedulers import RecordingASHA

    if settings.scheduler == "fifo":
        return FIFOScheduler()
    # max_t one past the last epoch: reaching max_t makes ASHA stop a trial at once, and the
    # last epoch must still reach its final report (test evaluation, metrics.json).
    return RecordingASHA(sweep_uri=sweep_uri, time_attr="epoch", max_t=max(1, epochs) + 1, grace_period=min(settings.grace_period, max(1, epochs)),
                         reduction_factor=max(2, settings.reduction_factor))


def _search_alg(settings: SweepSettings, max_concurrent: int):
    from ray.tune.search import BasicVariantGenerator

    # BasicVariantGenerator does random sampling and grid expansion alike; seeded so a
    # sweep's trial list is reproducible.
    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=max_concurrent)


def _space_raw(space: SearchSpace) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for dim in space.dimensions:
        if dim.kind in ("choice", "group"):
            raw[dim.key] = {"type": dim.kind, "values": dim.values}
        else:
            raw[dim.key] = {"type": dim.kind, "low": dim.low, "high": dim.high}
    return json.loads(json.dumps(raw, default=str))  # plain JSON types (dict keys become text)


def trial_status(error: bool, final: bool, early_stopped: bool, epochs_done: int) -> str:
    """finished (every epoch) | stopped (early, by ASHA) | interrupted (cut short, e.g. by
    Ctrl-C: --resume continues it) | not started | error."""
    if error:
        return "error"
    if final:
        return "finished"
    if early_stopped:
        return "stopped"
    return "interrupted" if epochs_done > 0 else "not started"


def unfinished_trials(trials: list[dict[str, Any]]) -> list[str]:
    """Trials that ``--resume`` would continue."""
    return [t["trial"] for t in trials if t["status"] in ("interrupted", "not started")]


def collect_trials(grid, space: SearchSpace, runs_uri: str, early_stopped: set[str] | None = None
                   ) -> list[dict[str, Any]]:
    """One row per trial: parameters, status, epochs, last validation metrics."""
    early_stopped = early_stopped or set()
    rows = []
    for result in grid:
        config = (result.config or {}).get("params", {})
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or _trial_id_from_path(result.path)
        try:
            params = space.overrides(config) if config else {}
        except (KeyError, IndexError, ValueError):
            params = {}
        history = result.metrics_dataframe
        epochs_done = int(history["epoch"].max()) if history is not None and "epoch" in history else 0
        row = {
            "trial": trial_id,
            "status": trial_status(bool(result.error), bool(metrics.get("final")), trial_id in early_stopped,
                                   epochs_done),
            "epochs": epochs_done,
            "objective": _number(metrics.get(METRIC)),
            **{k.split("/", 1)[1]: _number(metrics.get(k)) for k in ("val/i_auroc", "val/p_auroc", "val/pro")},
            "params": params,
            "run": storage.join(runs_uri, trial_id) if trial_id else None,
            "seconds": _number(metrics.get("time_total_s")),
        }
        if result.error:
            row["error"] = str(result.error).strip().splitlines()[-1][:300] if str(result.error).strip() else type(result.error).__name__
        rows.append(row)
    return sort_trials(rows)


def sort_trials(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first: by objective; trials without one (errors) last."""
    def key(row):
        value = row.get("objective")
        return (value is None, -(value if value is not None else 0.0))

    return sorted(rows, key=key)


def pick_best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest objective among trials that ran every epoch; stopped trials compete only
    when none finished (a stopped trial's objective is of a shorter training)."""
    finished = [r for r in rows if r["status"] == "finished" and r.get("objective") is not None]
    pool = finished or [r for r in rows if r.get("objective") is not None]
    return sort_trials(pool)[0] if pool else None


def summarise(cfg: RunConfig, space: SearchSpace, settings: SweepSettings, sweep_uri: str,
              trials: list[dict[str, Any]], warnings_seen: list[str]) -> SweepOutcome:
    from agpctl.train import _training_error

    best = pick_best(trials)
    if best is None:
        errors = [t.get("error") for t in trials if t.get("error")]
        if unfinished_trials(trials) and not errors:
            raise UserError(f"the sweep was interrupted before any trial reported {METRIC}; "
                            f"continue it with: agpctl tune --resume {sweep_uri}")
        if errors:
            known = _training_error(RuntimeError(errors[0]))
            raise known if isinstance(known, UserError) else UserError(
                f"every trial failed; first error: {errors[0]} (trial logs under {sweep_uri})")
        raise UserError(f"no trial reported {METRIC}; see {sweep_uri}")
    best_config_uri = storage.join(sweep_uri, BEST_CONFIG)
    best_cfg = ckpt.load_run_config(best["run"])
    # A plain training config: written where the sweep's --out pointed, under a fresh name,
    # with the validation mode the user asked for (per-epoch validation was the sweep's).
    best_cfg.storage.out = cfg.storage.out
    best_cfg.storage.name = None
    best_cfg.train.validation = "none"
    storage.write_text(best_config_uri, best_cfg.to_yaml())
    test_metrics = None
    metrics_file = storage.join(best["run"], ckpt.METRICS_FILE)
    if storage.exists(metrics_file):
        test_metrics = ckpt.read_json(metrics_file)["metrics"].get("mean")
    best = {**best, "test": test_metrics}
    summary = {
        "sweep": sweep_uri,
        "method": cfg.method,
        "dataset": cfg.data.dataset,
        "objective": settings.objective,
        "objective_metric": f"{METRIC} = mean of val/i_auroc, val/p_auroc, val/pro "
                            f"({'test split' if settings.objective == 'test' else 'held-out normals + synthetic anomalies'})",
        "selection": "highest last-epoch objective among trials that finished every epoch",
        "test_metrics": "of the best trial only; never used for selection" if settings.objective != "test"
                        else "of the best trial only; ALSO used for selection (--objective test)",
        "warnings": warnings_seen,
        "unfinished": unfinished_trials(trials),
        "settings": asdict(settings),
        "space": _space_raw(space),
        "epochs": cfg.train.epochs,
        "best": best,
        "best_config": best_config_uri,
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    storage.write_text(storage.join(sweep_uri, RESULTS_JSON), ckpt.to_json({"summary": summary, "trials": trials}))
    storage.write_text(storage.join(sweep_uri, RESULTS_CSV), trials_csv(trials))
    return SweepOutcome(sweep_uri=sweep_uri, trials=trials, best=best, best_config_uri=best_config_uri,
                        warnings=warnings_seen)


def trials_csv(trials: list[dict[str, Any]]) -> str:
    param_names = sorted({p for t in trials for p in t.get("params", {})})
    columns = ["trial", "status", "epochs", "objective", "i_auroc", "p_auroc", "pro", "seconds", *param_names, "run", "error"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for t in trials:
        params = t.get("params", {})
        writer.writerow([_cell(t.get(c)) if c not in param_names else _cell(params.get(c)) for c in columns])
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _trial_id_from_path(path: str | None) -> str | None:
    if not path:
        return None
    base = path.rstrip("/").rsplit("/", 1)[-1]
    # Tune names trial folders <trainable>_<trial_id>_<index>_<params>_<date>
    parts = base.split("_")
    return parts[2] if len(parts) > 2 else base


# ---------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------
class SweepView:
    """A live rich table of trials while the sweep runs, the sorted table at the end."""

    def __init__(self, console, space: SearchSpace, sweep_uri: str, quiet: bool = False,
                 objective: str = "synthetic-val") -> None:
        from agpctl.console import console as default_console

        self.console = console or default_console
        self.space = space
        self.sweep_uri = sweep_uri
        self.quiet = quiet
        self.objective = objective
        self.rows: dict[str, dict[str, Any]] = {}
        self._live = None

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    def warning(self, text: str) -> None:
        from agpctl.console import print_warning

        print_warning(text)

    def callback(self):
        return _live_trials_callback(self)

    def update(self, trial, status: str, result: dict[str, Any] | None = None) -> None:
        row = self.rows.setdefault(trial.trial_id, {"trial": trial.trial_id})
        row["status"] = status
        try:
            row["params"] = self.space.overrides(trial.config.get("params", {}))
        except (KeyError, IndexError, ValueError, AttributeError):
            row.setdefault("params", {})
        if result:
            row["epochs"] = result.get("epoch", row.get("epochs"))
            row["final"] = bool(result.get("final")) or row.get("final", False)
            for key in ("objective", "i_auroc", "p_auroc", "pro"):
                value = _number(result.get(f"val/{key}"))
                if value is not None:
                    row[key] = value
        if self._live is not None:
            self._live.update(self.table(list(self.rows.values()), "trials"))

    def live(self):
        import contextlib

        from rich.live import Live

        if self.quiet:
            return contextlib.nullcontext()
        view = self

        @contextlib.contextmanager
        def running():
            with Live(view.table([], "trials"), console=view.console, refresh_per_second=2, transient=True) as live:
                view._live = live
                try:
                    yield
                finally:
                    view._live = None

        return running()

    def table(self, rows: list[dict[str, Any]], title: str):
        from rich.table import Table

        from agpctl.report import format_percent

        params = sorted({p for r in rows for p in r.get("params", {})})
        table = Table(title=title)
        for name in ("trial", "status", "epoch", *[p.split(".")[-1] for p in params], "objective", "I-AUROC", "P-AUROC", "PRO"):
            table.add_column(name, justify="left" if name in ("trial", "status") else "right")
        for r in rows:
            table.add_row(
                str(r.get("trial")), str(r.get("status", "")), str(r.get("epochs") or ""),
                *[_short(r.get("params", {}).get(p)) for p in params],
                format_percent(r.get("objective")), format_percent(r.get("i_auroc")),
                format_percent(r.get("p_auroc")), format_percent(r.get("pro")),
            )
        return table

    def finished(self, outcome: SweepOutcome) -> None:
        if self.quiet:
            return
        self.console.print(self.table(outcome.trials, f"sweep · sorted by {METRIC} "
                                                      f"({'TEST split' if self.objective == 'test' else 'synthetic validation'})"))
        best = outcome.best or {}
        self.console.print(f"best trial [bold]{best.get('trial')}[/]: objective {_short(best.get('objective'))}; "
                           f"config: [cyan]{outcome.best_config_uri}[/]")
        if best.get("test"):
            from agpctl.report import metrics_table

            self.console.print(metrics_table({"mean": best["test"]}, title="test split · best trial only"))
        unfinished = unfinished_trials(outcome.trials)
        if unfinished:
            self.console.print(f"[yellow]{len(unfinished)} trial(s) interrupted or not started;[/] continue the sweep "
                               f"with: agpctl tune --resume {outcome.sweep_uri}")
        self.console.print(f"all trials: [cyan]{storage.join(outcome.sweep_uri, RESULTS_JSON)}[/] and "
                           f"[cyan]{storage.join(outcome.sweep_uri, RESULTS_CSV)}[/]; "
                           f"retrain with: agpctl train --config {outcome.best_config_uri}")


def _live_trials_callback(view: SweepView):
    from ray.tune import Callback

    class LiveTrials(Callback):
        """Feeds the driver's live table. Tune pickles its callbacks with the experiment
        state; the view (a terminal) is not part of that state and is dropped."""

        def __init__(self, target: SweepView | None) -> None:
            self.view = target

        def __reduce__(self):
            return (_live_trials_callback_none, ())

        def on_trial_start(self, iteration, trials, trial, **info):
            if self.view:
                self.view.update(trial, status="running")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.view:
                self.view.update(trial, status="running", result=result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            if self.view:
                from tuning.schedulers import read_early_stopped

                row = self.view.rows.get(trial.trial_id, {})
                early = trial.trial_id in read_early_stopped(self.view.sweep_uri)
                self.view.update(trial, status=trial_status(False, bool(row.get("final")), early, 1))

        def on_trial_error(self, iteration, trials, trial, **info):
            if self.view:
                self.view.update(trial, status="error")

    return LiveTrials(view)


def _live_trials_callback_none():
    from ray.tune import Callback

    return Callback()


def _short(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
