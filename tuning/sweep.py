"""``agpctl tune``: a Ray Tune sweep whose every trial is a full Ray Train run.

Shape (the Ray Train V2 + Tune pattern): each Tune trial is a *function trainable* that
builds the trial's RunConfig (the sweep's fixed config + the trial's planned values) and runs
the same ``TorchTrainer(worker_loop)`` that ``agpctl train`` runs, with a
``TuneReportCallback`` forwarding every per-epoch report to Tune. The workers evaluate the
objective after every epoch (``train.validation``: held-out normals + pseudo anomalies by
default), so ASHA can stop weak trials early.

Resources: the trial function only waits on its TorchTrainer, so it reserves no CPU (1 MiB
of Ray's logical memory keeps its placement bundle non-empty) and the Train controller
reserves none either (Ray's default in Train V2): the CPUs go to the Train workers, which is
what lets trials follow one another on a 2-CPU machine without deadlock.

The trials are planned up front, on the driver: random search draws ``--samples`` points
from the space with a numpy generator seeded by ``train.seed``; grid search takes every
point of the grid ``--samples`` times. Each planned trial has a stable id (``t0000``,
``t0001``, …) and Tune runs exactly those, as a grid over the ids (``{"agp_trial": id}``).

Sweep directory ``<out>/<name>/`` (local or s3://)::

    sweep.json            the fixed config, the space, the settings and the planned trials
                          ({"id": "t0003", "params": {dimension key: value}}), written once
    trials/<id>.json      agp's record of each trial, rewritten by the driver as results come:
                          status, epochs done, last validation metrics, per-epoch objective
                          history, seconds, the error line
    trials/<id>.error     the last line of a trial's exception, written by the trial; read
                          into the record only when Tune reports that the trial failed
    early_stopped.json    the ids ASHA stopped (tuning.schedulers)
    runs/<id>/            each trial's complete Ray Train run (agpctl.runs; metrics.json
                          marks it finished)
    tune/<attempt>/       Ray Tune's own files of each run of the sweep (tuner.pkl,
                          experiment_state-*.json, trial folders): written, never read
    results.json, results.csv, best.yaml   at the end

Why ``--resume`` never calls ``Tuner.restore``: Tune's state is pickles (``tuner.pkl``, the
cloudpickled trials of its experiment state, error pickles), and a sweep folder may be a
shared ``s3://`` prefix: loading a planted pickle runs its code on the machine that resumes.
agp's state is plain JSON and is checked before use (``load_sweep_state``,
``read_trial_records``). Resume keeps the trials that finished or that ASHA stopped and runs
the others (interrupted, not started, failed) through a new Tuner; an interrupted trial's
worker continues from the newest valid checkpoint of ``runs/<id>/`` by itself. The new
ASHA starts from the recorded per-epoch objectives of the whole sweep. The live callback
also drops Tune's in-memory reference to a failed trial's error pickle, so the ResultGrid
that ``Tuner.fit`` builds at the end never loads one either.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

import numpy as np
from rich.live import Live
from rich.table import Table

from agp_data import storage
from agp_data.errors import DataError
from agp_models.backbones import BackboneError, check_layer_sets
from agpctl import runs
from agpctl.cluster.connect import address_kind, ray_session, use_token_if_available
from agpctl.cluster.trainer import make_torch_trainer, resolve_cpus_per_worker, storage_location
from agpctl.config import RunConfig
from agpctl.console import console as default_console
from agpctl.console import print_warning
from agpctl.errors import UserError, remote_error
from agpctl.tables import format_percent, metrics_table
from agpctl.training.preflight import check_config, check_data_and_model
from agpctl.training.worker import worker_loop
from tuning.space import SearchSpace, parse_space

OBJECTIVES = ("synthetic-val", "test")
SCHEDULERS = ("asha", "fifo")
SEARCHES = ("random", "grid")
METRIC = "val/objective"
VALIDATION_FOR_OBJECTIVE = {"synthetic-val": "synthetic", "test": "test"}
TEST_OBJECTIVE_WARNING = ("--objective test selects hyper-parameters on the test split: the reported "
                          "test metrics of the best trial are optimistic, not an unbiased estimate")
SWEEP_FILE = "sweep.json"
STATE_VERSION = 2  # sweep.json with planned trials; older sweeps (Tune state only) cannot be resumed
TRIALS_DIR, RUNS_DIR, TUNE_DIR = "trials", "runs", "tune"
RESULTS_JSON, RESULTS_CSV, BEST_CONFIG = "results.json", "results.csv", "best.yaml"
TRIAL_MEMORY_BYTES = 1 << 20  # the trial function's only reservation (see module docstring)
TRIAL_KEY = "agp_trial"  # the Tune config key of agp's trial id (also tuning.schedulers.TRIAL_KEY)
# Trial ids name files and folders: letters, digits, _ and -, nothing that leaves a folder.
TRIAL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# A record's status as the driver last saw it; "running" on disk means the driver stopped
# while the trial ran (interrupted).
RECORD_STATUSES = ("not started", "running", "finished", "stopped", "interrupted", "error")
METRIC_FIELDS = ("objective", "i_auroc", "p_auroc", "pro")
ERROR_LINE_CHARS = 300


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


@dataclass
class SweepState:
    """A sweep as ``sweep.json`` holds it, checked."""
    cfg: RunConfig
    space: SearchSpace
    settings: SweepSettings
    plan: list[dict[str, Any]]  # [{"id": "t0000", "params": {dimension key: value}}, ...]
    source: str


# ---------------------------------------------------------------------------------------
# the plan: every trial's values, drawn once on the driver
# ---------------------------------------------------------------------------------------
def trial_ids(count: int) -> list[str]:
    width = max(4, len(str(max(0, count - 1))))
    return [f"t{i:0{width}d}" for i in range(count)]


def planned_trial_count(space: SearchSpace, settings: SweepSettings) -> int:
    return settings.samples * (space.grid_size() if settings.search == "grid" else 1)


def plan_trials(space: SearchSpace, settings: SweepSettings) -> list[dict[str, Any]]:
    """The sweep's trials as plain JSON: random search draws ``settings.samples`` points with
    a generator seeded by ``settings.seed``; grid search repeats the grid ``samples`` times."""
    if settings.search == "grid":
        points = [dict(point) for _ in range(settings.samples) for point in space.grid()]
    else:
        rng = np.random.default_rng(settings.seed % (1 << 64))
        points = [space.sample(rng) for _ in range(settings.samples)]
    return [{"id": trial_id, "params": point} for trial_id, point in zip(trial_ids(len(points)), points)]


def sweep_state_json(cfg: RunConfig, space: SearchSpace, settings: SweepSettings,
                     plan: list[dict[str, Any]]) -> str:
    return json.dumps({
        "version": STATE_VERSION, "base": cfg.to_dict(), "space": _space_raw(space), "settings": asdict(settings),
        "trials": plan, "created": datetime.now().isoformat(timespec="seconds"),
    }, indent=2)


def load_sweep_state(sweep_uri: str) -> SweepState:
    """``sweep.json`` of ``sweep_uri``, read as JSON and checked: the base config builds, the
    space parses for its method, the settings are valid and every planned trial is a point
    of the space. Anything else is one UserError naming the file."""
    path = storage.join(sweep_uri, SWEEP_FILE)
    if not storage.exists(path):
        raise UserError(f"{sweep_uri} is not a sweep directory (no {SWEEP_FILE}); pass the folder agpctl tune printed")
    fix = "restore the file, or start a new sweep with agpctl tune"
    saved = _read_json(path, fix)
    if not isinstance(saved, dict):
        raise UserError(f"{path}: expected a JSON object; {fix}")
    if "trials" not in saved and "version" not in saved and "base" in saved:
        raise UserError(f"{path}: written by an older agpctl that kept no plan of the trials; it cannot be resumed "
                        "(that would load Ray Tune's pickled state); start a new sweep with agpctl tune")
    if saved.get("version") != STATE_VERSION:
        raise UserError(f"{path}: unknown sweep state version {saved.get('version')!r} (expected {STATE_VERSION}); {fix}")
    for key, kind in (("base", dict), ("space", dict), ("settings", dict), ("trials", list)):
        if not isinstance(saved.get(key), kind):
            raise UserError(f"{path}: {key!r} must be a JSON {'object' if kind is dict else 'list'}; {fix}")
    try:
        cfg = RunConfig.from_dict(saved["base"], f"{path}: base")
    except UserError as exc:
        raise exc if path in str(exc) else UserError(f"{path}: base: {exc}") from None
    except Exception as exc:  # a shape from_dict does not expect: still one line
        raise UserError(f"{path}: base: not a run configuration ({exc.__class__.__name__}: {exc}); {fix}") from None
    space = parse_space(saved["space"], cfg.method, f"{path}: space")
    settings = _settings_from_json(saved["settings"], f"{path}: settings")
    try:
        validate_settings(settings, space)
    except UserError as exc:
        raise UserError(f"{path}: settings: {exc}") from None
    plan = []
    for index, trial in enumerate(saved["trials"]):
        where = f"{path}: trials[{index}]"
        if not isinstance(trial, dict) or set(trial) != {"id", "params"}:
            raise UserError(f"{where}: expected {{\"id\": ..., \"params\": {{...}}}}; {fix}")
        if not isinstance(trial["id"], str) or not TRIAL_ID.fullmatch(trial["id"]):
            raise UserError(f"{where}: bad trial id {trial['id']!r} (letters, digits, _ and - only); {fix}")
        space.check_point(trial["params"], where)
        plan.append({"id": trial["id"], "params": dict(trial["params"])})
    ids = [t["id"] for t in plan]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: trial ids repeat; {fix}")
    if len(plan) != planned_trial_count(space, settings):
        raise UserError(f"{path}: {len(plan)} planned trial(s), but the settings make "
                        f"{planned_trial_count(space, settings)}; {fix}")
    return SweepState(cfg=cfg, space=space, settings=settings, plan=plan, source=path)


def _read_json(uri: str, fix: str) -> Any:
    """JSON (only ever JSON: agp's state is never unpickled) or one UserError naming the file."""
    try:
        return json.loads(storage.read_text(uri))
    except (DataError, UnicodeDecodeError, ValueError):
        raise UserError(f"{uri}: not valid JSON; {fix}") from None


def _settings_from_json(raw: dict[str, Any], where: str) -> SweepSettings:
    known = {f.name for f in fields(SweepSettings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    for name, value in raw.items():
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if name in ("scheduler", "search", "objective"):
            ok = isinstance(value, str)
        elif name == "max_concurrent":
            ok = value is None or is_int
        else:
            ok = is_int
        if not ok:
            raise UserError(f"{where}: {name} = {value!r} has the wrong type")
    return SweepSettings(**raw)


# ---------------------------------------------------------------------------------------
# agp's trial records (plain JSON, one file per trial)
# ---------------------------------------------------------------------------------------
def trial_record_uri(sweep_uri: str, trial_id: str) -> str:
    return storage.join(sweep_uri, TRIALS_DIR, f"{trial_id}.json")


def trial_error_uri(sweep_uri: str, trial_id: str) -> str:
    return storage.join(sweep_uri, TRIALS_DIR, f"{trial_id}.error")


def new_record(trial_id: str) -> dict[str, Any]:
    return {"id": trial_id, "status": "not started", "epochs": 0, "final": False,
            **{name: None for name in METRIC_FIELDS}, "history": [], "seconds": None, "error": None, "attempts": 0}


def write_trial_record(sweep_uri: str, record: dict[str, Any]) -> None:
    storage.write_text(trial_record_uri(sweep_uri, record["id"]), runs.to_json(record) + "\n")


def check_trial_record(raw: Any, trial_id: str, where: str) -> dict[str, Any]:
    """A trial record read from JSON, with its types checked (missing fields take their
    defaults); UserError naming ``where`` otherwise."""
    fix = "delete the file to run that trial again"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a JSON object; {fix}")
    record = new_record(trial_id)
    record.update({k: v for k, v in raw.items() if k in record})

    def number(value: Any) -> bool:
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    problems = []
    if record["id"] != trial_id:
        problems.append(f"id {record['id']!r} is not {trial_id!r}")
    if record["status"] not in RECORD_STATUSES:
        problems.append(f"status {record['status']!r} is not one of {', '.join(RECORD_STATUSES)}")
    if not count(record["epochs"]) or not count(record["attempts"]):
        problems.append("epochs and attempts must be counts")
    if not isinstance(record["final"], bool):
        problems.append("final must be true or false")
    if not all(number(record[name]) for name in (*METRIC_FIELDS, "seconds")):
        problems.append(f"{', '.join(METRIC_FIELDS)} and seconds must be numbers or null")
    if record["error"] is not None and not isinstance(record["error"], str):
        problems.append("error must be text or null")
    history = record["history"]
    if not isinstance(history, list) or not all(
            isinstance(p, list) and len(p) == 2 and count(p[0]) and number(p[1]) and p[1] is not None for p in history):
        problems.append("history must be a list of [epoch, objective] pairs")
    if problems:
        raise UserError(f"{where}: {'; '.join(problems)}; {fix}")
    for name in (*METRIC_FIELDS, "seconds"):
        record[name] = _number(record[name])
    record["history"] = [[int(e), float(v)] for e, v in history if _number(v) is not None]
    return record


def read_trial_records(sweep_uri: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The record of every planned trial (a trial without a file never started)."""
    records = {}
    for trial_id in ids:
        uri = trial_record_uri(sweep_uri, trial_id)
        if not storage.exists(uri):
            records[trial_id] = new_record(trial_id)
            continue
        records[trial_id] = check_trial_record(_read_json(uri, "delete the file to run that trial again"), trial_id, uri)
    return records


def read_trial_error(sweep_uri: str, trial_id: str) -> str | None:
    uri = trial_error_uri(sweep_uri, trial_id)
    try:
        if not storage.exists(uri):
            return None
        text = storage.read_text(uri).strip()
    except (OSError, UnicodeDecodeError, UserError, DataError):
        return None
    return text.splitlines()[-1][:ERROR_LINE_CHARS] if text else None


def error_line(exc: BaseException) -> str:
    """The last line of an exception (where Ray puts the remote exception itself)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1].strip() if lines else exc.__class__.__name__)[:ERROR_LINE_CHARS]


class TrialRecorder:
    """The driver's side of the records: updated from Tune's callbacks, written at once."""

    def __init__(self, sweep_uri: str, records: dict[str, dict[str, Any]], s3_endpoint: str | None = None) -> None:
        self.sweep_uri = sweep_uri
        self.records = {trial_id: dict(record) for trial_id, record in records.items()}
        self.s3_endpoint = s3_endpoint
        self._seconds_before = {trial_id: r.get("seconds") or 0.0 for trial_id, r in self.records.items()}

    def record(self, trial_id: str) -> dict[str, Any]:
        return self.records.setdefault(trial_id, new_record(trial_id))

    def started(self, trial_id: str) -> dict[str, Any]:
        record = self.record(trial_id)
        # A trial that runs again proves itself again: its final report, its run's metrics.json.
        record.update(status="running", final=False, error=None, attempts=record["attempts"] + 1)
        self._seconds_before[trial_id] = record.get("seconds") or 0.0
        return self._write(record)

    def result(self, trial_id: str, result: dict[str, Any]) -> dict[str, Any]:
        record = self.record(trial_id)
        record["status"] = "running"
        epoch = result.get("epoch")
        if isinstance(epoch, (int, float)) and not isinstance(epoch, bool):
            record["epochs"] = max(record["epochs"], int(epoch))
        if result.get("final"):
            record["final"] = True
        for name in METRIC_FIELDS:
            value = _number(result.get(f"val/{name}"))
            if value is not None:
                record[name] = value
        objective = _number(result.get(METRIC))
        if objective is not None and isinstance(epoch, (int, float)):
            history = {e: v for e, v in record["history"]}
            history[int(epoch)] = objective
            record["history"] = [[e, history[e]] for e in sorted(history)]
        seconds = _number(result.get("time_total_s"))
        if seconds is not None:
            record["seconds"] = self._seconds_before.get(trial_id, 0.0) + seconds
        return self._write(record)

    def completed(self, trial_id: str, early_stopped: bool) -> dict[str, Any]:
        record = self.record(trial_id)
        record["status"] = trial_status(False, record["final"], early_stopped, record["epochs"])
        return self._write(record)

    def errored(self, trial_id: str, error: str | None) -> dict[str, Any]:
        record = self.record(trial_id)
        record.update(status="error", error=error or "the trial's process failed without an error message "
                                                     f"(see Ray's logs and {storage.join(self.sweep_uri, TUNE_DIR)})")
        return self._write(record)

    def _write(self, record: dict[str, Any]) -> dict[str, Any]:
        write_trial_record(self.sweep_uri, record)
        return record


def trial_outcome(record: dict[str, Any], run_finished: bool, early_stopped: bool) -> str:
    """A trial's status from its record: finished needs the final report *and* the run's
    metrics.json; stopped means ASHA stopped it (early_stopped.json or the record)."""
    final = bool(record.get("final")) and run_finished
    return trial_status(error=record.get("status") == "error" and not final, final=final,
                        early_stopped=early_stopped or record.get("status") == "stopped",
                        epochs_done=int(record.get("epochs") or 0))


def finished_runs(runs_uri: str, records: dict[str, dict[str, Any]]) -> set[str]:
    """Ids of the trials whose final report was recorded and whose run wrote metrics.json."""
    return {trial_id for trial_id, record in records.items()
            if record.get("final") and runs.has_metrics(storage.join(runs_uri, trial_id))}


def trials_to_run(plan: list[dict[str, Any]], records: dict[str, dict[str, Any]], early_stopped: set[str],
                  finished: set[str]) -> list[str]:
    """What ``--resume`` runs: every planned trial that neither finished nor was stopped by
    ASHA (interrupted, not started, failed), in plan order."""
    todo = []
    for trial in plan:
        trial_id = trial["id"]
        outcome = trial_outcome(records.get(trial_id) or new_record(trial_id), trial_id in finished,
                                trial_id in early_stopped)
        if outcome not in ("finished", "stopped"):
            todo.append(trial_id)
    return todo


# ---------------------------------------------------------------------------------------
# the trial (runs inside a Tune actor)
# ---------------------------------------------------------------------------------------
def trial_config(base: dict[str, Any], space: SearchSpace, sampled: dict[str, Any], runs_uri: str,
                 trial_id: str) -> RunConfig:
    cfg = RunConfig.from_dict(base, "sweep").with_overrides(space.overrides(sampled))
    cfg.storage.out, cfg.storage.name = runs_uri, trial_id
    return cfg


def run_trial(config: dict[str, Any], base: dict[str, Any], space_raw: dict[str, Any], method: str,
              sweep_uri: str, points: dict[str, dict[str, Any]]) -> None:
    """Tune function trainable: one full Ray Train run of the planned trial ``config[TRIAL_KEY]``
    in ``runs/<trial id>/``."""
    from ray.tune.integration.ray_train import TuneReportCallback  # deferred: see agpctl.cluster

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
        # A trial run again by --resume finds its run's latest checkpoint itself (the worker
        # loop reads the run directory).
        trainer = make_torch_trainer(worker_loop, {"run": cfg.to_dict(), "run_uri": run_uri}, cfg, name=trial_id,
                                     storage_out=runs_uri, callbacks=[TuneReportCallback()])
        trainer.fit()
    except Exception as exc:
        # The driver records this line (Tune's own error files are never read).
        with contextlib.suppress(Exception):
            storage.write_text(error_uri, error_line(exc) + "\n")
        raise


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
        space.grid()  # raises for non-choice dimensions


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
    if cfg.cluster.gpus_per_worker > 0:
        fits = min(fits, float(resources.get("GPU", 0.0)) // (cfg.cluster.workers * cfg.cluster.gpus_per_worker))
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


def read_early_stopped(sweep_uri: str, strict: bool = False) -> set[str]:
    from tuning.schedulers import read_early_stopped as read  # deferred: imports Ray (see agpctl.cluster)

    return read(sweep_uri, strict=strict)


def _run_trials(cfg: RunConfig, space: SearchSpace, settings: SweepSettings, sweep_uri: str,
                todo: list[dict[str, Any]], records: dict[str, dict[str, Any]], view: SweepView) -> None:
    """One Tune run over the planned trials ``todo`` (a grid over their ids), recording
    every trial's progress in agp's records."""
    from ray import tune  # deferred: after the token set-up (see agpctl.cluster)

    with _sweep_ray(cfg.cluster.address), ray_session(cfg.cluster.address) as ray:
        max_concurrent = settings.max_concurrent or default_max_concurrent(cfg, ray.cluster_resources())
        trial_base = cfg
        if cfg.cluster.cpus_per_worker is None:  # auto: concurrent trials share the CPUs (best.yaml keeps auto)
            trial_base = cfg.with_overrides({"cluster.cpus_per_worker": resolve_cpus_per_worker(
                cfg, ray.cluster_resources().get("CPU", 1.0), concurrent_runs=max_concurrent)})
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=trial_base.to_dict(), space_raw=_space_raw(space), method=cfg.method,
                                 sweep_uri=sweep_uri, points={t["id"]: t["params"] for t in todo}),
            {"CPU": 0, "memory": TRIAL_MEMORY_BYTES},
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
            ),
            run_config=tune.RunConfig(
                name=_attempt_name(sweep_uri), storage_path=storage_path, storage_filesystem=fs, verbose=0,
                callbacks=[_sweep_callback(recorder, view)],
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
def _sweep_ray(address: str | None):
    """An embedded Ray whose state API every process can find.

    ASHA stops trials by ending the trial actor; Ray Train then frees the stopped run's
    placement group from a detached cleaner actor that asks Ray's state API whether the
    controller is alive. Without an address that actor looks for "the" local Ray, and on a
    machine running several Ray instances (shared machines, parallel test runs) it fails
    and the stopped trial's CPUs are never released. So the embedded instance gets a
    known dashboard port and every worker is told it. Remote clusters are left alone.
    """
    import ray  # deferred: see agpctl.cluster

    if address_kind(address) != "local" or ray.is_initialized():
        yield
        return
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
    """Trials that ``--resume`` would continue (it also runs failed ones again)."""
    return [t["trial"] for t in trials if t["status"] in ("interrupted", "not started")]


def collect_trials(plan: list[dict[str, Any]], records: dict[str, dict[str, Any]], space: SearchSpace, runs_uri: str,
                   early_stopped: set[str] | None = None, finished: set[str] | None = None) -> list[dict[str, Any]]:
    """One row per planned trial, from agp's records and the run directories: parameters,
    status, epochs, last validation metrics."""
    early_stopped = early_stopped or set()
    finished = finished or set()
    rows = []
    for trial in plan:
        trial_id = trial["id"]
        record = records.get(trial_id) or new_record(trial_id)
        status = trial_outcome(record, trial_id in finished, trial_id in early_stopped)
        row = {
            "trial": trial_id,
            "status": status,
            "epochs": int(record.get("epochs") or 0),
            **{name: _number(record.get(name)) for name in METRIC_FIELDS},
            "params": space.overrides(trial["params"]),
            "run": storage.join(runs_uri, trial_id),
            "seconds": _number(record.get("seconds")),
        }
        if status == "error":
            row["error"] = record.get("error") or "failed"
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
    best = pick_best(trials)
    if best is None:
        errors = [t.get("error") for t in trials if t.get("error")]
        if unfinished_trials(trials) and not errors:
            raise UserError(f"the sweep was interrupted before any trial reported {METRIC}; "
                            f"continue it with: agpctl tune --resume {sweep_uri}")
        if errors:
            known = remote_error(RuntimeError(errors[0]))
            raise known if isinstance(known, UserError) else UserError(
                f"every trial failed; first error: {errors[0]} (trial logs under {sweep_uri})")
        raise UserError(f"no trial reported {METRIC}; see {sweep_uri}")
    best_config_uri = storage.join(sweep_uri, BEST_CONFIG)
    best_cfg = runs.load_run_config(best["run"])
    # A plain training config: written where the sweep's --out pointed, under a fresh name,
    # with the validation mode the user asked for (per-epoch validation was the sweep's).
    best_cfg.storage.out = cfg.storage.out
    best_cfg.storage.name = None
    best_cfg.train.validation = "none"
    storage.write_text(best_config_uri, best_cfg.to_yaml())
    test_metrics = None
    if runs.has_metrics(best["run"]):
        test_metrics = runs.read_metrics(best["run"]).get("mean")
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
    storage.write_text(storage.join(sweep_uri, RESULTS_JSON), runs.to_json({"summary": summary, "trials": trials}))
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


# ---------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------
class SweepView:
    """A live rich table of trials while the sweep runs, the sorted table at the end."""

    def __init__(self, console, space: SearchSpace, sweep_uri: str, quiet: bool = False,
                 objective: str = "synthetic-val", points: dict[str, dict[str, Any]] | None = None) -> None:
        self.console = console or default_console
        self.space = space
        self.sweep_uri = sweep_uri
        self.quiet = quiet
        self.objective = objective
        self.points = points or {}  # agp trial id -> planned values
        self.rows: dict[str, dict[str, Any]] = {}
        self._live = None

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    def warning(self, text: str) -> None:
        print_warning(text)

    def update(self, trial_id: str, status: str, record: dict[str, Any] | None = None) -> None:
        row = self.rows.setdefault(trial_id, {"trial": trial_id})
        row["status"] = status
        try:
            row["params"] = self.space.overrides(self.points[trial_id])
        except (KeyError, IndexError, ValueError, TypeError):
            row.setdefault("params", {})
        if record:
            row["epochs"] = record.get("epochs") or row.get("epochs")
            for key in METRIC_FIELDS:
                if record.get(key) is not None:
                    row[key] = record[key]
        if self._live is not None:
            self._live.update(self.table(list(self.rows.values()), "trials"))

    def live(self):
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
            self.console.print(metrics_table({"mean": best["test"]}, title="test split · best trial only"))
        unfinished = unfinished_trials(outcome.trials)
        if unfinished:
            self.console.print(f"[yellow]{len(unfinished)} trial(s) interrupted or not started;[/] continue the sweep "
                               f"with: agpctl tune --resume {outcome.sweep_uri}")
        self.console.print(f"all trials: [cyan]{storage.join(outcome.sweep_uri, RESULTS_JSON)}[/] and "
                           f"[cyan]{storage.join(outcome.sweep_uri, RESULTS_CSV)}[/]; "
                           f"retrain with: agpctl train --config {outcome.best_config_uri}")


def _sweep_callback(recorder: TrialRecorder, view: SweepView | None):
    from ray.tune import Callback  # deferred: see agpctl.cluster

    class SweepCallback(Callback):
        """Writes agp's trial records and feeds the driver's live table.

        Tune pickles its callbacks with its experiment state, and through Ray Client it runs
        them on the cluster: what travels is the recorder's plain data (the view, a terminal,
        stays behind; ``_sweep_callback_elsewhere`` rebuilds the rest)."""

        def __init__(self, recorder: TrialRecorder, view: SweepView | None) -> None:
            self.recorder = recorder
            self.view = view

        def __reduce__(self):
            r = self.recorder
            return (_sweep_callback_elsewhere, (r.sweep_uri, r.records, r.s3_endpoint))

        def _show(self, trial_id: str, status: str, record: dict[str, Any]) -> None:
            if self.view is not None:
                self.view.update(trial_id, status, record)

        def on_trial_start(self, iteration, trials, trial, **info):
            trial_id = _agp_trial_id(trial)
            self._show(trial_id, "running", self.recorder.started(trial_id))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            trial_id = _agp_trial_id(trial)
            self._show(trial_id, "running", self.recorder.result(trial_id, result))

        def on_trial_complete(self, iteration, trials, trial, **info):
            trial_id = _agp_trial_id(trial)
            record = self.recorder.completed(trial_id, trial_id in read_early_stopped(self.recorder.sweep_uri))
            self._show(trial_id, record["status"], record)

        def on_trial_error(self, iteration, trials, trial, **info):
            _forget_error_pickle(trial)
            trial_id = _agp_trial_id(trial)
            record = self.recorder.errored(trial_id, read_trial_error(self.recorder.sweep_uri, trial_id))
            self._show(trial_id, "error", record)

        def on_experiment_end(self, trials, **info):
            for trial in trials:
                _forget_error_pickle(trial)

    return SweepCallback(recorder, view)


def _sweep_callback_elsewhere(sweep_uri: str, records: dict[str, dict[str, Any]], s3_endpoint: str | None):
    storage.configure_s3(s3_endpoint)
    return _sweep_callback(TrialRecorder(sweep_uri, records, s3_endpoint), None)


def _agp_trial_id(trial) -> str:
    return str((getattr(trial, "config", None) or {}).get(TRIAL_KEY) or trial.trial_id)


def _forget_error_pickle(trial) -> None:
    """Tune's ResultGrid (built when ``Tuner.fit`` returns) unpickles each failed trial's
    error.pkl from the sweep folder; without the file name it reads nothing. agp has the
    error line in its own record already."""
    metadata = getattr(trial, "run_metadata", None)
    if metadata is not None and getattr(metadata, "pickled_error_filename", None):
        metadata.pickled_error_filename = None
        with contextlib.suppress(Exception):
            metadata.invalidate_cache()


def _short(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
