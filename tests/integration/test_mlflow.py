"""--mlflow against a real MLflow tracking server (`mlflow server` on 127.0.0.1, SQLite
backend in a temp dir): the worker's code path logs params, per-epoch metrics and the test
table, and a resumed run continues the same MLflow run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from agp_data import storage
from agpctl import runs
from agpctl.distributed import WorkerContext
from agpctl.training.progress import ProgressSender
from agpctl.training.tracking import check_tracking
from agpctl.training.worker import RunSpec, train_on_worker
from helpers import InProcessRun, tiny_config

pytestmark = pytest.mark.slow
SERVER_START_TIMEOUT = 180  # seconds; measured 14-30 s on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(uri: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {uri} not healthy after {timeout}s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` in its own process group; teardown stops that group (server and its
    uvicorn workers) only."""
    root = tmp_path_factory.mktemp("mlflow")
    log = root / "server.log"
    uri = f"http://127.0.0.1:{free_port()}"
    port = uri.rsplit(":", 1)[1]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", port,
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--default-artifact-root", str(root / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
            # no background job runner (a dozen processes this test never uses)
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    try:
        wait_until_healthy(uri, proc, SERVER_START_TIMEOUT, log)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


class Stop(Exception):
    """Stands for an interruption right after a checkpoint."""


class Warnings(ProgressSender):
    """The worker's progress channel, keeping only its warnings."""

    def __init__(self):
        super().__init__(None, enabled=False)
        self.lines: list[str] = []

    def warning(self, text: str) -> None:
        self.lines.append(text)


def train(cfg, run_uri: str, resume_payload=None, stop_after: int | None = None) -> InProcessRun:
    """The worker's own code path in this process (as helpers.run_in_process), optionally
    stopped after the checkpoint of epoch ``stop_after``; a tracking warning fails the test."""
    if resume_payload is None:
        runs.write_run_config(run_uri, cfg)
    run, progress = InProcessRun(run_uri), Warnings()

    def report(metrics, payload, epoch):
        run.report(metrics, payload, epoch)
        if epoch is not None and epoch == stop_after and "final" not in metrics:
            raise Stop

    try:
        train_on_worker(RunSpec(cfg, run_uri), WorkerContext(), lambda m: m, report, progress, resume_payload)
    except Stop:
        pass
    assert not [line for line in progress.lines if "tracking" in line or "MLflow" in line]
    return run


def mlflow_run_id(run_uri: str) -> str:
    return runs.read_tracking(run_uri)["mlflow"]["run_id"]


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def test_a_run_logs_params_every_epoch_and_the_test_table(mlflow_server, generated_dataset, tmp_path):
    cfg = tiny_config(generated_dataset, epochs=3).with_overrides({"train.mlflow": mlflow_server,
                                                                  "storage.name": "logged"})
    check_tracking(cfg)  # the driver's check: this server answers
    run_uri = str(tmp_path / "logged")
    train(cfg, run_uri)
    client = MlflowClient(tracking_uri=mlflow_server)
    logged = client.get_run(mlflow_run_id(run_uri))
    assert logged.info.status == "FINISHED" and logged.info.run_name == "logged"
    assert logged.data.params["method"] == "agpnet" and logged.data.params["train.epochs"] == "3"
    assert logged.data.params["model.backbone.name"] == "resnet18"
    loss = sorted(client.get_metric_history(logged.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == [1, 2, 3]
    assert [m.value for m in loss] == pytest.approx([r["loss"] for r in runs.read_history(run_uri)])
    assert steps(client, logged.info.run_id, "lr") == [1, 2, 3]
    table = runs.read_metrics(run_uri)
    assert logged.data.metrics["test/i_auroc"] == pytest.approx(table["mean"]["i_auroc"])
    for category in runs.category_rows(table):
        assert logged.data.metrics[f"test/{category}/i_auroc"] == pytest.approx(table[category]["i_auroc"])


def test_a_resumed_run_continues_its_mlflow_run(mlflow_server, generated_dataset, tmp_path):
    cfg = tiny_config(generated_dataset, epochs=3).with_overrides({"train.mlflow": mlflow_server,
                                                                  "storage.name": "resumed"})
    run_uri = str(tmp_path / "resumed")
    first = train(cfg, run_uri, stop_after=1)
    run_id = mlflow_run_id(run_uri)
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(run_id).info.status == "RUNNING" and steps(client, run_id, "loss") == [1]
    train(cfg, run_uri, resume_payload=first.payloads[1])
    assert mlflow_run_id(run_uri) == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert steps(client, run_id, "loss") == [1, 2, 3]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id],
                                  filter_string="tags.`agp.run_dir` = '" + run_uri + "'")) == 1
    assert storage.exists(storage.join(run_uri, runs.METRICS_FILE))
