"""numpy twins of the torch steps around an exported graph, for the torch-free ONNX runtime.

Each function reproduces one torch step of the PyTorch detector within float32 rounding (the
tests compare them with the originals):

- :func:`resize_map` — ``F.interpolate(mode="bilinear", align_corners=False)`` of a map;
- :func:`resize_tiles` — ``agp_data.tiled.resize_tiles`` (bilinear, antialiased) of tiles;
- :func:`gaussian_smooth`, :func:`image_score` — ``agp_models.postprocess``'s smoothing and
  pooled-max score, which a tiled run applies to the stitched map (see
  :func:`agpctl.inference.tiled_scoring.image_score`);
- :func:`tiled_image_score` — that rule with the method's settings from the sidecar.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

GAUSSIAN_TRUNCATE = 4.0  # as agp_models.postprocess: radius = int(4σ + 0.5), scipy's rule


def resize_map(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (h, w) map bilinearly resized to (height, width): half-pixel centres, sources below 0
    clamped to 0, no antialiasing; along the width first, then the height, in float32."""
    values = np.asarray(values, dtype=np.float32)
    x0, x1, wx = _linear_indices(values.shape[1], width)
    y0, y1, wy = _linear_indices(values.shape[0], height)
    rows = values[:, x0] * (np.float32(1) - wx) + values[:, x1] * wx
    return rows[y0] * (np.float32(1) - wy)[:, None] + rows[y1] * wy[:, None]


def _linear_indices(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = np.float32(size_in) / np.float32(size_out)
    source = np.maximum(scale * (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                        np.float32(0))
    low = source.astype(np.int64)  # floor: source >= 0
    high = np.minimum(low + 1, size_in - 1)
    return low, high, (source - low).astype(np.float32)


def resize_tiles(tiles: np.ndarray, size: int) -> np.ndarray:
    """(N, 3, T, T) float32 tiles at (N, 3, size, size), bilinear with antialiasing when
    shrinking (PIL's float mode, the filter torch's ``antialias=True`` reproduces)."""
    if tiles.shape[-1] == size and tiles.shape[-2] == size:
        return tiles
    out = np.empty((*tiles.shape[:2], size, size), dtype=np.float32)
    for n, tile in enumerate(tiles):
        for c, channel in enumerate(tile):
            image = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32), mode="F")
            out[n, c] = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return out


def gaussian_kernel1d(sigma: float) -> np.ndarray:
    radius = int(GAUSSIAN_TRUNCATE * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / float(sigma)) ** 2)
    return weights / weights.sum()


def _symmetric_indices(length: int, radius: int) -> np.ndarray:
    """scipy's 'reflect' boundary (d c b a | a b c d | d c b a) as source indices."""
    positions = np.remainder(np.arange(-radius, length + radius), 2 * length)
    return np.where(positions >= length, 2 * length - 1 - positions, positions)


def gaussian_smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W) map, mode 'reflect', truncate 4; σ <= 0: identity."""
    if sigma <= 0:
        return values
    kernel = gaussian_kernel1d(sigma).astype(np.float32)
    radius = (len(kernel) - 1) // 2
    height, width = values.shape
    padded = values[:, _symmetric_indices(width, radius)]
    across = sum(kernel[k] * padded[:, k:k + width] for k in range(len(kernel)))
    padded = across[_symmetric_indices(height, radius)]
    return sum(kernel[k] * padded[k:k + height] for k in range(len(kernel))).astype(np.float32)


def image_score(values: np.ndarray, pool: int) -> float:
    """Max of the pool×pool (stride 1, no padding) average-pooled map; pool <= 1: the max. A
    window larger than the map is clamped to it."""
    if pool <= 1:
        return float(values.max())
    window_h, window_w = min(pool, values.shape[0]), min(pool, values.shape[1])
    summed = np.pad(values.astype(np.float64), ((1, 0), (1, 0))).cumsum(axis=0).cumsum(axis=1)
    sums = (summed[window_h:, window_w:] - summed[:-window_h, window_w:] - summed[window_h:, :-window_w]
            + summed[:-window_h, :-window_w])
    return float(sums.max() / (window_h * window_w))


def tiled_image_score(full_map: np.ndarray, scoring: dict[str, Any], tile: int) -> float:
    """The image score of a stitched map, as ``agpctl.inference.tiled_scoring.image_score``:
    the tile maps carry ``smoothing_sigma`` already; a larger ``score_sigma`` adds the
    difference; sizes in model pixels scale to working-resolution pixels."""
    scale = tile / float(scoring["image_size"])
    sigma = float(scoring.get("smoothing_sigma") or 0.0)
    score_sigma = scoring.get("score_sigma")
    scored = full_map
    if score_sigma is not None and float(score_sigma) > sigma:
        scored = gaussian_smooth(full_map, math.sqrt(float(score_sigma) ** 2 - sigma**2) * scale)
    pool = int(scoring["score_pool"])
    pool = max(1, round(pool * scale)) if pool > 1 else pool
    return image_score(scored, pool)
