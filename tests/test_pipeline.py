"""The method-agnostic training pipeline, run in-process (no Ray): checkpoints, resume,
inference state, thresholds, and `agpctl eval` reproducing the metrics of a run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agp_data import storage
from agpctl import checkpoint as ckpt
from agpctl.config import RunConfig
from agpctl.engine import WorkerContext
from agpctl.evaluate import evaluate_run
from agpctl.progress import ProgressSender
from agpctl.train import RunSpec, train_on_worker


def tiny_config(root: str, epochs: int = 2, method: str = "agpnet") -> RunConfig:
    cfg = RunConfig(method=method)
    cfg = cfg.with_overrides({
        "data.dataset": "mvtec", "data.root": root, "data.loader_workers": 0, "data.val_fraction": 0.25,
        "train.epochs": epochs, "train.batch_size": 4, "train.eval_batch_size": 8, "train.seed": 3,
        "model.backbone.name": "resnet18", "model.backbone.pretrained": "no", "model.layers": [1, 2],
        "model.image_size": 64, "model.decoder_width": 64, "model.decoder_depth": 1, "model.decoder_heads": 2,
        "model.score_pool": 4, "model.smoothing_sigma": 1.0,
    })
    return cfg


class InProcessRun:
    """Plays Ray Train's part: persists the checkpoints a worker reports."""

    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        self.reports: list[dict] = []
        self.payloads: dict[int, dict] = {}

    def report(self, metrics, payload, epoch):
        self.reports.append(metrics)
        if payload is not None:
            data = ckpt.serialise(payload)  # now: state_dict() tensors keep changing with training
            self.payloads[epoch] = ckpt.deserialise(data, "in-memory")
            storage.write_bytes(storage.join(self.run_uri, ckpt.checkpoint_dir_name(epoch), ckpt.CHECKPOINT_FILE), data)


def run_in_process(cfg: RunConfig, run_uri: str, resume_payload=None) -> InProcessRun:
    storage.write_text(storage.join(run_uri, ckpt.CONFIG_FILE), cfg.to_yaml())
    run = InProcessRun(run_uri)
    train_on_worker(RunSpec(cfg, run_uri), WorkerContext(), lambda m: m, run.report, ProgressSender(None, False),
                    resume_payload)
    return run


@pytest.fixture(scope="module")
def finished_run(generated_dataset, tmp_path_factory):
    run_uri = str(tmp_path_factory.mktemp("runs") / "tiny")
    cfg = tiny_config(generated_dataset)
    return cfg, run_uri, run_in_process(cfg, run_uri)


def test_run_directory_holds_config_checkpoints_thresholds_and_metrics(finished_run):
    cfg, run_uri, run = finished_run
    assert [e for e, _ in ckpt.list_checkpoints(run_uri)] == [1, 2]
    metrics = json.loads(storage.read_text(storage.join(run_uri, ckpt.METRICS_FILE)))
    assert set(metrics["metrics"]) >= {"mean"}
    assert metrics["summary"]["backbone"]["pretrained"] is False
    thresholds = json.loads(storage.read_text(storage.join(run_uri, ckpt.THRESHOLDS_FILE)))
    assert thresholds["image"] is not None and thresholds["pixel"] >= thresholds["image"] - 1e-6
    assert [r["epoch"] for r in run.reports] == [1, 2, 2]  # two epochs, then the final evaluation


def test_eval_reloads_the_run_and_reproduces_its_metrics(finished_run):
    _, run_uri, _ = finished_run
    stored = json.loads(storage.read_text(storage.join(run_uri, ckpt.METRICS_FILE)))["metrics"]
    table, _ = evaluate_run(run_uri)
    for category, row in stored.items():
        for name, value in row.items():
            if value is None:
                continue
            assert table[category][name] == pytest.approx(value, abs=1e-6), (category, name)


def test_resumed_run_equals_uninterrupted_run(finished_run, generated_dataset, tmp_path):
    cfg, _, uninterrupted = finished_run
    resumed = run_in_process(cfg, str(tmp_path / "resumed"), resume_payload=uninterrupted.payloads[1])
    final_a, final_b = uninterrupted.payloads[2], resumed.payloads[2]
    assert final_b["epoch"] == 2 and final_b["step"] == final_a["step"]
    for key, value in final_a["model"].items():
        assert torch.equal(value, final_b["model"][key]), key


def test_half_written_checkpoint_is_skipped(finished_run, tmp_path):
    _, run_uri, _ = finished_run
    copy = str(tmp_path / "copy")
    storage.download_dir(run_uri, copy)
    latest = storage.join(copy, ckpt.checkpoint_dir_name(2), ckpt.CHECKPOINT_FILE)
    data = storage.read_bytes(latest)
    storage.write_bytes(latest, data[: len(data) // 2])  # a crash mid-copy
    loaded = ckpt.load_latest_checkpoint(copy)
    assert loaded.epoch == 1


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_gradient_norm_is_clipped_when_configured(clip, one_torch_thread):
    from agpctl.engine import Trainer, build_model

    cfg = RunConfig(method="agpnet").with_overrides({
        "model.backbone.name": "resnet18", "model.backbone.pretrained": "no", "model.layers": [1, 2],
        "model.image_size": 64, "model.decoder_width": 32, "model.decoder_depth": 1, "model.decoder_heads": 2,
        "model.grad_clip_norm": clip, "model.feature_cache": False, "train.epochs": 1,
    })
    torch.manual_seed(0)
    model = build_model(cfg)
    trainer = Trainer(model, model, cfg, steps_per_epoch=1, ctx=WorkerContext())
    batch = {"image": torch.randn(2, 3, 64, 64), "index": torch.arange(2)}
    trainer.train_epoch([batch])
    # The gradients of the last step are still on the parameters, after clipping.
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.trainable_parameters()
                                                 if p.grad is not None]))
    if clip:
        assert norm <= clip * 1.001
    else:
        assert norm > 1e-2  # unclipped: the bound above would fail, so the clipped case is meaningful
