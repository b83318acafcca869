"""A sweep's results: one row per planned trial (from agp's records and the trials' run
directories), sorted best first; the best trial; and the files written at the end —
``results.json``, ``results.csv`` and ``best.yaml`` (a plain training config of the best
trial)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from agp_data import storage
from agpctl import runs
from agpctl.config import RunConfig
from agpctl.errors import UserError, remote_error
from agpctl.strict_json import to_json
from tuning.space import SearchSpace
from tuning.state import METRIC, METRIC_FIELDS, SweepSettings, new_record, number_or_none, trial_outcome

RESULTS_JSON, RESULTS_CSV, BEST_CONFIG = "results.json", "results.csv", "best.yaml"


@dataclass
class SweepOutcome:
    sweep_uri: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config_uri: str | None
    warnings: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0


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
            **{name: number_or_none(record.get(name)) for name in METRIC_FIELDS},
            "params": space.overrides(trial["params"]),
            "run": storage.join(runs_uri, trial_id),
            "seconds": number_or_none(record.get("seconds")),
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
        "space": space.to_raw(),
        "epochs": cfg.train.epochs,
        "best": best,
        "best_config": best_config_uri,
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    storage.write_text(storage.join(sweep_uri, RESULTS_JSON), to_json({"summary": summary, "trials": trials}))
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
