"""The built-in generated dataset: determinism, exact masks, layout, caching."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from agp_data import storage
from agp_data.errors import DataError
from agp_data.generate import (
    CATEGORIES,
    DEFECT_TYPES,
    MIN_DEFECT_DELTA,
    generate_dataset,
    render_image,
    render_pair,
    synthetic_root,
)
from agp_data.layouts import load_samples


def _tree_bytes(root: str) -> dict[str, bytes]:
    return {os.path.relpath(p, root): open(p, "rb").read() for p in storage.list_files(root)}


def test_generation_is_byte_identical_for_a_seed(tmp_path):
    params = dict(categories=2, train=3, test=6, size=48, seed=7)
    first = _tree_bytes(generate_dataset(str(tmp_path / "a"), **params))
    second = _tree_bytes(generate_dataset(str(tmp_path / "b"), **params))
    assert first == second and len(first) == 2 * (3 + 6 + 3) + 1  # images, masks, manifest
    other_seed = _tree_bytes(generate_dataset(str(tmp_path / "c"), **{**params, "seed": 8}))
    assert other_seed.keys() == first.keys()
    assert other_seed["fabric/train/good/000.png"] != first["fabric/train/good/000.png"]


@pytest.mark.parametrize("category", CATEGORIES)
def test_masks_are_exactly_the_changed_pixels(category):
    for number, defect in enumerate(DEFECT_TYPES):
        clean, defective, mask = render_pair(category, number, defect, size=64, seed=3)
        assert clean.shape == defective.shape == (64, 64, 3) and clean.dtype == np.uint8
        assert mask.shape == (64, 64) and mask.dtype == bool
        assert np.array_equal((clean != defective).any(-1), mask), defect
        area = mask.mean()
        assert 0.001 < area < 0.12, (defect, area)  # visible, not trivially huge
        change = np.abs(clean.astype(int) - defective.astype(int)).max(-1)[mask]
        assert change.min() >= MIN_DEFECT_DELTA, defect
        # The clean half of the pair is exactly the defect-free rendering of that image.
        assert np.array_equal(clean, render_image(category, number, split="test", size=64, seed=3))


def test_defect_contrast_varies():
    changes = [
        np.abs(c.astype(int) - d.astype(int)).max(-1)[m].mean()
        for c, d, m in (render_pair("metal", i, "spot", size=64) for i in range(8))
    ]
    assert max(changes) - min(changes) > 20


def test_normal_images_vary_but_share_the_category_look():
    images = {c: [render_image(c, i, size=64).astype(float) for i in range(4)] for c in CATEGORIES}
    for category, renders in images.items():
        assert not np.array_equal(renders[0], renders[1]), category
        means = np.array([r.mean(axis=(0, 1)) for r in renders])
        assert np.abs(means - means.mean(0)).max() < 20, category  # same colours
    colour = {c: np.mean([r.mean(axis=(0, 1)) for r in renders], 0) for c, renders in images.items()}
    for a in CATEGORIES:
        for b in CATEGORIES:
            if a < b:
                assert np.abs(colour[a] - colour[b]).max() > 15, (a, b)


def test_generated_files_match_the_renderer(generated_dataset):
    manifest = json.loads(open(os.path.join(generated_dataset, "dataset.json")).read())
    assert manifest["params"] == {
        "categories": ["fabric", "metal"],
        "train": 8,
        "test": 6,
        "size": 64,
        "seed": 0,
    }
    samples = load_samples("synthetic", generated_dataset)
    for category in ("fabric", "metal"):
        mine = [s for s in samples if s.category == category]
        assert sum(s.split == "train" for s in mine) == 8
        assert sum(s.split == "test" and s.label == 0 for s in mine) == 3
        defects = [s for s in mine if s.label == 1]
        assert [s.defect for s in defects] == sorted(DEFECT_TYPES[:3])
        assert all(s.mask is not None for s in defects)
    # test index j: the first 3 are good, then scratch (j=3), spot (j=4), crack (j=5).
    spot = next(s for s in samples if s.category == "metal" and s.defect == "spot")
    _, defective, mask = render_pair("metal", 4, "spot", size=64, seed=0)
    assert np.array_equal(np.asarray(Image.open(spot.image)), defective)
    assert np.array_equal(np.asarray(Image.open(spot.mask)) > 0, mask)
    assert set(np.unique(np.asarray(Image.open(spot.mask))).tolist()) == {0, 255}
    train0 = os.path.join(generated_dataset, "fabric", "train", "good", "000.png")
    assert np.array_equal(np.asarray(Image.open(train0)), render_image("fabric", 0, size=64, seed=0))


def test_regenerating_replaces_and_refuses_foreign_directories(tmp_path):
    out = str(tmp_path / "gen")
    generate_dataset(out, categories=1, train=4, test=2, size=32)
    generate_dataset(out, categories=1, train=2, test=2, size=32)
    assert sorted(os.listdir(os.path.join(out, "fabric", "train", "good"))) == ["000.png", "001.png"]
    assert sorted(os.listdir(tmp_path)) == ["gen"]  # no temp or retired directories left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep")
    with pytest.raises(DataError, match="not empty and not a generated dataset"):
        generate_dataset(str(foreign), categories=1, train=1, test=0, size=32)
    assert (foreign / "important.txt").read_text() == "keep"


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(categories=6), "between 1 and 5"),
        (dict(categories=0), "between 1 and 5"),
        (dict(train=0), "--train must be at least 1"),
        (dict(size=8), "--size must be between 32"),
        (dict(categories=["fabric", "plastic"]), "unknown generated category 'plastic'"),
    ],
)
def test_invalid_parameters(tmp_path, params, message):
    with pytest.raises(DataError, match=message):
        generate_dataset(str(tmp_path / "x"), **params)
    assert not (tmp_path / "x").exists()


def test_synthetic_root_is_cached_and_safe_to_race(tmp_path):
    params = dict(categories=1, train=2, test=2, size=32)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(synthetic_root(str(tmp_path), **params)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1
    root = results[0]
    assert os.path.dirname(root) == os.path.join(str(tmp_path), "synthetic")
    assert os.listdir(os.path.join(str(tmp_path), "synthetic")) == [os.path.basename(root)]  # no temp dirs
    stamp = os.stat(os.path.join(root, "dataset.json")).st_mtime_ns
    assert synthetic_root(str(tmp_path), **params) == root
    assert os.stat(os.path.join(root, "dataset.json")).st_mtime_ns == stamp  # reused, not regenerated
    assert synthetic_root(str(tmp_path), **{**params, "seed": 1}) != root
    assert len(load_samples("synthetic", root)) == 4
    with pytest.raises(DataError, match="unknown synthetic dataset parameter"):
        synthetic_root(str(tmp_path), colour="red")


def test_synthetic_root_defaults_to_agp_cache_dir(agp_cache_dir):
    root = synthetic_root(categories=1, train=1, test=1, size=32)
    assert root.startswith(os.path.join(agp_cache_dir, "synthetic"))


def test_generate_to_s3(s3_bucket):
    uri = generate_dataset(f"s3://{s3_bucket}/gen", categories=1, train=2, test=2, size=32)
    assert uri == f"s3://{s3_bucket}/gen"
    samples = load_samples("synthetic", uri)
    assert len(samples) == 4 and sum(s.label for s in samples) == 1
