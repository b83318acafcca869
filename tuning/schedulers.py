"""ASHA that records which trials it stopped early, and that can start from a sweep's past.

Ray Tune's results do not say why a trial ended before its last epoch: stopped by ASHA, or
cut short when the sweep was interrupted (Ctrl-C). The scheduler writes the agp trial ids it
stopped to ``early_stopped.json`` next to the sweep (plain JSON: a sorted list of ids), so
the results can tell the two apart, also after ``--resume``.

``--resume`` never restores Tune's pickled scheduler state; it builds a new scheduler and
hands it the per-epoch objectives agp recorded (``history``), so trials continued by the
resume are compared with the whole sweep's rungs, not only with each other.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from ray.tune.schedulers import ASHAScheduler

from agp_data import storage
from tuning.state import STOPPED_FILE, agp_trial_id, read_early_stopped

__all__ = ["RecordingASHA", "STOPPED_FILE", "agp_trial_id", "read_early_stopped"]

class RecordingASHA(ASHAScheduler):
    def __init__(self, *args, sweep_uri: str, history: dict[str, list[tuple[int, float]]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sweep_uri = sweep_uri
        # agp trial id -> [(epoch, objective), ...] of earlier runs of the sweep (resume)
        self.history = {trial_id: [(int(e), float(v)) for e, v in points] for trial_id, points in (history or {}).items()}
        self._seeded = False

    def _seed(self) -> None:
        """The recorded objectives into the rungs, once the metric's direction is known
        (Tune sets it after construction). Decisions are ignored: these trials ran already."""
        if self._seeded:
            return
        self._seeded = True
        # ASHA's brackets and rungs are Ray internals: a Ray that changed them gets a plain
        # ASHA over the continued trials (stopping still works, only the earlier rungs are lost).
        brackets = getattr(self, "_brackets", None)
        if not isinstance(brackets, list) or not all(hasattr(b, "on_result") for b in brackets):
            return
        for trial_id, points in self.history.items():
            past = SimpleNamespace(trial_id=trial_id, config={})
            for bracket in brackets:
                for epoch, objective in sorted(points):
                    bracket.on_result(past, epoch, self._metric_op * objective)

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)  # checks metric and mode
        self._seed()
        # A continued trial takes over its recorded rung entries under its new Tune id, so
        # it is not judged again at rungs it already passed.
        agp_id = agp_trial_id(trial)
        if agp_id in self.history and agp_id != trial.trial_id:
            for bracket in getattr(self, "_brackets", None) or []:
                for _milestone, recorded in getattr(bracket, "_rungs", None) or []:
                    if isinstance(recorded, dict) and agp_id in recorded:
                        recorded[trial.trial_id] = recorded.pop(agp_id)

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == self.STOP:
            stopped = read_early_stopped(self.sweep_uri)
            trial_id = agp_trial_id(trial)
            if trial_id not in stopped:
                stopped.add(trial_id)
                storage.write_text(storage.join(self.sweep_uri, STOPPED_FILE), json.dumps(sorted(stopped)))
        return decision

