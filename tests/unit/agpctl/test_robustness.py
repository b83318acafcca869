"""Faults a user meets without Ray: unreadable checkpoints, folders that cannot be listed,
predict writing into its own input, a missing optional package, SIGTERM, Ray's noise."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time

import pytest
from click.testing import CliRunner

import helpers
from agp_data import storage
from agpctl import checkpoint as ckpt
from agpctl import runs
from agpctl.cli import cli
from agpctl.cli.run_flags import config_from_options
from agpctl.cluster.connect import TOKEN_SETUP_LOGGER, Terminated, sigterm_as_interrupt, silence_token_announcement
from agpctl.training.worker import latest_payload


@pytest.fixture(scope="module")
def two_epoch_run(generated_dataset, tmp_path_factory) -> str:
    run_uri = str(tmp_path_factory.mktemp("robust-runs") / "tiny")
    helpers.run_in_process(helpers.tiny_config(generated_dataset, epochs=2), run_uri)
    return run_uri


@pytest.fixture
def truncated_copy(two_epoch_run, tmp_path) -> str:
    """The run with its newest checkpoint cut in half, as a crash mid-copy leaves it."""
    copy = str(tmp_path / "copy")
    shutil.copytree(two_epoch_run, copy)
    newest = os.path.join(copy, ckpt.checkpoint_dir_name(2), ckpt.CHECKPOINT_FILE)
    data = open(newest, "rb").read()
    open(newest, "wb").write(data[: len(data) // 2])
    return copy


def test_eval_skips_a_truncated_checkpoint_and_says_which_epoch_it_evaluates(truncated_copy):
    result = CliRunner().invoke(cli, ["eval", "--run", truncated_copy])
    assert result.exit_code == 0, result.output
    assert "evaluating epoch 1" in result.output
    assert f"skipped unreadable checkpoint {os.path.join(truncated_copy, ckpt.checkpoint_dir_name(2))}" in result.output


def test_a_truncated_checkpoint_from_ray_is_skipped_on_resume(truncated_copy):
    class FakeRayCheckpoint:  # what Ray hands a restarted worker: the truncated newest one
        path = os.path.join(truncated_copy, ckpt.checkpoint_dir_name(2))

        def as_directory(self):
            import contextlib

            return contextlib.nullcontext(self.path)

    warnings: list[str] = []
    payload = latest_payload(FakeRayCheckpoint(), truncated_copy, warn=warnings.append)
    assert payload is not None and payload["epoch"] == 1
    assert warnings == [f"skipped unreadable checkpoint {FakeRayCheckpoint.path}"]


def test_a_run_without_checkpoints_is_discarded_but_one_with_checkpoints_is_kept(two_epoch_run, tmp_path):
    fresh = tmp_path / "fresh"
    (fresh / "cat").mkdir(parents=True)
    (fresh / runs.CONFIG_FILE).write_text("method: agpnet\n")
    (fresh / "cat" / runs.CONFIG_FILE).write_text("method: agpnet\n")
    assert runs.discard_if_unstarted(str(fresh)) is True
    assert not runs.has_run_config(str(fresh)) and not runs.has_run_config(str(fresh / "cat"))
    before = sorted(os.listdir(two_epoch_run))
    assert runs.discard_if_unstarted(two_epoch_run) is False
    assert sorted(os.listdir(two_epoch_run)) == before


def test_predict_skips_a_symlink_loop_and_lists_it(trained_run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    helpers.write_predict_inputs(images)
    loop = images / "loop.png"
    os.symlink(loop, loop)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict", str(images), "--run", trained_run, "--out", str(out), "--recursive",
                                      "--threshold", "0.5", "--no-images"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "predictions.json").read_text())
    assert str(loop) in [item["path"] for item in saved["skipped"]]
    assert len(saved["predictions"]) == len(helpers.PREDICT_INPUTS)


def test_predict_never_scores_its_own_output_inside_the_input(trained_run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    helpers.write_predict_inputs(images)
    out = images / "results"
    for _ in range(2):  # the second run finds the first run's heatmaps inside the input
        result = CliRunner().invoke(cli, ["predict", str(images), "--run", trained_run, "--out", str(out),
                                          "--recursive", "--threshold", "0.5"])
        assert result.exit_code == 0, result.output
        rows = helpers.read_csv(str(out / "predictions.csv"))
        assert len(rows) == len(helpers.PREDICT_INPUTS)
        assert not any("/results/" in row["path"] for row in rows)


def test_export_without_onnx_names_the_install_command(trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now fails as if not installed
    result = CliRunner().invoke(cli, ["export", "--run", trained_run, "--format", "onnx",
                                      "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert "pip install 'agp[export]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_config_on_s3_is_read_through_the_given_endpoint(s3_server, s3_bucket, monkeypatch):
    storage.configure_s3(None)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only --s3-endpoint says where the store is
    storage.configure_s3(s3_server)
    storage.write_text(f"s3://{s3_bucket}/run.yaml", "method: rlr\ntrain:\n  epochs: 3\n")
    storage.configure_s3(None)
    try:
        cfg = config_from_options({"config_path": f"s3://{s3_bucket}/run.yaml", "s3_endpoint": s3_server})
    finally:
        storage.configure_s3(None)
    assert cfg.method == "rlr" and cfg.train.epochs == 3


def test_sigterm_becomes_a_keyboard_interrupt_while_ray_runs():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts the sleep at once; reaching the end fails the test
    assert signal.getsignal(signal.SIGTERM) == before
    assert issubclass(Terminated, KeyboardInterrupt)  # every Ctrl-C path handles it


def test_rays_token_announcement_is_silenced_and_other_warnings_are_not(caplog):
    silence_token_announcement()
    logger = logging.getLogger(TOKEN_SETUP_LOGGER)
    with caplog.at_level(logging.WARNING, logger=TOKEN_SETUP_LOGGER):
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        logger.warning("the token file could not be read")
    assert [r.getMessage() for r in caplog.records] == ["the token file could not be read"]


def test_workers_that_never_fit_fail_in_one_line_and_a_growing_cluster_is_waited_for(monkeypatch):
    from agpctl.config import RunConfig
    from agpctl.errors import UserError
    from agpctl.training import launch

    cfg = RunConfig().with_overrides({"cluster.workers": 3, "cluster.cpus_per_worker": 1.0})
    with pytest.raises(UserError, match=r"3 worker\(s\) × 1 CPU need 3, the Ray cluster has 2; lower --workers"):
        launch.check_fits_cluster(cfg, lambda: {"CPU": 2.0})
    monkeypatch.setattr(launch.time, "sleep", lambda seconds: None)
    totals = iter([{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 4.0}])  # an autoscaler adds a node
    launch.check_fits_cluster(cfg, lambda: next(totals), wait_s=60)
