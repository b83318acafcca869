"""The contract every registered method keeps with the application, parametrised over the
registry: a newly registered method is tested here without editing this file.

Per method (tiny CPU config from ``helpers.tiny_run_config``, built by ``agpctl.models.build_model``):
build, one training step through the application's ``Trainer`` on a real batch (with the
method's ``batch_extras``, made the way the training worker makes them), inference state and
predict, a checkpoint round trip into a fresh model, and an ONNX export that matches PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from agp_data.anomaly_synthesis import SynthesisConfig
from agp_data.dataset import AnomalyDataset
from agp_data.layouts import load_samples
from agp_data.training_view import EXTRAS, TrainingView
from agp_models.base import AnomalyModel
from agp_models.registry import method_class, method_names
from agpctl.checkpoint import deserialise, serialise
from agpctl.distributed import WorkerContext
from agpctl.models import build_model
from agpctl.training.steps import Trainer
from helpers import tiny_run_config

METHODS = method_names()
TRAIN_BATCH = 4
PREDICT_IMAGES = 3  # not the training batch size: a size frozen into the model would show
EXPORT_ATOL = 1e-4  # as tests/unit/agpctl/test_export.py: independent of the exporter's own bound


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


def datasets(root: str, model: AnomalyModel) -> tuple[AnomalyDataset, AnomalyDataset]:
    """(normal training images, test images) of the generated dataset, normalised for the
    model's backbone, as the worker builds them."""
    samples = load_samples("mvtec", root)
    train = [s for s in samples if s.split == "train" and s.label == 0]
    test = [s for s in samples if s.split == "test"]
    mean, std = model.backbone.mean, model.backbone.std
    return (AnomalyDataset(train, image_size=model.cfg.image_size, mean=mean, std=std),
            AnomalyDataset(test, image_size=model.cfg.image_size, mean=mean, std=std))


def training_batch(model: AnomalyModel, train_set: AnomalyDataset, seed: int) -> dict[str, Any]:
    """The first training batch, with the extras the method asks for (as the worker does)."""
    dataset = train_set
    if model.batch_extras:
        synthesis = SynthesisConfig(probability=model.pseudo_anomaly_probability)
        dataset = TrainingView(train_set, model.batch_extras, synthesis=synthesis, seed=seed)
    return next(iter(DataLoader(dataset, batch_size=TRAIN_BATCH, shuffle=False, num_workers=0)))


def fit_inference_state(model: AnomalyModel, train_set: AnomalyDataset) -> None:
    """Inference state from the normal training images, as the worker's
    ``finalise_inference_state`` does: eval mode, an un-shuffled loader, back to train mode."""
    model.eval()
    model.fit_inference_state(DataLoader(train_set, batch_size=8, shuffle=False, num_workers=0))
    model.train()


def trainable_snapshot(model: AnomalyModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@dataclass
class Trained:
    cfg: Any
    model: AnomalyModel
    losses: dict[str, float]
    before: dict[str, torch.Tensor]
    checkpoint: bytes  # serialise(trainer.checkpoint_payload()) right after training
    images: torch.Tensor  # normalised test images, (PREDICT_IMAGES, 3, S, S)


@pytest.fixture(scope="module", params=METHODS)
def trained(request, generated_dataset, _one_thread) -> Trained:
    """One method built, trained for one step, its inference state fitted, checkpointed."""
    method = request.param
    cfg = tiny_run_config(method)
    torch.manual_seed(0)
    model = build_model(cfg)
    train_set, test_set = datasets(generated_dataset, model)
    batch = training_batch(model, train_set, cfg.train.seed)
    before = trainable_snapshot(model)
    trainer = Trainer(model, model, cfg, steps_per_epoch=1, ctx=WorkerContext())
    losses = trainer.train_epoch([batch])
    fit_inference_state(model, train_set)
    checkpoint = serialise(trainer.checkpoint_payload())
    picks = np.linspace(0, len(test_set) - 1, PREDICT_IMAGES).round().astype(int)
    images = torch.stack([test_set[int(i)]["image"] for i in picks])
    return Trained(cfg=cfg, model=model, losses=losses, before=before, checkpoint=checkpoint,
                   images=images)


def predict(model: AnomalyModel, images: torch.Tensor):
    model.eval()
    with torch.no_grad():
        return model.predict(images)


# -- 1. build -------------------------------------------------------------------------------
def test_the_registry_lists_methods():
    assert METHODS and len(set(METHODS)) == len(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_build_gives_the_registered_method_with_trainable_state_only(method):
    cfg = tiny_run_config(method)
    model = build_model(cfg)
    assert isinstance(model, AnomalyModel)
    assert type(model) is method_class(method)
    assert model.name == method
    assert isinstance(cfg.model, type(model).config_class)
    assert model.batch_extras <= EXTRAS, f"{method} asks for batch extras agp_data cannot make"
    trainable = model.trainable_parameters()
    assert trainable and sum(p.numel() for p in trainable) > 0
    # The frozen backbone is not part of the checkpointed state.
    backbone = [p for p in model.backbone.parameters() if p.numel()]
    assert backbone and not any(p.requires_grad for p in backbone)
    state = model.state_dict()
    assert not any(key.startswith("backbone.") for key in state), [k for k in state if k.startswith("backbone.")]
    backbone_storage = {p.untyped_storage().data_ptr() for p in backbone}
    shared = [k for k, v in state.items() if v.numel() and v.untyped_storage().data_ptr() in backbone_storage]
    assert not shared, f"backbone tensors in state_dict(): {shared}"


@pytest.mark.parametrize("method", METHODS)
def test_build_is_seeded(method):
    cfg = tiny_run_config(method)
    a, b = build_model(cfg).state_dict(), build_model(cfg).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- 2. a training step -----------------------------------------------------------------------
def test_a_training_step_gives_a_finite_loss_and_moves_parameters(trained):
    assert "loss" in trained.losses
    assert np.isfinite(trained.losses["loss"])
    assert all(np.isfinite(v) for v in trained.losses.values()), trained.losses
    after = dict(trained.model.named_parameters())
    changed = [name for name, value in trained.before.items() if not torch.equal(value, after[name].detach())]
    assert changed, "no trainable parameter changed after one optimiser step"


# -- 3. predict -----------------------------------------------------------------------------
def test_predict_gives_finite_maps_and_scores_at_the_image_size(trained):
    size = trained.cfg.model.image_size
    prediction = predict(trained.model, trained.images)
    assert tuple(prediction.maps.shape) == (PREDICT_IMAGES, size, size)
    assert tuple(prediction.scores.shape) == (PREDICT_IMAGES,)
    assert torch.isfinite(prediction.maps).all() and torch.isfinite(prediction.scores).all()


# -- 4. checkpoint round trip ---------------------------------------------------------------------
def test_checkpoint_round_trip_into_a_fresh_model_predicts_the_same(trained):
    payload = deserialise(trained.checkpoint, "in-memory")
    fresh = build_model(trained.cfg)
    Trainer(fresh, fresh, trained.cfg, steps_per_epoch=1, ctx=WorkerContext()).restore(payload)
    expected = predict(trained.model, trained.images)
    got = predict(fresh, trained.images)
    torch.testing.assert_close(got.maps, expected.maps, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.scores, expected.scores, atol=1e-6, rtol=0)
    assert expected.maps.std() > 0  # not two constant maps


# -- 5. export ------------------------------------------------------------------------------
def test_onnx_export_matches_pytorch(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    from agpctl.inference.export import export_model, run_exported, verification_images

    model = trained.model.eval()
    out = str(tmp_path / f"{model.name}.onnx")
    result = export_model(model, out, "onnx")
    assert result.map_max_abs_diff <= result.tolerance and result.method == model.name
    images = verification_images(model.cfg.image_size, PREDICT_IMAGES, seed=5)  # RGB in [0, 1]
    mean = torch.tensor(model.backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.backbone.std).view(1, 3, 1, 1)
    reference = predict(model, (images - mean) / std)
    with open(out, "rb") as fh:
        maps, scores = run_exported(fh.read(), "onnx", images)
    assert maps.shape == tuple(reference.maps.shape) and scores.shape == tuple(reference.scores.shape)
    assert np.abs(maps - reference.maps.numpy()).max() <= EXPORT_ATOL
    assert np.abs(scores - reference.scores.numpy()).max() <= EXPORT_ATOL
