"""A real Ray cluster started with `ray start --head` on 127.0.0.1 (own temp dir and ports):
training submitted through Ray Client (ray://) and through Ray Jobs (http://)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import TINY_AGPNET, agpctl, run_in_process, tiny_config

pytestmark = pytest.mark.slow
CLUSTER_TIMEOUT = 420  # seconds for one agpctl command against the cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head --block` in its own process group; teardown kills that group only."""
    temp_dir = tempfile.mkdtemp(prefix="agpray", dir="/tmp")  # short: Ray puts sockets in here
    gcs, client, dashboard = free_port(), free_port(), free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--ray-client-server-port", str(client), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats",
         "--min-worker-port", "21000", "--max-worker-port", "21999",
         # every port its own, so the fixture never collides with another Ray on this machine
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
         "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
         "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port())],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # like a real cluster node: its `python` is the one with agp's dependencies installed
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    try:
        wait_for_port(dashboard, 90)
        wait_for_port(client, 90)
        yield {"client": f"ray://127.0.0.1:{client}", "jobs": f"http://127.0.0.1:{dashboard}"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)  # `ray start --block` often ignores SIGTERM; waiting longer gains nothing
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_train_through_ray_client(ray_cluster, generated_dataset, tmp_path):
    proc = agpctl("train", "--address", ray_cluster["client"], "--dataset", "mvtec", "--root", generated_dataset,
                  "--epochs", "1", "--out", str(tmp_path), "--name", "client", "--json", *TINY_AGPNET,
                  timeout=CLUSTER_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mean" in json.loads(proc.stdout)["metrics"]
    assert (tmp_path / "client" / "metrics.json").exists()


def test_train_through_ray_jobs_and_list_it(ray_cluster, generated_dataset, tmp_path):
    proc = agpctl("train", "--address", ray_cluster["jobs"], "--dataset", "mvtec", "--root", generated_dataset,
                  "--epochs", "1", "--out", str(tmp_path), "--name", "job", *TINY_AGPNET, timeout=CLUSTER_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "succeeded" in proc.stdout
    assert (tmp_path / "job" / "metrics.json").exists()
    listing = agpctl("jobs", "list", "--address", ray_cluster["jobs"], timeout=CLUSTER_TIMEOUT)
    assert listing.returncode == 0 and "SUCCEEDED" in listing.stdout


def test_unreachable_cluster_is_one_clear_line(tmp_path):
    port = free_port()
    proc = agpctl("train", "--address", f"ray://127.0.0.1:{port}", "--dataset", "synthetic", "--out", str(tmp_path),
                  *TINY_AGPNET, timeout=120)
    assert proc.returncode == 2
    assert "cannot reach Ray" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def tiny_run(generated_dataset, tmp_path_factory) -> str:
    run_uri = str(tmp_path_factory.mktemp("cluster-predict") / "tiny")
    run_in_process(tiny_config(generated_dataset, epochs=1), run_uri)
    return run_uri


def _scores(out: Path) -> dict[str, float]:
    import csv

    with open(out / "predictions.csv") as fh:
        return {row["path"]: float(row["score"]) for row in csv.DictReader(fh)}


def test_predict_through_ray_client_and_ray_jobs(ray_cluster, tiny_run, generated_dataset, tmp_path):
    """The same images scored locally, by 2 tasks on the cluster through Ray Client, and by a
    submitted Ray job (which itself uses 2 tasks) give the same scores."""
    images = os.path.join(generated_dataset, "fabric", "test")
    local = agpctl("predict", images, "--run", tiny_run, "--out", str(tmp_path / "local"), "--recursive", "--no-images",
                   timeout=CLUSTER_TIMEOUT)
    assert local.returncode == 0, local.stderr[-3000:]
    expected = _scores(tmp_path / "local")
    assert len(expected) == 6

    client = agpctl("predict", images, "--run", tiny_run, "--out", str(tmp_path / "client"), "--recursive",
                    "--address", ray_cluster["client"], "--workers", "2", timeout=CLUSTER_TIMEOUT)
    assert client.returncode == 0, client.stderr[-3000:]
    assert "cluster's machines must see these paths" in client.stderr + client.stdout  # local paths: warned
    got = _scores(tmp_path / "client")
    assert got.keys() == expected.keys()
    assert all(abs(got[k] - expected[k]) <= 1e-5 * max(1.0, abs(expected[k])) for k in expected)
    assert len(list((tmp_path / "client" / "heatmaps").rglob("*.png"))) == 6

    job = agpctl("predict", images, "--run", tiny_run, "--out", str(tmp_path / "job"), "--recursive",
                 "--address", ray_cluster["jobs"], "--workers", "2", "--no-images", timeout=CLUSTER_TIMEOUT)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout
    got = _scores(tmp_path / "job")
    assert all(abs(got[k] - expected[k]) <= 1e-5 * max(1.0, abs(expected[k])) for k in expected)


def test_tune_through_ray_client(ray_cluster, generated_dataset, tmp_path):
    """A sweep whose trials (each a Ray Train run) execute on the cluster; the driver and the
    results stay here."""
    space = tmp_path / "space.yaml"
    space.write_text("model.alpha_max: {type: choice, values: [0.5, 1.5]}\n")
    proc = agpctl("tune", "--address", ray_cluster["client"], "--dataset", "mvtec", "--root", generated_dataset,
                  "--epochs", "1", "--samples", "1", "--search", "random", "--scheduler", "fifo", "--space", str(space),
                  "--val-fraction", "0.25", "--out", str(tmp_path), "--name", "sweep", "--json", *TINY_AGPNET,
                  timeout=CLUSTER_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout)
    [trial] = outcome["trials"]  # one trial is enough to prove the path; the local sweeps test the rest
    assert trial["params"]["model.alpha_max"] in (0.5, 1.5) and trial["status"] == "finished"
    assert (tmp_path / "sweep" / "best.yaml").exists()
