"""What a sweep shows while it runs: the live rich table of trials (sorted at the end), and the
Tune callback that turns Tune's trial events into agp's trial records and rows of that table.

The callback also drops Tune's in-memory reference to a failed trial's error pickle, so the
ResultGrid that ``Tuner.fit`` builds at the end never loads one (tuning.state says why).
"""

from __future__ import annotations

import contextlib
from typing import Any

from rich.live import Live
from rich.table import Table

from agp_data import storage
from agpctl.console import console as default_console
from agpctl.console import print_warning
from agpctl.tables import format_percent, metrics_table
from tuning.results import RESULTS_CSV, RESULTS_JSON, SweepOutcome, unfinished_trials
from tuning.space import SearchSpace
from tuning.state import METRIC, METRIC_FIELDS, TrialRecorder, agp_trial_id, read_early_stopped, read_trial_error


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


def sweep_callback(recorder: TrialRecorder, view: SweepView | None):
    """The Tune callback of a sweep: records every trial event and shows it in ``view``."""
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
            trial_id = agp_trial_id(trial)
            self._show(trial_id, "running", self.recorder.started(trial_id))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            trial_id = agp_trial_id(trial)
            self._show(trial_id, "running", self.recorder.result(trial_id, result))

        def on_trial_complete(self, iteration, trials, trial, **info):
            trial_id = agp_trial_id(trial)
            record = self.recorder.completed(trial_id, trial_id in read_early_stopped(self.recorder.sweep_uri))
            self._show(trial_id, record["status"], record)

        def on_trial_error(self, iteration, trials, trial, **info):
            _forget_error_pickle(trial)
            trial_id = agp_trial_id(trial)
            record = self.recorder.errored(trial_id, read_trial_error(self.recorder.sweep_uri, trial_id))
            self._show(trial_id, "error", record)

        def on_experiment_end(self, trials, **info):
            for trial in trials:
                _forget_error_pickle(trial)

    return SweepCallback(recorder, view)


def _sweep_callback_elsewhere(sweep_uri: str, records: dict[str, dict[str, Any]], s3_endpoint: str | None):
    storage.configure_s3(s3_endpoint)
    return sweep_callback(TrialRecorder(sweep_uri, records, s3_endpoint), None)


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
