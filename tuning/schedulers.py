"""ASHA that records which trials it stopped early.

Ray Tune's results do not say why a trial ended before its last epoch: stopped by ASHA, or
cut short when the sweep was interrupted (Ctrl-C). The scheduler writes the ids it stopped
next to the sweep, so the results can tell the two apart, also after ``--resume``.
"""

from __future__ import annotations

import json

from ray.tune.schedulers import ASHAScheduler

from agp_data import storage

STOPPED_FILE = "early_stopped.json"


def read_early_stopped(sweep_uri: str) -> set[str]:
    uri = storage.join(sweep_uri, STOPPED_FILE)
    try:
        return set(json.loads(storage.read_text(uri))) if storage.exists(uri) else set()
    except (OSError, ValueError):
        return set()


class RecordingASHA(ASHAScheduler):
    def __init__(self, *args, sweep_uri: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.sweep_uri = sweep_uri

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == self.STOP:
            stopped = read_early_stopped(self.sweep_uri)
            if trial.trial_id not in stopped:
                stopped.add(trial.trial_id)
                storage.write_text(storage.join(self.sweep_uri, STOPPED_FILE), json.dumps(sorted(stopped)))
        return decision
