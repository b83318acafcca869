"""`agpctl tune` as a real Ray Tune sweep of real Ray Train runs on an embedded local Ray:
ASHA on the per-epoch synthetic-validation objective, every trial run one after another on
a 2-CPU machine, the best config retrained with `agpctl train --config`, and --resume."""

from __future__ import annotations

import csv
import json

import pytest

import helpers
from agpctl.config import RunConfig
from helpers import agpctl

pytestmark = pytest.mark.slow

TINY_AGPNET = [*helpers.TINY_AGPNET, "--val-fraction", "0.25"]
SPACE = """\
model.alpha_max: {type: uniform, low: 0.5, high: 2.0}
model.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}
"""


@pytest.fixture(scope="module")
def sweep(generated_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweeps")
    space = out / "space.yaml"
    space.write_text(SPACE)
    proc = agpctl("tune", "--dataset", "mvtec", "--root", generated_dataset, "--epochs", "2", "--samples", "3",
                  "--scheduler", "asha", "--grace-period", "1", "--max-concurrent", "1", "--space", str(space),
                  "--out", str(out), "--name", "tiny", "--json", *TINY_AGPNET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), out / "tiny"


def test_every_trial_runs_and_asha_sees_the_objective(sweep):
    outcome, sweep_dir = sweep
    trials = outcome["trials"]
    # max_concurrent 1: a later trial can only start once the earlier one released its CPU,
    # stopped (ASHA) trials included.
    assert len(trials) == 3
    assert {t["status"] for t in trials} <= {"finished", "stopped"}
    assert all(t["epochs"] >= 1 and t["objective"] is not None for t in trials)
    assert any(t["status"] == "finished" for t in trials)
    objectives = [t["objective"] for t in trials]
    assert objectives == sorted(objectives, reverse=True)
    for t in trials:
        assert t["objective"] == pytest.approx((t["i_auroc"] + t["p_auroc"] + t["pro"]) / 3)
        assert 0.5 <= t["params"]["model.alpha_max"] <= 2.0 and 1e-4 <= t["params"]["model.lr"] <= 1e-3
        run = sweep_dir / "runs" / t["trial"]
        assert (run / "config.yaml").exists() and (run / "checkpoint_epoch-0001").exists()


def test_results_and_best_config_are_written(sweep):
    outcome, sweep_dir = sweep
    best = outcome["best"]
    assert best["status"] == "finished" and best["test"]["i_auroc"] is not None
    saved = json.loads((sweep_dir / "results.json").read_text())
    assert saved["summary"]["test_metrics"].startswith("of the best trial only")
    assert saved["summary"]["objective"] == "synthetic-val" and saved["summary"]["warnings"] == []
    assert [t["trial"] for t in saved["trials"]] == [t["trial"] for t in outcome["trials"]]
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert [r["trial"] for r in rows] == [t["trial"] for t in outcome["trials"]]
    cfg = RunConfig.from_yaml((sweep_dir / "best.yaml").read_text())
    assert cfg.model.alpha_max == pytest.approx(best["params"]["model.alpha_max"])
    assert cfg.model.lr == pytest.approx(best["params"]["model.lr"])
    assert cfg.model.backbone.pretrained == "no" and cfg.train.epochs == 2 and cfg.storage.name is None


def test_best_config_trains_unchanged(sweep, tmp_path):
    _, sweep_dir = sweep
    proc = agpctl("train", "--config", str(sweep_dir / "best.yaml"), "--epochs", "1", "--out", str(tmp_path),
                  "--name", "again", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout)["metrics"]
    assert {"fabric", "metal", "mean"} <= set(metrics)
    assert (tmp_path / "again" / "checkpoint_epoch-0001").exists()


def test_resume_of_a_finished_sweep_reruns_nothing(sweep):
    outcome, sweep_dir = sweep
    proc = agpctl("tune", "--resume", str(sweep_dir), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(proc.stdout)
    assert [(t["trial"], t["epochs"], t["objective"]) for t in again["trials"]] == \
        [(t["trial"], t["epochs"], t["objective"]) for t in outcome["trials"]]


def test_existing_sweep_is_never_overwritten(sweep, generated_dataset):
    _, sweep_dir = sweep
    proc = agpctl("tune", "--dataset", "mvtec", "--root", generated_dataset, "--out", str(sweep_dir.parent),
                  "--name", "tiny", "--samples", "1", *TINY_AGPNET)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "--resume" in proc.stderr and "Traceback" not in proc.stderr


TINY_RLR = [
    "--method", "rlr", "--backbone", "resnet18", "--pretrained", "no", "--layers", "1,2", "--image-size", "64",
    "--set", "model.widths=[32,32]", "--set", "model.heads=2", "--set", "model.num_blocks=1",
    "--loader-workers", "0", "--batch-size", "4", "--val-fraction", "0.25",
]
RLR_SPACE = """\
model.alpha: {type: uniform, low: 0.5, high: 4.0}
model.jitter_scale: {type: choice, values: [2.0, 6.0]}
"""


def test_rlr_sweep_writes_everything_to_s3(s3_server, s3_bucket, generated_dataset, tmp_path):
    """Another method, and the whole sweep (Tune's experiment state, trial runs, results,
    best.yaml) on a real S3 API; best.yaml reads back as the RLR config it was swept from."""
    import boto3

    space = tmp_path / "space.yaml"
    space.write_text(RLR_SPACE)
    out = f"s3://{s3_bucket}/sweeps"
    proc = agpctl("tune", "--dataset", "mvtec", "--root", generated_dataset, "--epochs", "1", "--samples", "1",
                  "--scheduler", "fifo", "--max-concurrent", "1", "--space", str(space), "--out", out,
                  "--name", "rlr", "--json", *TINY_RLR)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout)
    assert [t["status"] for t in outcome["trials"]] == ["finished"]
    assert outcome["best_config"] == f"{out}/rlr/best.yaml"
    listing = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="sweeps/rlr/")
    keys = {o["Key"] for o in listing.get("Contents", [])}
    assert {"sweeps/rlr/best.yaml", "sweeps/rlr/results.json", "sweeps/rlr/results.csv"} <= keys
    for trial in outcome["trials"]:
        assert f"sweeps/rlr/runs/{trial['trial']}/metrics.json" in keys
    best = RunConfig.from_yaml(boto3.client("s3").get_object(Bucket=s3_bucket, Key="sweeps/rlr/best.yaml")["Body"]
                               .read().decode())
    assert best.method == "rlr" and best.model.widths == [32, 32]


def test_a_multi_worker_trial_trains_on_a_worker_group(generated_dataset, tmp_path):
    """One-worker trials train inside the trial; a trial with several workers still runs a
    Ray Train worker group (DDP), reporting through Tune the same way."""
    space = tmp_path / "space.yaml"
    space.write_text("model.alpha_max: {type: choice, values: [1.0]}\n")
    proc = agpctl("tune", "--dataset", "mvtec", "--root", generated_dataset, "--epochs", "1", "--samples", "1",
                  "--scheduler", "fifo", "--workers", "2", "--space", str(space), "--out", str(tmp_path),
                  "--name", "ddp", "--json", *TINY_AGPNET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [trial] = json.loads(proc.stdout)["trials"]
    assert trial["status"] == "finished" and trial["objective"] is not None
    run = tmp_path / "ddp" / "runs" / trial["trial"]
    assert (run / "checkpoint_epoch-0001").exists() and (run / "metrics.json").exists()
    assert json.loads((run / "summary.json").read_text())["workers"] == 2
