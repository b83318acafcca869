"""A sweep trial without a sweep: what it reserves, and how a one-worker trial hands its
reports to Tune and its checkpoints to the run directory (tuning.trial)."""

from __future__ import annotations

import pytest

from agpctl import checkpoint as ckpt
from agpctl import runs
from agpctl.config import RunConfig
from tuning.trial import CHECKPOINT_PATH_KEY, TRIAL_MEMORY_BYTES, TuneReporter, trains_in_trial, trial_resources


def resolved(workers: int, cpus: float = 2.0, gpus: float = 0.0) -> RunConfig:
    return RunConfig().with_overrides({"cluster.workers": workers, "cluster.cpus_per_worker": cpus,
                                       "cluster.gpus_per_worker": gpus})


def test_a_one_worker_trial_is_the_worker_and_reserves_its_resources():
    assert trains_in_trial(resolved(1))
    assert trial_resources(resolved(1, cpus=2.0)) == {"CPU": 2.0}
    assert trial_resources(resolved(1, cpus=1.0, gpus=0.5)) == {"CPU": 1.0, "GPU": 0.5}


def test_a_multi_worker_trial_waits_on_its_worker_group_and_reserves_no_cpu():
    assert not trains_in_trial(resolved(2))
    assert trial_resources(resolved(2)) == {"CPU": 0, "memory": TRIAL_MEMORY_BYTES}


def test_worker_actor_gives_a_one_worker_trial_a_worker_group_too():
    cfg = resolved(1).with_overrides({"cluster.worker_actor": True})
    assert not trains_in_trial(cfg)
    assert trial_resources(cfg) == {"CPU": 0, "memory": TRIAL_MEMORY_BYTES}


@pytest.fixture
def tune_reports(monkeypatch) -> list[dict]:
    """``ray.tune.report`` replaced by a list of what it was given."""
    from ray import tune

    reported: list[dict] = []
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reported.append(dict(metrics)))
    return reported


def test_reports_keep_the_newest_checkpoints_and_name_them(tmp_path, tune_reports):
    run_uri = str(tmp_path / "t0000")
    report = TuneReporter(run_uri, keep=2)
    for epoch in (1, 2, 3):
        report({"epoch": epoch, "val/objective": 0.5 + epoch / 10}, {"epoch": epoch, "weights": [epoch]}, epoch)
    report({"epoch": 3, "final": 1, "val/objective": 0.8}, None, None)

    assert [epoch for epoch, _ in runs.list_checkpoints(run_uri)] == [2, 3]
    latest = runs.load_latest_checkpoint(run_uri)
    assert latest.epoch == 3 and latest.payload["weights"] == [3]
    assert [r["epoch"] for r in tune_reports] == [1, 2, 3, 3]
    assert tune_reports[2][CHECKPOINT_PATH_KEY] == str(tmp_path / "t0000" / ckpt.checkpoint_dir_name(3))
    assert CHECKPOINT_PATH_KEY not in tune_reports[3] and tune_reports[3]["final"] == 1


def test_a_checkpoint_is_on_disk_before_tune_hears_of_it(tmp_path, monkeypatch):
    """ASHA may end the trial on any report: the epoch it reports must be resumable then."""
    from ray import tune

    run_uri = str(tmp_path / "t0001")
    seen: list[list[int]] = []
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: seen.append(
        [epoch for epoch, _ in runs.list_checkpoints(run_uri)]))
    TuneReporter(run_uri, keep=1)({"epoch": 1}, {"epoch": 1}, 1)
    assert seen == [[1]]
