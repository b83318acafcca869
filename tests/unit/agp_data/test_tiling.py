"""agp_data.tiling: tiles cover every pixel, and stitching inverts cutting without seams."""

from __future__ import annotations

import numpy as np
import pytest

from agp_data.config import DataConfig
from agp_data.errors import DataError
from agp_data.tiling import (
    Tiling,
    blend_weights,
    cut_tiles,
    mask_to_working_resolution,
    stitch,
    tile_origins,
    to_working_resolution,
    working_shape,
)

SHAPES = [(1024, 1024), (300, 517), (128, 128), (129, 255), (50, 400), (7, 3)]
TILINGS = [Tiling(tile=128), Tiling(tile=128, overlap=0.0), Tiling(tile=64, overlap=0.5), Tiling(tile=100, overlap=0.8)]


def _smooth_map(height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    return (np.sin(ys / 37.0) * np.cos(xs / 23.0) + 0.001 * ys).astype(np.float32)


@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: f"t{t.tile}o{t.overlap}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiles_cover_every_pixel_and_end_at_the_border(shape, tiling):
    height, width = shape
    origins = tile_origins(height, width, tiling)
    covered = np.zeros(shape, dtype=np.int32)
    for y, x in origins:
        covered[y:y + tiling.tile, x:x + tiling.tile] += 1
    assert covered.min() >= 1
    assert len(set(origins)) == len(origins)
    ys = sorted({y for y, _ in origins})
    xs = sorted({x for _, x in origins})
    assert ys[0] == 0 and xs[0] == 0
    assert ys[-1] == max(0, height - tiling.tile) and xs[-1] == max(0, width - tiling.tile)
    # neighbours are never further apart than the stride (so they overlap as asked)
    assert all(b - a <= tiling.stride for a, b in zip(ys, ys[1:]))


def test_grid_size_follows_the_overlap():
    assert len(tile_origins(1024, 1024, Tiling(tile=128, overlap=0.0))) == 8 * 8
    # stride 96: origins 0, 96, …, 864 and the border-aligned 896
    assert len(tile_origins(1024, 1024, Tiling(tile=128, overlap=0.25))) == 11 * 11


@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: f"t{t.tile}o{t.overlap}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cut_then_stitch_is_the_identity_on_a_smooth_map(shape, tiling):
    full = _smooth_map(*shape)
    tiles, origins = cut_tiles(full, tiling)
    assert tiles.shape == (len(origins), tiling.tile, tiling.tile)
    stitched = stitch(tiles, origins, *shape, tiling)
    assert stitched.dtype == np.float32 and stitched.shape == shape
    np.testing.assert_allclose(stitched, full, rtol=0, atol=1e-6)


def test_stitching_a_constant_map_shows_no_seams():
    tiling = Tiling(tile=64, overlap=0.3)
    height, width = 300, 410
    origins = tile_origins(height, width, tiling)
    maps = np.full((len(origins), 64, 64), 0.37, dtype=np.float32)
    stitched = stitch(maps, origins, height, width, tiling)
    np.testing.assert_allclose(stitched, 0.37, rtol=0, atol=1e-7)
    # and no step between rows/columns of pixels, anywhere
    assert np.abs(np.diff(stitched, axis=0)).max() < 1e-7
    assert np.abs(np.diff(stitched, axis=1)).max() < 1e-7


def test_tile_edges_count_less_than_tile_centres():
    tiling = Tiling(tile=64, overlap=0.5)
    origins = tile_origins(64, 96, tiling)  # two tiles side by side, overlapping 32 px
    assert origins == [(0, 0), (0, 32)]
    maps = np.stack([np.zeros((64, 64), np.float32), np.ones((64, 64), np.float32)])
    stitched = stitch(maps, origins, 64, 96, tiling)
    # Inside the overlap the value moves smoothly from the left tile's 0 to the right tile's 1.
    middle = stitched[32, 32:64]
    assert np.all(np.diff(middle) > 0)
    assert middle[0] < 0.1 and middle[-1] > 0.9
    weights = blend_weights(64)
    assert weights.min() > 0 and weights[32, 32] > 10 * weights[0, 0]


def test_images_smaller_than_a_tile_are_padded_by_reflection():
    tiling = Tiling(tile=16)
    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    tiles, origins = cut_tiles(image, tiling)
    assert origins == [(0, 0)] and tiles.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(tiles[0, :5, :7], image)
    np.testing.assert_array_equal(tiles[0, 5, :7], image[3])  # reflected, the edge row not repeated
    stitched = stitch(tiles[..., 0].astype(np.float32), origins, 5, 7, tiling)
    np.testing.assert_array_equal(stitched, image[..., 0].astype(np.float32))


def test_uint8_tiles_are_exact_crops():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (200, 333, 3), dtype=np.uint8)
    tiles, origins = cut_tiles(image, Tiling(tile=64))
    assert tiles.dtype == np.uint8
    for tile, (y, x) in zip(tiles, origins):
        np.testing.assert_array_equal(tile, image[y:y + 64, x:x + 64])


def test_config_and_dict_round_trip():
    assert Tiling.from_config(DataConfig()) is None
    cfg = DataConfig(tile=128, tile_overlap=0.5, tile_working_size=2048)
    tiling = Tiling.from_config(cfg)
    assert tiling == Tiling(tile=128, overlap=0.5, working_size=2048)
    assert Tiling.from_dict(tiling.to_dict()) == tiling
    assert Tiling.from_dict(None) is None and Tiling.from_dict({}) is None


@pytest.mark.parametrize(
    "kwargs, field",
    [({"tile": 0}, "data.tile"), ({"tile": 64, "overlap": 0.9}, "data.tile_overlap"),
     ({"tile": 64, "overlap": -0.1}, "data.tile_overlap"), ({"tile": 64, "working_size": 0}, "data.tile_working_size")],
)
def test_bad_values_are_one_line_data_errors(kwargs, field):
    with pytest.raises(DataError, match=field) as info:
        Tiling(**kwargs)
    assert "\n" not in str(info.value)


def test_working_resolution_scales_the_longer_side():
    tiling = Tiling(tile=64, working_size=500)
    assert working_shape(1000, 2000, tiling) == (250, 500)
    assert working_shape(1000, 2000, Tiling(tile=64)) == (1000, 2000)
    image = np.zeros((1000, 2000, 3), dtype=np.uint8)
    assert to_working_resolution(image, tiling).shape == (250, 500, 3)
    mask = np.zeros((1000, 2000), dtype=bool)
    mask[400:600, 800:1200] = True
    small = mask_to_working_resolution(mask, tiling)
    assert small.shape == (250, 500) and small.dtype == bool
    assert small[125, 250] and not small[0, 0]
