"""The Detector on a tiled run treats a given category as on whole images: it chooses the
thresholds, never the model's input (OneNIP would pick its prompt by class instead of by
similarity, unlike the whole-image path and the exported ONNX graph)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from agp_data.tiling import Tiling
from agp_models.base import Prediction
from agpctl.inference.detector import Detector
from agpctl.inference.thresholds import ThresholdPolicy


class RecordingModel(torch.nn.Module):
    """Maps are the tiles' mean brightness; every batch the detector passes is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(image_size=16, smoothing_sigma=0.0, score_sigma=None, score_pool=1)
        self.backbone = SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batches: list[object] = []

    def predict(self, images: torch.Tensor, batch=None) -> Prediction:
        self.batches.append(batch)
        maps = images.mean(dim=1)
        return Prediction(maps=maps, scores=maps.flatten(1).amax(dim=1))


def detector(model: RecordingModel, tiling: Tiling | None) -> Detector:
    stored = {"image": 10.0, "pixel": 10.0, "quantile": 0.99,
              "per_category": {"metal": {"image": 0.5, "pixel": 0.25, "images": 40, "stable": True}}}
    return Detector(model, ThresholdPolicy(stored), batch_size=4, categories=["fabric", "metal"],
                    device=torch.device("cpu"), tiling=tiling)


def test_a_given_category_picks_thresholds_not_the_models_input():
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    for tiling in (Tiling(tile=16, overlap=0.25), None):
        model = RecordingModel()
        [found] = detector(model, tiling).predict(image, category="metal")
        assert model.batches and all(batch is None for batch in model.batches), tiling
        assert (found.category, found.category_source) == ("metal", "given")
        assert (found.image_threshold, found.pixel_threshold) == (0.5, 0.25)
        assert found.map.shape == (40, 56)
