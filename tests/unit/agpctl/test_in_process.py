"""A one-worker run on the embedded Ray is a Ray Train job in local mode: the training loop
runs in the calling process, no Ray instance is started, and the run directory is the same
a worker group leaves (checkpoints included)."""

from __future__ import annotations

import json

import pytest

from agpctl.config import RunConfig
from agpctl.training.launch import launch_training, trains_in_process
from helpers import tiny_config


@pytest.mark.parametrize("overrides, expected", [
    ({}, True),
    ({"cluster.workers": 2}, False),
    ({"cluster.address": "ray://head:10001"}, False),
    ({"cluster.address": "auto"}, False),
    ({"cluster.worker_actor": True}, False),
    ({"cluster.dashboard": True}, False),
    ({"cluster.max_failures": 1}, False),
])
def test_only_a_plain_one_worker_local_run_trains_in_process(overrides, expected):
    assert trains_in_process(RunConfig().with_overrides(overrides)) is expected


def test_a_local_run_trains_in_this_process_without_starting_ray(generated_dataset, tmp_path, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("a one-worker local run must not start Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    cfg = tiny_config(generated_dataset, epochs=3).with_overrides({
        "storage.out": str(tmp_path), "storage.name": "local", "train.keep_checkpoints": 2})
    outcome = launch_training(cfg, quiet=True)
    run_dir = tmp_path / "local"
    assert outcome["run"] == str(run_dir)
    assert not ray.is_initialized()
    # Checkpoints written by the loop itself, the oldest beyond keep_checkpoints removed.
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch-*")) == ["checkpoint_epoch-0002",
                                                                        "checkpoint_epoch-0003"]
    assert (run_dir / "metrics.json").exists() and len((run_dir / "history.jsonl").read_text().splitlines()) == 3
    assert outcome["metrics"]["mean"]["i_auroc"] is not None

    # As if stopped after epoch 2: --resume continues from there in this process too. Had a
    # worker group started the run, its Ray Train checkpoint list is dropped as stale.
    import shutil

    from agpctl import runs

    shutil.rmtree(run_dir / "checkpoint_epoch-0003")
    (run_dir / "metrics.json").unlink()
    snapshot = run_dir / runs.RAY_CHECKPOINT_SNAPSHOT
    snapshot.write_text('{"checkpoint_results": []}')
    resumed = launch_training(tiny_config(generated_dataset), resume=str(run_dir), quiet=True)
    assert resumed["run"] == str(run_dir) and (run_dir / "metrics.json").exists()
    assert (run_dir / "checkpoint_epoch-0003").is_dir()
    assert not snapshot.exists()
    assert [json.loads(line)["epoch"] for line in (run_dir / "history.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_broken_progress_display_does_not_stop_the_run(generated_dataset, tmp_path, monkeypatch, capsys):
    from agpctl.training.progress import ProgressView

    def broken(self, event, progress, state):
        raise RuntimeError("terminal went away")

    monkeypatch.setattr(ProgressView, "_render", broken)
    cfg = tiny_config(generated_dataset, epochs=1).with_overrides({"storage.out": str(tmp_path), "storage.name": "r"})
    outcome = launch_training(cfg, quiet=True)
    assert (tmp_path / "r" / "metrics.json").exists() and outcome["metrics"]
    err = " ".join(capsys.readouterr().err.split())
    assert "the progress display stopped: terminal went away" in err


def test_saving_a_checkpoint_prunes_the_oldest_beyond_keep(tmp_path):
    from agpctl import runs

    run = tmp_path / "run"
    run.mkdir()
    for epoch in (1, 2, 3):
        runs.save_checkpoint(str(run), {"epoch": epoch, "model": {}}, epoch, keep=2)
    assert [epoch for epoch, _ in runs.list_checkpoints(str(run))] == [2, 3]
    assert runs.load_latest_checkpoint(str(run)).payload["epoch"] == 3
