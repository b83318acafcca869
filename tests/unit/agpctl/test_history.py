"""A run's training history: history.jsonl (one line per epoch, resume-safe, corrupt lines
skipped), TensorBoard event files, and the one-line errors of a missing tracking package."""

from __future__ import annotations

import json
import sys
from datetime import datetime

import pytest
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agp_data import storage
from agpctl import runs
from agpctl.cli import cli
from agpctl.config import RunConfig
from agpctl.training.tracking import TensorBoardTracker
from helpers import run_in_process, tiny_config

RECORD_KEYS = {"epoch", "loss", "losses", "lr", "images_per_s", "seconds", "val", "time"}


@pytest.fixture(scope="module")
def tracked_run(generated_dataset, tmp_path_factory):
    """A 3-epoch run with per-epoch validation and TensorBoard, trained once for the module."""
    cfg = tiny_config(generated_dataset, epochs=3).with_overrides(
        {"train.validation": "synthetic", "train.tensorboard": True})
    run_uri = str(tmp_path_factory.mktemp("history") / "tiny")
    return cfg, run_uri, run_in_process(cfg, run_uri)


def scalars(logdir: str, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(logdir)
    events.Reload()
    assert tag in events.Tags()["scalars"], events.Tags()["scalars"]
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_history_has_one_documented_line_per_epoch(tracked_run):
    cfg, run_uri, run = tracked_run
    lines = storage.read_text(storage.join(run_uri, runs.HISTORY_FILE)).splitlines()
    history = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for record, report in zip(history, run.reports):  # an epoch's report holds the same numbers
        assert set(record) == RECORD_KEYS
        assert record["loss"] == pytest.approx(report["train/loss"])
        assert record["losses"] == pytest.approx({k[len("train/"):]: v for k, v in report.items()
                                                  if k.startswith("train/")})
        assert record["lr"] > 0 and record["seconds"] > 0
        assert set(record["val"]) == {"i_auroc", "p_auroc", "pro", "objective"}
        assert record["val"]["objective"] == pytest.approx(report["val/objective"])
        assert datetime.fromisoformat(record["time"]).tzinfo is not None
    summary = runs.read_json(storage.join(run_uri, runs.SUMMARY_FILE))
    first = history[0]
    assert first["images_per_s"] == pytest.approx(summary["train_images"] / first["seconds"], rel=1e-6)
    assert runs.read_history(run_uri) == history


def test_history_without_validation_has_no_val_key(generated_dataset, tmp_path):
    run_uri = str(tmp_path / "plain")
    # Synthetic validation is the default since #15: this run switches it off.
    run_in_process(tiny_config(generated_dataset, epochs=1).with_overrides({"train.validation": "none"}), run_uri)
    (record,) = runs.read_history(run_uri)
    assert set(record) == RECORD_KEYS - {"val"}
    assert not storage.exists(storage.join(run_uri, runs.TENSORBOARD_DIR))  # off unless asked for


def test_validate_every_k_epochs_and_always_the_last(generated_dataset, tmp_path):
    run_uri = str(tmp_path / "every2")
    cfg = tiny_config(generated_dataset, epochs=3).with_overrides({"train.validate_every": 2})
    run = run_in_process(cfg, run_uri)
    history = runs.read_history(run_uri)
    assert ["val" in record for record in history] == [False, True, True]  # epoch 2, and 3 (the last)
    assert all(0.0 <= history[1]["val"][name] <= 1.0 for name in ("i_auroc", "p_auroc"))
    # Between validations the last metrics travel on in the reports (a sweep needs its metric).
    assert "val/objective" not in run.reports[0] and run.reports[1]["val/objective"] == history[1]["val"]["objective"]


def test_resume_replaces_the_epochs_it_trains_again(tracked_run, tmp_path):
    # A run stopped after writing epoch 3's line but resumed from epoch 1's checkpoint trains
    # epochs 2 and 3 again: their lines are replaced, never duplicated; epoch 1's is kept.
    cfg, run_uri, run = tracked_run
    copy = str(tmp_path / "copy")
    storage.download_dir(run_uri, copy)
    before = storage.read_text(storage.join(copy, runs.HISTORY_FILE)).splitlines()
    run_in_process(cfg, copy, resume_payload=run.payloads[1])
    after = storage.read_text(storage.join(copy, runs.HISTORY_FILE)).splitlines()
    assert [json.loads(line)["epoch"] for line in after] == [1, 2, 3]
    assert after[0] == before[0]
    # TensorBoard hides the events the first attempt logged from epoch 2 on.
    assert [step for step, _ in scalars(storage.join(copy, runs.TENSORBOARD_DIR), "loss")] == [1, 2, 3]


def test_tensorboard_holds_the_epoch_scalars_and_the_test_table(tracked_run):
    _, run_uri, _ = tracked_run
    logdir = storage.join(run_uri, runs.TENSORBOARD_DIR)
    history = runs.read_history(run_uri)
    loss = scalars(logdir, "loss")
    assert [step for step, _ in loss] == [1, 2, 3]
    assert [value for _, value in loss] == pytest.approx([r["loss"] for r in history], rel=1e-6)
    assert [step for step, _ in scalars(logdir, "val/objective")] == [1, 2, 3]
    assert {"lr", "images_per_s"} <= set(EventAccumulator(logdir).Reload().Tags()["scalars"])
    mean = runs.read_metrics(run_uri)["mean"]
    ((step, value),) = scalars(logdir, "test/i_auroc")
    assert step == 3 and value == pytest.approx(mean["i_auroc"], rel=1e-6)


def test_a_corrupt_line_is_skipped_with_a_warning(tmp_path):
    run_uri = str(tmp_path)
    good = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4}]
    storage.write_text(storage.join(run_uri, runs.HISTORY_FILE),
                       json.dumps(good[0]) + "\n{\"epoch\": 2, \"lo\n" + '["no", "epoch"]\n' + json.dumps(good[1]) + "\n")
    with pytest.warns(UserWarning) as caught:
        assert runs.read_history(run_uri) == good
    assert [str(w.message).split(runs.HISTORY_FILE + " ")[1] for w in caught] == [
        "line 2 is not a history record (JSON with an integer epoch); skipped",
        "line 3 is not a history record (JSON with an integer epoch); skipped"]
    seen: list[str] = []
    assert runs.read_history(run_uri, warn=seen.append) == good
    assert len(seen) == 2 and "line 3" in seen[1]


def test_append_drops_later_epochs_and_keeps_what_it_cannot_read(tmp_path):
    run_uri = str(tmp_path)
    path = storage.join(run_uri, runs.HISTORY_FILE)
    for epoch in (1, 2, 3):
        runs.append_history(run_uri, {"epoch": epoch, "loss": float(epoch)})
    storage.write_text(path, storage.read_text(path) + "not json\n")
    runs.append_history(run_uri, {"epoch": 2, "loss": float("nan")})
    lines = storage.read_text(path).splitlines()
    assert lines == ['{"epoch": 1, "loss": 1.0}', "not json", '{"epoch": 2, "loss": null}']


def test_history_on_s3_is_appended_and_read_back(s3_bucket):
    run_uri = f"s3://{s3_bucket}/runs/tiny"
    assert runs.read_history(run_uri) == []
    for epoch in (1, 2, 1):
        runs.append_history(run_uri, {"epoch": epoch, "loss": 1.0 / epoch})
    assert runs.read_history(run_uri) == [{"epoch": 1, "loss": 1.0}]


def test_tensorboard_of_an_s3_run_is_uploaded_every_epoch(s3_bucket, agp_cache_dir, tmp_path):
    run_uri = f"s3://{s3_bucket}/runs/tiny"
    tracker = TensorBoardTracker(run_uri, start_epoch=0)
    tracker.log_epoch({"epoch": 1, "loss": 0.25, "losses": {"loss": 0.25}, "lr": 1e-3, "images_per_s": 9.0,
                       "seconds": 2.0})
    uploaded = storage.list_files(storage.join(run_uri, runs.TENSORBOARD_DIR))
    assert len(uploaded) == 1 and "tfevents" in uploaded[0]
    tracker.close()
    local = str(tmp_path / "read-back")
    storage.download_dir(storage.join(run_uri, runs.TENSORBOARD_DIR), local)
    assert scalars(local, "loss") == [(1, 0.25)]


def test_resume_takes_tracking_flags_from_the_command_line(tmp_path):
    run_uri = str(tmp_path / "run")
    runs.write_run_config(run_uri, RunConfig())
    cli_cfg = RunConfig().with_overrides({"train.tensorboard": True, "train.mlflow": "http://mlflow:5000",
                                          "train.epochs": 99})
    resumed = runs.resume_config(run_uri, cli_cfg)
    assert resumed.train.tensorboard and resumed.train.mlflow == "http://mlflow:5000"
    assert resumed.train.epochs == RunConfig().train.epochs  # what to train stays the saved run's


@pytest.mark.parametrize("flag, module, message", [
    (["--mlflow", "http://127.0.0.1:1"], "mlflow",
     "--mlflow needs the mlflow package: pip install 'agp[mlflow]'"),
    (["--tensorboard"], "tensorboardX",
     "--tensorboard needs the tensorboardX package: pip install 'agp[tensorboard]'"),
])
def test_a_missing_tracking_package_is_one_line_before_ray(flag, module, message, generated_dataset, tmp_path,
                                                           monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    monkeypatch.setattr("agpctl.training.launch.ray_session", lambda *a, **k: pytest.fail("Ray was started"))
    result = CliRunner().invoke(cli, ["train", "--dataset", "mvtec", "--root", generated_dataset,
                                      "--out", str(tmp_path), *flag])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {message}"
    assert not list(tmp_path.iterdir())


def test_an_unreachable_mlflow_server_is_one_line_before_ray(generated_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr("agpctl.training.launch.ray_session", lambda *a, **k: pytest.fail("Ray was started"))
    result = CliRunner().invoke(cli, ["train", "--dataset", "mvtec", "--root", generated_dataset,
                                      "--out", str(tmp_path), "--mlflow", "http://127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: --mlflow http://127.0.0.1:1: no server answers there")
    assert len(result.output.strip().splitlines()) == 1
