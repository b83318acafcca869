"""A training worker killed mid-run: Ray Train restarts the worker group from the last
valid checkpoint (--max-failures) and the run finishes with the full epoch count. Then a
finished run is resumed with more epochs through `--resume`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import AGPCTL, TINY_AGPNET, agpctl

pytestmark = pytest.mark.slow
EPOCHS = 8  # ~2 s each on a worker: the kill lands mid-run with room to spare (polled every 50 ms)
# A one-worker local run trains in the agpctl process, a tiny epoch in a fraction of a second:
# enough epochs after the third that the kill still lands mid-run.
INTERRUPTED_EPOCHS = 40


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), so we only ever touch what this test started."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def faulty_run(generated_dataset, tmp_path_factory):
    return tmp_path_factory.mktemp("fault") / "faulty"


def test_killed_worker_restarts_from_checkpoint_and_finishes(generated_dataset, faulty_run):
    run_dir = faulty_run
    tmp_path = run_dir.parent
    proc = subprocess.Popen(
        [*AGPCTL, "train", "--dataset", "mvtec", "--root", generated_dataset,
         "--epochs", str(EPOCHS), "--max-failures", "2", "--out", str(tmp_path), "--name", "faulty", *TINY_AGPNET],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "checkpoint_epoch-0002" / "model.pt").exists():
            workers = [p for p in descendants(proc.pid) if "RayTrainWorker" in command_line(p)]
            if workers:
                os.kill(workers[0], signal.SIGKILL)
                killed = workers[0]
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=400)
    assert killed is not None, "the run ended before a worker could be killed"
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from epoch" in stdout, stdout
    summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
    assert summary["epochs"] == EPOCHS
    assert (run_dir / f"checkpoint_epoch-{EPOCHS:04d}" / "model.pt").exists()


def test_resume_continues_an_interrupted_run_to_the_same_epoch_count(generated_dataset, tmp_path):
    """Interrupt a run for real (SIGKILL the driver and every process it started), resume it."""
    run_dir = tmp_path / "interrupted"
    command = [*AGPCTL, "train", "--dataset", "mvtec", "--root", generated_dataset,
               "--epochs", str(INTERRUPTED_EPOCHS), "--out", str(tmp_path), "--name", "interrupted", *TINY_AGPNET]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoint_epoch-0003" / "model.pt").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    assert not (run_dir / "metrics.json").exists()

    resumed = agpctl("train", "--resume", str(run_dir), timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "epoch 1/" not in resumed.stdout
    assert f"epoch {INTERRUPTED_EPOCHS}/{INTERRUPTED_EPOCHS}" in resumed.stdout
    summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
    assert summary["epochs"] == INTERRUPTED_EPOCHS
