"""Datasets of a tiled run (``data.tile`` set; see :mod:`agp_data.tiling`).

- :class:`TileDataset` — training: every grid tile of every image is one item, in the item
  format of :class:`agp_data.dataset.AnomalyDataset` (``image`` 3×S×S, ``mask`` 1×S×S,
  ``label``, ``category``, ``index``, ``path``). Item indices are stable (image by image, tile
  by tile), so the feature cache keyed by ``index`` keeps working, and ``samples`` has one
  entry per item, so :class:`agp_data.training_view.TrainingView` draws pseudo anomalies and
  prompts per tile.
- :class:`WholeImageDataset` — evaluation: one item per image at the *working* resolution
  (``image`` 3×H×W, ``mask`` 1×H×W); the scorer cuts it into tiles and stitches the maps.

A tile is fed to the model at ``image_size``: resized (bilinear, antialiased; masks nearest)
only when the tile size differs from it. Both datasets resize the same way, so the model sees
tiles at training and at evaluation alike.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from agp_data import storage
from agp_data.errors import DataError
from agp_data.images import image_size as header_size
from agp_data.images import read_image, read_mask
from agp_data.samples import Sample
from agp_data.tiling import (
    Tiling,
    cut_tiles,
    mask_to_working_resolution,
    tile_origins,
    to_working_resolution,
    working_shape,
)

__all__ = ["TileDataset", "WholeImageDataset", "resize_tiles", "resize_tile_masks", "working_shapes",
           "build_tiled_datasets"]


def resize_tiles(tiles: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, T, T) float tiles at the model's (N, 3, size, size); the tiles themselves when T == size."""
    if tiles.shape[-1] == size and tiles.shape[-2] == size:
        return tiles
    return F.interpolate(tiles, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def resize_tile_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, T, T) 0/1 masks at (N, 1, size, size), nearest neighbour."""
    if masks.shape[-1] == size and masks.shape[-2] == size:
        return masks
    return F.interpolate(masks, size=(size, size), mode="nearest")


def _channel_values(values: Sequence[float], name: str) -> torch.Tensor:
    tensor = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    if tensor.shape != (3,):
        raise DataError(f"{name} must have 3 values (one per RGB channel), got {list(values)}")
    return tensor.view(3, 1, 1)


@lru_cache(maxsize=65536)
def _native_shape(path: str) -> tuple[int, int]:
    width, height = header_size(path)
    return height, width


def working_shapes(samples: Sequence[Sample], tiling: Tiling) -> list[tuple[int, int]]:
    """(height, width) of each sample's image at the working resolution, from file headers
    (read once per path and process)."""
    return [working_shape(*_native_shape(s.image), tiling) for s in samples]


class _WorkingImages:
    """Images and masks of ``samples`` at the tiling's working resolution, decoded once while a
    byte budget lasts; beyond it the last decoded image is still kept (tiles of one image are
    read one after another by in-order loaders)."""

    def __init__(self, samples: Sequence[Sample], tiling: Tiling, mean, std, cache_dir: str | None,
                 decoded_cache_mb: float) -> None:
        self.mean, self.std = _channel_values(mean, "mean"), _channel_values(std, "std")
        if bool((self.std <= 0).any()):
            raise DataError(f"std values must be positive, got {list(std)}")
        self.samples = list(samples)
        self.tiling = tiling
        self.cache_dir = cache_dir
        self.budget = int(decoded_cache_mb * 2**20)
        self.used = 0
        self.images: dict[int, np.ndarray] = {}
        self.masks: dict[int, np.ndarray] = {}
        self._last: tuple[int, np.ndarray, np.ndarray] | None = None
        self.shapes = working_shapes(self.samples, tiling)

    def _local(self, path: str) -> str:
        return storage.local_copy(path, self.cache_dir) if storage.is_s3(path) else path

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(H×W×3 uint8 image, H×W bool mask) of sample ``index`` at the working resolution."""
        if index in self.images:
            return self.images[index], self.masks[index]
        if self._last is not None and self._last[0] == index:
            return self._last[1], self._last[2]
        sample = self.samples[index]
        native = np.asarray(read_image(self._local(sample.image)), dtype=np.uint8)
        image = to_working_resolution(native, self.tiling)
        if sample.mask is None:
            mask = np.zeros(image.shape[:2], dtype=bool)
        else:
            mask = read_mask(self._local(sample.mask), size=(native.shape[1], native.shape[0]))
            mask = mask_to_working_resolution(mask, self.tiling)
        if image.shape[:2] != self.shapes[index]:  # the header lied (e.g. EXIF): trust the pixels
            self.shapes[index] = image.shape[:2]
        image.setflags(write=False)
        mask.setflags(write=False)
        if self.used + image.nbytes + mask.nbytes <= self.budget:
            self.images[index], self.masks[index] = image, mask
            self.used += image.nbytes + mask.nbytes
        self._last = (index, image, mask)
        return image, mask

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """(…×)H×W×3 uint8 → normalised 3×H×W (or N×3×H×W) float tensor."""
        tensor = torch.from_numpy(np.array(pixels, dtype=np.float32)).div_(255.0)  # a copy: cached pixels are read-only
        tensor = tensor.movedim(-1, -3)
        return (tensor - self.mean) / self.std


class _OverWorkingImages(Dataset):
    """What both tiled datasets hold: the images at the working resolution, the tiling, the
    model's input size, normalisation and categories."""

    def __init__(self, samples: Sequence[Sample], tiling: Tiling, image_size: int, mean: Sequence[float],
                 std: Sequence[float], cache_dir: str | None = None, decoded_cache_mb: float = 0) -> None:
        if not samples:
            raise DataError("no samples to load: check the dataset root, categories and split")
        self.images = _WorkingImages(samples, tiling, mean, std, cache_dir, decoded_cache_mb)
        self.tiling = tiling
        self.image_size = int(image_size)
        self.mean, self.std = self.images.mean, self.images.std
        self.categories: list[str] = sorted({s.category for s in samples})


class TileDataset(_OverWorkingImages):
    """Every grid tile of every image of ``samples`` as one item (see the module docstring)."""

    def __init__(self, samples: Sequence[Sample], tiling: Tiling, image_size: int, mean: Sequence[float],
                 std: Sequence[float], cache_dir: str | None = None, decoded_cache_mb: float = 0) -> None:
        super().__init__(samples, tiling, image_size, mean, std, cache_dir, decoded_cache_mb)
        self.source_samples = list(samples)
        counts = [len(_origins(shape, tiling)) for shape in self.images.shapes]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        # One entry per item: TrainingView pairs item i with samples[i].
        self.samples: list[Sample] = [s for s, n in zip(self.source_samples, counts) for _ in range(n)]

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(image, tile) of item ``index``."""
        image = bisect.bisect_right(self._starts, index) - 1
        return image, index - self._starts[image]

    def __getitem__(self, index: int) -> dict[str, object]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} tiles")
        source, number = self.locate(index)
        image, mask = self.images.load(source)
        y, x = _origins(image.shape[:2], self.tiling)[number]
        tile = self.tiling.tile
        pixels = _padded_crop(image, y, x, tile)
        mask_tile = _padded_crop(mask, y, x, tile)
        tensor = resize_tiles(self.images.normalize(pixels)[None], self.image_size)[0]
        mask_tensor = resize_tile_masks(torch.from_numpy(mask_tile.astype(np.float32))[None, None], self.image_size)[0]
        sample = self.source_samples[source]
        return {"image": tensor.contiguous(), "mask": mask_tensor, "label": int(sample.label),
                "category": sample.category, "index": index, "path": sample.image}


class WholeImageDataset(_OverWorkingImages):
    """One item per image at the working resolution: ``image`` 3×H×W normalised, ``mask``
    1×H×W, ``label``, ``category``, ``index``, ``path``. Scored by cutting tiles
    (:func:`agpctl.inference.scoring.predict_dataset` with a tiling)."""

    def __init__(self, samples: Sequence[Sample], tiling: Tiling, image_size: int, mean: Sequence[float],
                 std: Sequence[float], cache_dir: str | None = None, decoded_cache_mb: float = 0) -> None:
        super().__init__(samples, tiling, image_size, mean, std, cache_dir, decoded_cache_mb)
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(height, width) of each image at the working resolution."""
        return list(self.images.shapes)

    def pixels(self, index: int) -> np.ndarray:
        return self.images.load(index)[0]

    def load_image(self, index: int):
        """The image at the working resolution as a PIL image (for pseudo-anomaly validation)."""
        return Image.fromarray(self.pixels(index))

    def normalize(self, image) -> torch.Tensor:
        return self.images.normalize(np.asarray(image, dtype=np.uint8))

    def __getitem__(self, index: int) -> dict[str, object]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image, mask = self.images.load(index)
        sample = self.samples[index]
        return {"image": self.images.normalize(image), "mask": torch.from_numpy(mask.astype(np.float32))[None],
                "label": int(sample.label), "category": sample.category, "index": index, "path": sample.image}


def _origins(shape: tuple[int, int], tiling: Tiling) -> list[tuple[int, int]]:
    return tile_origins(shape[0], shape[1], tiling)


def _padded_crop(array: np.ndarray, y: int, x: int, tile: int) -> np.ndarray:
    crop = array[y:y + tile, x:x + tile]
    if crop.shape[0] == tile and crop.shape[1] == tile:
        return crop
    tiles, _ = cut_tiles(crop, Tiling(tile=tile))  # an image smaller than a tile: reflect-padded
    return tiles[0]


def build_tiled_datasets(data, train: list[Sample], val: list[Sample], test: list[Sample], tiling: Tiling,
                         image_size: int, mean, std):
    """(train tiles, held-out whole images or None, test whole images) of a tiled run."""
    s3_cache = os.path.join(data.cache_dir, "s3") if data.cache_dir else None
    common = dict(tiling=tiling, image_size=image_size, mean=mean, std=std, cache_dir=s3_cache,
                  decoded_cache_mb=data.decoded_cache_mb)
    # Held-out and test images are scored once per evaluation: no decode cache for them.
    whole = {**common, "decoded_cache_mb": 0}
    return (TileDataset(train, **common), WholeImageDataset(val, **whole) if val else None,
            WholeImageDataset(test, **whole))
