"""A sweep's own state, plain JSON in its folder: settings, the planned trials, one record per
trial, and which trials ``--resume`` runs again. Importing it loads no Ray.

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
    runs/<id>/            each trial's complete training run (agpctl.runs; metrics.json
                          marks it finished)
    tune/<attempt>/       Ray Tune's own files of each run of the sweep (tuner.pkl,
                          experiment_state-*.json, trial folders): written, never read
    results.json, results.csv, best.yaml   at the end (tuning.results)

Why ``--resume`` never calls ``Tuner.restore``: Tune's state is pickles (``tuner.pkl``, the
cloudpickled trials of its experiment state, error pickles), and a sweep folder may be a
shared ``s3://`` prefix: loading a planted pickle runs its code on the machine that resumes.
agp's state is plain JSON and is checked before use (``load_sweep_state``,
``read_trial_records``). Resume keeps the trials that finished or that ASHA stopped and runs
the others (interrupted, not started, failed) through a new Tuner; an interrupted trial's
worker continues from the newest valid checkpoint of ``runs/<id>/`` by itself. The new
ASHA starts from the recorded per-epoch objectives of the whole sweep. The live callback
(tuning.view) also drops Tune's in-memory reference to a failed trial's error pickle, so the
ResultGrid that ``Tuner.fit`` builds at the end never loads one either.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any

import numpy as np

from agp_data import storage
from agp_data.errors import DataError
from agpctl import runs
from agpctl.config import RunConfig
from agpctl.errors import UserError
from agpctl.strict_json import to_json
from tuning.space import SearchSpace, parse_space

OBJECTIVES = ("synthetic-val", "test")
SCHEDULERS = ("asha", "fifo")
SEARCHES = ("random", "grid")
METRIC = "val/objective"
SWEEP_FILE = "sweep.json"
STATE_VERSION = 2  # sweep.json with planned trials; older sweeps (Tune state only) cannot be resumed
TRIALS_DIR, RUNS_DIR, TUNE_DIR = "trials", "runs", "tune"
STOPPED_FILE = "early_stopped.json"
TRIAL_KEY = "agp_trial"  # the key of a Tune trial's config that holds agp's trial id
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
class SweepState:
    """A sweep as ``sweep.json`` holds it, checked."""
    cfg: RunConfig
    space: SearchSpace
    settings: SweepSettings
    plan: list[dict[str, Any]]  # [{"id": "t0000", "params": {dimension key: value}}, ...]
    source: str


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


# ---------------------------------------------------------------------------------------
# sweep.json
# ---------------------------------------------------------------------------------------
def sweep_state_json(cfg: RunConfig, space: SearchSpace, settings: SweepSettings,
                     plan: list[dict[str, Any]]) -> str:
    return json.dumps({
        "version": STATE_VERSION, "base": cfg.to_dict(), "space": space.to_raw(), "settings": asdict(settings),
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
    storage.write_text(trial_record_uri(sweep_uri, record["id"]), to_json(record) + "\n")


def number_or_none(value: Any) -> float | None:
    """A metric as a float; None for a missing, non-numeric or NaN value."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


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
        record[name] = number_or_none(record[name])
    record["history"] = [[int(e), float(v)] for e, v in history if number_or_none(v) is not None]
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
            value = number_or_none(result.get(f"val/{name}"))
            if value is not None:
                record[name] = value
        objective = number_or_none(result.get(METRIC))
        if objective is not None and isinstance(epoch, (int, float)):
            history = {e: v for e, v in record["history"]}
            history[int(epoch)] = objective
            record["history"] = [[e, history[e]] for e in sorted(history)]
        seconds = number_or_none(result.get("time_total_s"))
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


# ---------------------------------------------------------------------------------------
# each trial's outcome, and what --resume runs
# ---------------------------------------------------------------------------------------
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




def agp_trial_id(trial) -> str:
    """agp's id of a Tune trial (Tune's own id for a trial that carries none)."""
    config = getattr(trial, "config", None) or {}
    return str(config.get(TRIAL_KEY) or trial.trial_id)


def read_early_stopped(sweep_uri: str, strict: bool = False) -> set[str]:
    """The ids ASHA stopped. A missing file is an empty set; an unreadable one is too, or
    with ``strict`` (resume) one clear line naming the file."""
    uri = storage.join(sweep_uri, STOPPED_FILE)
    if not storage.exists(uri):
        return set()
    try:
        data = json.loads(storage.read_text(uri))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        if strict:
            raise UserError(f"{uri}: expected a JSON list of trial ids; delete the file if the sweep used "
                            "--scheduler fifo, or restore it from a backup")
        return set()
    return set(data)


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
