"""agp_data.tiled: training tiles with stable indices, whole images at the working resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from agp_data.samples import Sample
from agp_data.tiled import TileDataset, WholeImageDataset
from agp_data.tiling import Tiling
from agp_data.training_view import TrainingView

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture
def two_images(tmp_path):
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (100, 130, 3), dtype=np.uint8), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    mask = np.zeros((100, 130), dtype=np.uint8)
    mask[10:20, 30:33] = 255
    samples = []
    for i, array in enumerate(pixels):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
        mask_path = None
        if i == 0:
            Image.fromarray(mask).save(tmp_path / "0_mask.png")
            mask_path = str(tmp_path / "0_mask.png")
        samples.append(Sample(str(tmp_path / f"{i}.png"), mask_path, int(i == 0), "c", "x", "test"))
    return samples, pixels, mask > 0


def _unnormalise(tensor: torch.Tensor) -> np.ndarray:
    return np.round((tensor.permute(1, 2, 0).numpy() * 0.25 + 0.5) * 255).astype(np.uint8)


def test_every_tile_is_an_item_with_a_stable_index(two_images):
    samples, pixels, mask = two_images
    tiles = TileDataset(samples, Tiling(tile=64, overlap=0.0), image_size=64, mean=MEAN, std=STD, decoded_cache_mb=16)
    # 100×130 → 2×3 tiles (last row/column aligned to the border), 64×64 → 1
    assert len(tiles) == 7 and len(tiles.samples) == 7
    assert tiles.locate(5) == (0, 5) and tiles.locate(6) == (1, 0)
    item = tiles[4]  # second row, middle column: origin (36, 64)
    assert item["index"] == 4 and item["image"].shape == (3, 64, 64) and item["label"] == 1
    np.testing.assert_array_equal(_unnormalise(item["image"]), pixels[0][36:100, 64:128])
    first = tiles[1]  # origin (0, 64): holds none of the mask (columns 30..32)
    assert first["mask"].sum() == 0 and tiles[0]["mask"].sum() == 30
    np.testing.assert_array_equal(_unnormalise(tiles[6]["image"]), pixels[1])


def test_tiles_are_resized_to_the_model_input_only_when_sizes_differ(two_images):
    samples, _, _ = two_images
    tiles = TileDataset(samples, Tiling(tile=64), image_size=32, mean=MEAN, std=STD)
    assert tiles[0]["image"].shape == (3, 32, 32) and tiles[0]["mask"].shape == (1, 32, 32)


def test_training_view_draws_prompts_and_pseudo_anomalies_per_tile(two_images):
    samples, _, _ = two_images
    normal = [Sample(s.image, None, 0, s.category, "good", "train") for s in samples]
    tiles = TileDataset(normal, Tiling(tile=64), image_size=64, mean=MEAN, std=STD)
    view = TrainingView(tiles, {"prompt", "pseudo_anomaly"}, seed=0)
    item = view[2]
    assert item["prompt_index"] != 2 and item["anomaly_image"].shape == (3, 64, 64)


def test_whole_images_at_the_working_resolution(two_images):
    samples, _, mask = two_images
    whole = WholeImageDataset(samples, Tiling(tile=32, working_size=65), image_size=32, mean=MEAN, std=STD)
    assert whole.shapes == [(50, 65), (65, 65)]
    item = whole[0]
    assert item["image"].shape == (3, 50, 65) and item["mask"].shape == (1, 50, 65)
    assert item["mask"].sum() > 0 and item["label"] == 1
