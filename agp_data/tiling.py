"""Tiling of high-resolution images: cut into overlapping tiles, stitch tile maps back.

A defect a few pixels wide on a 4000 px photograph vanishes when the whole photograph is
resized to the model's input size. With tiling the model sees tiles cut at the image's native
resolution (or at a chosen *working* resolution), and the tiles' anomaly maps are blended back
into one map of the whole image.

numpy (and PIL for the working-resolution resize) only: the torch-free ONNX runtime uses this
module as well as the training and evaluation code, so both cut and stitch identically.

    tiling = Tiling(tile=256, overlap=0.25)
    tiles, origins = cut_tiles(image, tiling)           # N×T×T×C, [(y0, x0), ...]
    full = stitch(tile_maps, origins, h, w, tiling)     # H×W float32
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from agp_data.errors import DataError

__all__ = [
    "Tiling",
    "tile_origins",
    "cut_tiles",
    "stitch",
    "blend_weights",
    "working_shape",
    "to_working_resolution",
    "mask_to_working_resolution",
]

# Lowest blending weight, relative to a tile's centre. Pixels at a tile's edge see less
# context (the backbone pads there), so they count less where another tile also covers them;
# never zero, so a pixel only one tile covers (the image border) still gets that tile's value.
_EDGE_WEIGHT = 0.05


@dataclass(frozen=True)
class Tiling:
    """How a run cuts images: ``tile`` pixels square at the working resolution, neighbours
    overlapping by the fraction ``overlap``; ``working_size`` (optional) resizes each image so
    its longer side has that many pixels before cutting (None: native resolution)."""

    tile: int
    overlap: float = 0.25
    working_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tile, bool) or not isinstance(self.tile, (int, np.integer)) or self.tile < 1:
            raise DataError(f"data.tile must be a positive number of pixels (e.g. --tile 256), got {self.tile!r}")
        if not isinstance(self.overlap, (int, float)) or not 0.0 <= float(self.overlap) < 0.9:
            raise DataError(f"data.tile_overlap must be in [0, 0.9) (e.g. --tile-overlap 0.25), got {self.overlap!r}")
        if self.working_size is not None and (
            isinstance(self.working_size, bool)
            or not isinstance(self.working_size, (int, np.integer))
            or self.working_size < 1
        ):
            raise DataError(
                f"data.tile_working_size must be a positive number of pixels or unset, got {self.working_size!r}"
            )

    @property
    def stride(self) -> int:
        """Distance between neighbouring tile origins (before the border alignment)."""
        return max(1, int(round(self.tile * (1.0 - float(self.overlap)))))

    @classmethod
    def from_config(cls, data_cfg: Any) -> Tiling | None:
        """The tiling of a run's ``DataConfig`` (None when ``data.tile`` is unset)."""
        tile = getattr(data_cfg, "tile", None)
        if tile is None:
            return None
        return cls(
            tile=tile,
            overlap=getattr(data_cfg, "tile_overlap", 0.25),
            working_size=getattr(data_cfg, "tile_working_size", None),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, for exported metadata."""
        return {"tile": int(self.tile), "overlap": float(self.overlap),
                "working_size": None if self.working_size is None else int(self.working_size)}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Tiling | None:
        """Inverse of :meth:`to_dict`; None (no tiling) for None or an empty dict."""
        if not values:
            return None
        return cls(tile=int(values["tile"]), overlap=float(values.get("overlap", 0.25)),
                   working_size=None if values.get("working_size") is None else int(values["working_size"]))


def _axis_origins(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / stride) + 1
    # The last tile is moved back to end exactly at the border instead of hanging over it.
    return sorted({min(i * stride, length - tile) for i in range(count)})


def tile_origins(height: int, width: int, tiling: Tiling) -> list[tuple[int, int]]:
    """Top-left corners (y0, x0) of the tiles covering a height×width image, row by row.

    Every pixel is covered; the last row and column end at the image's border. An image
    side shorter than a tile gets one tile at 0 (``cut_tiles`` pads it)."""
    if height < 1 or width < 1:
        raise DataError(f"cannot tile an empty image ({height}×{width})")
    ys = _axis_origins(int(height), tiling.tile, tiling.stride)
    xs = _axis_origins(int(width), tiling.tile, tiling.stride)
    return [(y, x) for y in ys for x in xs]


def _pad_to_tile(image: np.ndarray, tile: int) -> np.ndarray:
    pad_h, pad_w = max(0, tile - image.shape[0]), max(0, tile - image.shape[1])
    if not pad_h and not pad_w:
        return image
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (image.ndim - 2)
    # Mirrored content rather than black, so the padding does not read as a defect. numpy's
    # "reflect" repeats the reflection for pads longer than the side; a 1-pixel side is edge.
    mode = "reflect" if min(image.shape[0], image.shape[1]) > 1 else "edge"
    return np.pad(image, widths, mode=mode)


def cut_tiles(image: np.ndarray, tiling: Tiling) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(N×T×T×C tiles, their origins) of an H×W×C (or H×W) image; sides shorter than a tile
    are padded by reflection at the bottom / right."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise DataError(f"cut_tiles expects an H×W or H×W×C image, got shape {image.shape}")
    height, width = image.shape[:2]
    origins = tile_origins(height, width, tiling)
    padded = _pad_to_tile(image, tiling.tile)
    tile = tiling.tile
    tiles = np.stack([padded[y:y + tile, x:x + tile] for y, x in origins])
    return tiles, origins


def blend_weights(tile: int) -> np.ndarray:
    """T×T float64 blending window: a raised Hann window in each direction (outer product),
    highest at the tile's centre, ``_EDGE_WEIGHT`` of it at the edge, never zero."""
    positions = (np.arange(tile, dtype=np.float64) + 0.5) / tile
    window = _EDGE_WEIGHT + (1.0 - _EDGE_WEIGHT) * np.sin(np.pi * positions) ** 2
    return np.outer(window, window)


def stitch(
    maps: np.ndarray, origins: list[tuple[int, int]], height: int, width: int, tiling: Tiling
) -> np.ndarray:
    """The H×W float32 map of the whole image from N×T×T tile maps at ``origins``: at each
    pixel the blend-weighted mean of the tiles covering it (padding beyond the image dropped)."""
    maps = np.asarray(maps)
    tile = tiling.tile
    if maps.ndim != 3 or maps.shape[1:] != (tile, tile) or len(maps) != len(origins):
        raise ValueError(f"stitch expects {len(origins)}×{tile}×{tile} maps, got shape {maps.shape}")
    total = np.zeros((max(height, tile), max(width, tile)), dtype=np.float64)
    weight_sum = np.zeros_like(total)
    weights = blend_weights(tile)
    for tile_map, (y, x) in zip(maps, origins):
        total[y:y + tile, x:x + tile] += weights * tile_map
        weight_sum[y:y + tile, x:x + tile] += weights
    covered = total[:height, :width] / weight_sum[:height, :width]
    return covered.astype(np.float32)


def working_shape(height: int, width: int, tiling: Tiling) -> tuple[int, int]:
    """(height, width) of an image at the tiling's working resolution: unchanged without a
    ``working_size``, else scaled so the longer side is ``working_size`` (aspect kept)."""
    if tiling.working_size is None:
        return int(height), int(width)
    scale = tiling.working_size / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def to_working_resolution(image: np.ndarray, tiling: Tiling) -> np.ndarray:
    """An H×W×3 uint8 image at the working resolution (bilinear; the image itself when the
    size does not change)."""
    height, width = image.shape[:2]
    target = working_shape(height, width, tiling)
    if target == (height, width):
        return image
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((target[1], target[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def mask_to_working_resolution(mask: np.ndarray, tiling: Tiling) -> np.ndarray:
    """An H×W boolean mask at the working resolution (nearest neighbour, as masks are resized
    everywhere else)."""
    height, width = mask.shape[:2]
    target = working_shape(height, width, tiling)
    if target == (height, width):
        return np.asarray(mask, dtype=bool)
    resized = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(
        (target[1], target[0]), Image.Resampling.NEAREST)
    return np.asarray(resized) > 127
