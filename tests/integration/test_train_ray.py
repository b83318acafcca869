"""`agpctl train` as a real Ray Train job on an embedded local Ray, then `agpctl eval`."""

from __future__ import annotations

import json

import pytest

from helpers import TINY_AGPNET, agpctl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_run(generated_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-runs")
    proc = agpctl("train", "--dataset", "mvtec", "--root", generated_dataset, "--epochs", "2", "--out", str(out),
                  "--name", "tiny", "--json", *TINY_AGPNET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), out / "tiny"


def test_train_job_writes_a_complete_run(ray_run):
    outcome, run_dir = ray_run
    assert outcome["run"] == str(run_dir)
    assert {"fabric", "metal", "mean"} <= set(outcome["metrics"])
    assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.json").exists()
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch-*")) == ["checkpoint_epoch-0001", "checkpoint_epoch-0002"]
    config = (run_dir / "config.yaml").read_text()
    assert "pretrained: 'no'" in config or "pretrained: no" in config


def test_eval_cli_reproduces_the_training_metrics(ray_run, tmp_path):
    outcome, run_dir = ray_run
    maps = tmp_path / "maps.npz"
    proc = agpctl("eval", "--run", str(run_dir), "--json", "--save-maps", str(maps))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(proc.stdout)["metrics"]
    for category, row in outcome["metrics"].items():
        for name, value in row.items():
            if value is not None:
                assert table[category][name] == pytest.approx(value, abs=1e-6)
    import numpy as np

    saved = np.load(maps)
    assert saved["maps"].shape[1:] == (64, 64) and len(saved["scores"]) == len(saved["labels"]) == 12


def test_existing_run_is_never_overwritten(ray_run):
    _, run_dir = ray_run
    before = (run_dir / "metrics.json").read_bytes()
    proc = agpctl("train", "--dataset", "mvtec", "--root", str(run_dir), "--out", str(run_dir.parent), "--name", "tiny",
                  *TINY_AGPNET)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / "metrics.json").read_bytes() == before


def test_missing_dataset_root_is_one_line_exit_2(tmp_path):
    proc = agpctl("train", "--dataset", "mvtec", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path), *TINY_AGPNET)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert str(tmp_path / "nowhere") in proc.stderr
