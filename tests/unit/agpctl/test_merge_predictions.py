"""Predictions of several models as one set (``agpctl eval --save-maps``, ``agpctl report``):
the sub-runs of a tiled per-category run keep maps of different sizes, which still merge; a
saved maps file is checked against the map size the run gives."""

from __future__ import annotations

import numpy as np

import helpers
from agpctl import runs
from agpctl.inference.evaluate import merge_predictions
from agpctl.inference.report_inputs import gather_report_inputs, saved_map_shape
from agpctl.inference.scoring import Predictions


def predictions_of(category: str, shape: tuple[int, int], count: int = 3, seed: int = 0) -> Predictions:
    """``count`` images of ``category`` with (shape) maps; the defective ones' masks mark a corner."""
    rng = np.random.default_rng(seed)
    maps = rng.random((count, *shape)).astype(np.float32)
    masks = np.zeros((count, *shape), bool)
    masks[1:, : shape[0] // 2, : shape[1] // 2] = True
    maps[masks] += 2.0
    return Predictions(indices=np.arange(count), scores=maps.reshape(count, -1).max(axis=1),
                       maps=maps, masks=masks, labels=np.array([0] + [1] * (count - 1)),
                       categories=[category] * count, paths=[f"{category}/{i}.png" for i in range(count)])


def test_maps_of_different_sizes_merge_at_the_largest():
    small, large = predictions_of("fabric", (24, 40)), predictions_of("metal", (48, 32), seed=1)
    merged = merge_predictions([small, large])
    assert merged.maps.shape == (6, 48, 40) and merged.masks.shape == (6, 48, 40)
    assert merged.maps.dtype == np.float32 and merged.masks.dtype == bool
    np.testing.assert_array_equal(merged.indices, np.arange(6))
    assert merged.categories == ["fabric"] * 3 + ["metal"] * 3
    # Every defect survives the resizing, and no normal image gains defect pixels.
    assert [bool(m.any()) for m in merged.masks] == [False, True, True, False, True, True]
    table = merged.metrics()
    assert set(table) >= {"fabric", "metal"}
    assert table["fabric"]["p_auroc"] == 1.0 and table["metal"]["p_auroc"] == 1.0


def test_maps_of_one_size_are_kept_as_they_are():
    first, second = predictions_of("fabric", (16, 16)), predictions_of("metal", (16, 16), seed=1)
    merged = merge_predictions([first, second])
    np.testing.assert_array_equal(merged.maps, np.concatenate([first.maps, second.maps]))
    np.testing.assert_array_equal(merged.masks, np.concatenate([first.masks, second.masks]))


def tiled_run(tmp_path, root: str, **overrides) -> tuple[str, object]:
    cfg = helpers.tiny_run_config("agpnet", root, **{"data.tile": 32, "model.image_size": 32, **overrides})
    run_uri = str(tmp_path / "run")
    runs.write_run_config(run_uri, cfg)
    return run_uri, cfg


def test_a_tiled_run_saves_maps_at_its_working_size(tmp_path, generated_dataset):
    run_uri, cfg = tiled_run(tmp_path, generated_dataset)
    assert cfg.model.image_size != 64  # else this test could not tell the two sizes apart
    assert saved_map_shape(cfg, [run_uri]) == (64, 64)  # the generated images, at native resolution
    _, smaller = tiled_run(tmp_path / "w", generated_dataset, **{"data.tile_working_size": 48})
    assert saved_map_shape(smaller, [str(tmp_path / "w" / "run")]) == (48, 48)
    plain = helpers.tiny_run_config("agpnet", generated_dataset)
    assert saved_map_shape(plain, [run_uri]) == (plain.model.image_size,) * 2
    _, gone = tiled_run(tmp_path / "g", str(tmp_path / "no-data"))
    assert saved_map_shape(gone, [str(tmp_path / "g" / "run")]) is None


def test_the_report_of_a_tiled_run_trusts_maps_at_its_working_size(tmp_path, generated_dataset):
    run_uri, _ = tiled_run(tmp_path, generated_dataset)
    right, wrong = str(tmp_path / "right.npz"), str(tmp_path / "wrong.npz")
    predictions_of("fabric", (64, 64)).save_npz(right)
    predictions_of("fabric", (32, 32)).save_npz(wrong)  # the model's input size: a plain run's maps
    assert not [n for n in gather_report_inputs(run_uri, maps_file=right).notes if "another run" in n]
    notes = [n for n in gather_report_inputs(run_uri, maps_file=wrong).notes if "another run" in n]
    assert len(notes) == 1 and "32×32" in notes[0] and "64×64" in notes[0]
