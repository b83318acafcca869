"""Pseudo-anomaly synthesis: exact masks, determinism, textures, and the training view."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from agp_data.anomaly_synthesis import SynthesisConfig, generate_texture, list_texture_files, perlin_noise, synthesize
from agp_data.errors import DataError


def _scene(size: int = 96, seed: int = 0) -> np.ndarray:
    """A structured test image: stripes, a gradient and sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    image = np.stack(
        [120 + 60 * np.sin(xx / 5.0), 80 + 100 * yy / size, 140 + 40 * np.cos((xx + yy) / 9.0)], axis=-1
    )
    image += rng.normal(0, 3, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


KINDS = {
    "patch": dict(cutpaste_weight=1.0, scar_weight=0.0),
    "rotated_patch": dict(cutpaste_weight=1.0, scar_weight=0.0, patch_rotation=30.0),
    "scar": dict(cutpaste_weight=1.0, scar_weight=1.0),
    "perlin_procedural": dict(cutpaste_weight=0.0),
}


def _assert_exact(image: np.ndarray, out: np.ndarray, mask: np.ndarray) -> None:
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert mask.dtype == bool and mask.shape == image.shape[:2]
    np.testing.assert_array_equal((image != out).any(axis=-1), mask)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_changes_exactly_its_mask(kind: str) -> None:
    image = _scene()
    cfg = SynthesisConfig(probability=1.0, **KINDS[kind])
    rng = np.random.default_rng(1)
    for _ in range(25):
        out, mask = synthesize(image, rng, cfg)
        _assert_exact(image, out, mask)
        assert mask.sum() >= max(1, round(cfg.min_area * mask.size))


def test_scar_is_thin_and_patch_area_in_range() -> None:
    image = _scene(224)
    scar_areas, patch_areas = [], []
    for seed in range(20):
        _, scar = synthesize(image, np.random.default_rng(seed), SynthesisConfig(probability=1.0, cutpaste_weight=1.0, scar_weight=1.0))
        _, patch = synthesize(image, np.random.default_rng(seed), SynthesisConfig(probability=1.0, cutpaste_weight=1.0, scar_weight=0.0))
        scar_areas.append(scar.sum())
        patch_areas.append(patch.mean())
    # scar ≤ 16 × 25 px (rotation keeps the area up to nearest-neighbour rounding)
    assert max(scar_areas) <= 16 * 25 * 1.15
    # patches cover at most 15 % of the image (minus the pixels the paste left unchanged)
    assert max(patch_areas) <= 0.15 + 1e-3 and min(patch_areas) > 0.0


def test_texture_folder_and_array_textures(tmp_path) -> None:
    rng = np.random.default_rng(7)
    (tmp_path / "banded").mkdir()
    for i in range(3):
        texture = generate_texture((40 + 10 * i, 50), rng)
        Image.fromarray(texture).save(tmp_path / "banded" / f"t{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    files = list_texture_files(str(tmp_path))
    assert [f.rsplit("/", 1)[-1] for f in files] == ["t0.png", "t1.png", "t2.png"]

    image = _scene(80)
    from_root = SynthesisConfig(probability=1.0, cutpaste_weight=0.0, texture_root=str(tmp_path))
    arrays = [generate_texture((33, 47), rng) for _ in range(2)]
    for seed in range(10):
        out, mask = synthesize(image, np.random.default_rng(seed), from_root)
        _assert_exact(image, out, mask)
        out, mask = synthesize(image, np.random.default_rng(seed), SynthesisConfig(probability=1.0, cutpaste_weight=0.0), arrays)
        _assert_exact(image, out, mask)


def test_texture_folder_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="no images"):
        list_texture_files(str(tmp_path))
    with pytest.raises(DataError, match="no images"):
        synthesize(_scene(32), np.random.default_rng(0), SynthesisConfig(probability=1.0, texture_root=str(tmp_path / "missing")))


def test_deterministic_for_a_generator_state() -> None:
    image = _scene()
    cfg = SynthesisConfig(probability=1.0)
    a = [synthesize(image, np.random.default_rng(s), cfg) for s in range(8)]
    b = [synthesize(image, np.random.default_rng(s), cfg) for s in range(8)]
    for (out_a, mask_a), (out_b, mask_b) in zip(a, b):
        np.testing.assert_array_equal(out_a, out_b)
        np.testing.assert_array_equal(mask_a, mask_b)
    distinct = {a_out.tobytes() for a_out, _ in a}
    assert len(distinct) == len(a)


def test_probability_zero_one_and_half() -> None:
    image = _scene(48)
    out, mask = synthesize(image, np.random.default_rng(0), SynthesisConfig(probability=0.0))
    np.testing.assert_array_equal(out, image)
    assert not mask.any()
    hits = [synthesize(image, np.random.default_rng(s), SynthesisConfig(probability=0.5))[1].any() for s in range(200)]
    # Binomial(200, 0.5): ±0.1 is more than 2.8 standard deviations.
    assert 0.4 <= np.mean(hits) <= 0.6


def test_identical_paste_leaves_no_label_and_flat_image_still_gets_a_defect() -> None:
    # On a flat image every CutPaste without jitter copies identical pixels: nothing changes,
    # so no draw is accepted and the fallback inverts a rectangle.
    flat = np.full((64, 64, 3), 90, dtype=np.uint8)
    cfg = SynthesisConfig(probability=1.0, cutpaste_weight=1.0, jitter_brightness=0.0, jitter_contrast=0.0,
                          jitter_saturation=0.0, jitter_hue=0.0)
    out, mask = synthesize(flat, np.random.default_rng(3), cfg)
    _assert_exact(flat, out, mask)
    assert mask.sum() == 8 * 8 and set(np.unique(out[mask])) == {255 - 90}


def test_min_change_undoes_faint_pixels() -> None:
    image = _scene()
    cfg = SynthesisConfig(probability=1.0, cutpaste_weight=0.0, min_change=12)
    for seed in range(10):
        out, mask = synthesize(image, np.random.default_rng(seed), cfg)
        _assert_exact(image, out, mask)
        diff = np.abs(out.astype(int) - image.astype(int)).max(axis=-1)
        assert (diff[mask] >= 12).all()


def test_perlin_noise_range_and_threshold_area() -> None:
    rng = np.random.default_rng(0)
    noise = perlin_noise((128, 96), (4, 8), rng, degrees=3.0)
    assert noise.shape == (128, 96)
    # 2-D Perlin noise scaled by √2 stays within [-1, 1] (|n| ≤ √2 · √0.5)
    assert np.abs(noise).max() <= 1.0 + 1e-9
    assert noise.std() > 0.1
    # thresholding at 0.5 marks a minority, but not nothing, over many fields
    areas = [(perlin_noise((64, 64), (8, 8), rng) > 0.5).mean() for _ in range(20)]
    assert 0.0 < np.mean(areas) < 0.2


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="uint8"):
        synthesize(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="probability"):
        SynthesisConfig(probability=1.5)


# -- TrainingView over a real (generated) dataset ------------------------------------------
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from agp_data.dataset import AnomalyDataset  # noqa: E402
from agp_data.fewshot import ExpandedDataset  # noqa: E402
from agp_data.generate import generate_dataset  # noqa: E402
from agp_data.layouts import load_samples  # noqa: E402
from agp_data.training_view import TrainingView  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def train_set(tmp_path_factory) -> AnomalyDataset:
    root = generate_dataset(str(tmp_path_factory.mktemp("gen") / "data"), categories=2, train=5, test=2, size=48)
    return AnomalyDataset(load_samples("synthetic", root, split="train"), 48, MEAN, STD)


def test_view_pseudo_anomaly_is_exact_in_tensor_space(train_set) -> None:
    view = TrainingView(train_set, {"pseudo_anomaly"}, SynthesisConfig(probability=1.0), seed=3)
    for i in range(len(view)):
        item, base = view[i], train_set[i]
        assert torch.equal(item["image"], base["image"]) and item["index"] == base["index"] == i
        # the uint8 view the defect is drawn on is exactly the pixels the dataset loaded
        np.testing.assert_array_equal(view.to_uint8(base["image"]), np.asarray(train_set.load_image(i)))
        mask = item["anomaly_mask"]
        assert mask.shape == (1, 48, 48) and set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
        changed = (item["anomaly_image"] != item["image"]).any(dim=0)
        assert torch.equal(changed, mask[0].bool())


def test_view_without_anomaly_keeps_image_and_zero_mask(train_set) -> None:
    view = TrainingView(train_set, {"pseudo_anomaly"}, SynthesisConfig(probability=0.0))
    item = view[0]
    assert torch.equal(item["anomaly_image"], item["image"]) and item["anomaly_mask"].sum() == 0


def test_view_prompt_same_category_other_image_varies_by_epoch(train_set) -> None:
    view = TrainingView(train_set, {"prompt"}, seed=5)
    choices = {}
    for epoch in range(6):
        view.set_epoch(epoch)
        for i in range(len(view)):
            item = view[i]
            j = item["prompt_index"]
            assert j != i and train_set.samples[j].category == train_set.samples[i].category
            assert train_set.samples[j].label == 0
            assert torch.equal(item["prompt_image"], train_set[j]["image"])
            assert view.prompt_index(i) == j  # same (seed, epoch, index): same draw
            choices.setdefault(i, set()).add(j)
    # 4 candidates per image over 6 epochs: every image saw more than one prompt
    assert all(len(c) > 1 for c in choices.values())


def test_view_in_dataloader_workers_matches_direct_indexing(train_set) -> None:
    view = TrainingView(train_set, {"prompt", "pseudo_anomaly"}, SynthesisConfig(probability=0.5), seed=11)
    view.set_epoch(2)
    loader = DataLoader(view, batch_size=5, num_workers=2, shuffle=False)
    for batch in loader:
        for row, index in enumerate(batch["index"].tolist()):
            direct = view[index]
            assert batch["prompt_index"][row].item() == direct["prompt_index"]
            assert torch.equal(batch["anomaly_image"][row], direct["anomaly_image"])
            assert torch.equal(batch["anomaly_mask"][row], direct["anomaly_mask"])


def test_view_epoch_reaches_persistent_workers(train_set) -> None:
    view = TrainingView(train_set, {"prompt"}, seed=4)
    loader = DataLoader(view, batch_size=len(view), num_workers=1, persistent_workers=True)
    seen = []
    for epoch in range(4):
        view.set_epoch(epoch)
        (batch,) = list(loader)
        expected = []
        for i in range(len(view)):
            expected.append(view.prompt_index(i))  # main process, same epoch
        assert batch["prompt_index"].tolist() == expected
        seen.append(tuple(expected))
    assert len(set(seen)) > 1  # the worker did not stay on epoch 0


def test_view_on_fewshot_expansion_prefers_another_image(train_set) -> None:
    expanded = ExpandedDataset(train_set, factor=4)
    view = TrainingView(expanded, {"prompt", "pseudo_anomaly"}, SynthesisConfig(probability=1.0))
    for i in range(0, len(view), 3):
        item = view[i]
        j = item["prompt_index"]
        assert j // 4 != i // 4 and train_set.samples[j // 4].category == train_set.samples[i // 4].category
        assert torch.equal((item["anomaly_image"] != item["image"]).any(0), item["anomaly_mask"][0].bool())
    # a single image per category: the prompt is another variant of the same image
    single = AnomalyDataset(train_set.samples[:1], 48, MEAN, STD)
    single_view = TrainingView(ExpandedDataset(single, factor=4), {"prompt"})
    assert single_view[0]["prompt_index"] in {1, 2, 3}
    assert TrainingView(single, {"prompt"})[0]["prompt_index"] == 0


def test_view_rejects_unknown_extras(train_set) -> None:
    with pytest.raises(ValueError, match="unknown batch extras"):
        TrainingView(train_set, {"prompt", "depth"})
