"""`agpctl train` stopped and resumed as users do it, as real Ray Train jobs: a relative
`--resume runs/<run>` (the form the README shows), a truncated newest checkpoint, and SIGTERM
(what `timeout`, Kubernetes and Slurm send)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest

import helpers

pytestmark = pytest.mark.slow

TINY = [*helpers.TINY_AGPNET, "--dataset", "mvtec", "--val-fraction", "0.25"]


@pytest.fixture(scope="module")
def workdir(generated_dataset, tmp_path_factory):
    """A user's working directory holding a 2-epoch run made with relative paths."""
    base = tmp_path_factory.mktemp("stop-resume")
    shutil.copytree(generated_dataset, base / "data")
    proc = helpers.agpctl("train", "--root", "data", "--epochs", "2", "--out", "runs", "--name", "r", "--quiet",
                          *TINY, cwd=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (base / "runs" / "r" / "metrics.json").exists()
    return base


def test_relative_resume_writes_its_results_into_the_run(workdir):
    run = workdir / "runs" / "r"
    for name in ("metrics.json", "summary.json", "thresholds.json"):
        (run / name).unlink()
    proc = helpers.agpctl("train", "--resume", "runs/r", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["run"] == str(run)
    for name in ("metrics.json", "summary.json", "thresholds.json"):
        assert (run / name).exists(), name


def test_resume_skips_a_truncated_newest_checkpoint(workdir):
    copy = workdir / "runs" / "cut"
    shutil.copytree(workdir / "runs" / "r", copy)
    (copy / "metrics.json").unlink()
    newest = copy / "checkpoint_epoch-0002" / "model.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    proc = helpers.agpctl("train", "--resume", "runs/cut", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped unreadable checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert (copy / "metrics.json").exists()
    assert json.loads((copy / "summary.json").read_text())["epochs"] == 2


def test_sigterm_stops_training_like_ctrl_c_and_keeps_the_checkpoints(workdir):
    # Far more epochs than it can train before the signal: a tiny epoch takes a fraction of a
    # second in this process, and older checkpoints are pruned as newer ones are saved.
    command = [*helpers.AGPCTL, "train", "--root", "data", "--epochs", "100000", "--out", "runs", "--name", "long",
               *TINY]
    proc = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = workdir / "runs" / "long"
    deadline = time.monotonic() + 240
    while not list(run.glob("checkpoint_epoch-*/model.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not list(run.glob("checkpoint_epoch-*/model.pt")):
        proc.kill()
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"no checkpoint appeared (exit {proc.returncode}): {err[-3000:]}")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM" in err and "--resume" in err
    assert "Traceback" not in err and "*** SIGTERM received" not in err and "Aborted" not in err
    saved = sorted(p.name for p in (workdir / "runs" / "long").glob("checkpoint_epoch-*"))
    assert saved, "the checkpoints were lost"
    assert not (workdir / "runs" / "long" / "metrics.json").exists()
