"""The CUDA paths, run where a GPU is (``pytest -m cuda``; benchmarks/gpu_check.sh): the
feature cache on the GPU, bf16 autocast training, pinned-memory loading, prediction, and
the auto defaults picking the GPU. Skipped on machines without CUDA."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from agp_data.splits import build_datasets, split_samples
from agpctl.config import ClusterConfig, requested_gpus
from agpctl.distributed import WorkerContext
from agpctl.inference.scoring import predict_dataset
from agpctl.models import build_model, move_batch, resolve_precision
from agpctl.training.steps import Trainer
from helpers import tiny_run_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def test_auto_defaults_choose_the_gpu():
    assert requested_gpus(ClusterConfig(), torch.cuda.device_count()) == 1.0
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    assert resolve_precision("auto", CUDA) == expected


@pytest.mark.parametrize("method", ["agpnet", "onenip", "rlr"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_and_prediction_on_the_gpu(method, precision, generated_dataset):
    cfg = tiny_run_config(method, generated_dataset, **{"train.precision": precision})
    torch.manual_seed(0)
    model = build_model(cfg, CUDA)
    splits = split_samples(cfg.data, cfg.train.seed)
    train, _, test = build_datasets(cfg.data, splits, cfg.model.image_size, model.backbone.mean, model.backbone.std)
    if model.batch_extras:
        from agp_data.anomaly_synthesis import SynthesisConfig
        from agp_data.training_view import TrainingView

        train = TrainingView(train, model.batch_extras, synthesis=SynthesisConfig(), seed=0)
    loader = DataLoader(train, batch_size=4, shuffle=False, pin_memory=True)
    trainer = Trainer(model, model, cfg, steps_per_epoch=len(loader), ctx=WorkerContext(device=CUDA))
    first = trainer.train_epoch(loader)
    second = trainer.train_epoch(loader)  # clean features now come from the cache
    assert all(torch.isfinite(torch.tensor(v)) for v in (*first.values(), *second.values()))
    if model.cfg.feature_cache:
        assert len(model._feature_cache) > 0 and model._feature_cache.parts[0].device.type == "cuda"
    model.eval()
    model.fit_inference_state(move_batch(b, CUDA) for b in DataLoader(train, batch_size=8))
    predictions = predict_dataset(model, test, WorkerContext(device=CUDA), 8, precision)
    assert predictions is not None and len(predictions.scores) == len(test)
    assert torch.isfinite(torch.from_numpy(predictions.maps)).all()


def test_gpu_feature_cache_matches_recomputation(generated_dataset):
    cfg = tiny_run_config("rlr", generated_dataset, **{"train.precision": "fp32"})
    model = build_model(cfg, CUDA).train()
    images = torch.randn(4, 3, cfg.model.image_size, cfg.model.image_size, device=CUDA)
    index = torch.arange(4)
    fresh = model.extract(images)
    cached = model.cached(index, images, model.extract)  # fills
    again = model.cached(index, images, model.extract)  # hits
    for a, b, c in zip(fresh, cached, again):
        torch.testing.assert_close(b, a.half().float())
        assert torch.equal(b, c) and c.device.type == "cuda"
