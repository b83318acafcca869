"""torch Datasets over parsed samples.

Items are dicts that torch's ``default_collate`` batches directly::

    image     FloatTensor 3×S×S   resized bilinearly (PIL), normalised with mean/std
    mask      FloatTensor 1×S×S   0/1, resized nearest; all zero when the sample has no mask
    label     int                 0 normal, 1 anomalous
    category  str
    index     int                 position in this dataset
    path      str                 the image's local path or s3:// URI
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from agp_data import storage
from agp_data.errors import DataError
from agp_data.images import read_image, read_mask
from agp_data.samples import Sample

Item = dict[str, object]
# A geometric transform applied identically to image (3×S×S) and mask (1×S×S) tensors.
PairTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _triple(values: Sequence[float], name: str) -> torch.Tensor:
    tensor = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    if tensor.shape != (3,):
        raise DataError(f"{name} must have 3 values (one per RGB channel), got {list(values)}")
    return tensor.view(3, 1, 1)


class AnomalyDataset(Dataset):
    """Images and masks of ``samples`` at ``image_size``×``image_size``, normalised."""

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        cache_dir: str | None = None,
        decoded_cache_mb: float = 0,
    ) -> None:
        self.samples: list[Sample] = list(samples)
        if not self.samples:
            raise DataError("no samples to load: check the dataset root, categories and split")
        if int(image_size) < 1:
            raise DataError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.mean = _triple(mean, "mean")
        self.std = _triple(std, "std")
        if bool((self.std <= 0).any()):
            raise DataError(f"std values must be positive, got {list(std)}")
        self.cache_dir = cache_dir
        self.categories: list[str] = sorted({s.category for s in self.samples})
        # Decode once: resized uint8 pixels (and masks) per index, up to a byte budget, so
        # that epochs after the first skip file reads, decoding and resizing. Each loader
        # process fills its own copy; persistent loader workers keep it across epochs.
        self.decoded_cache_bytes = int(decoded_cache_mb * 2**20)
        self._decoded: dict[int, np.ndarray] = {}
        self._decoded_masks: dict[int, np.ndarray] = {}
        self._decoded_bytes = 0

    def __len__(self) -> int:
        return len(self.samples)

    def _local(self, path: str) -> str:
        return storage.local_copy(path, self.cache_dir) if storage.is_s3(path) else path

    def load_image(self, index: int) -> Image.Image:
        """The sample's image, RGB, resized to the dataset size (not normalised)."""
        return Image.fromarray(self.pixels(index))

    def pixels(self, index: int) -> np.ndarray:
        """The sample's image as S×S×3 uint8, resized (decoded once while the budget lasts)."""
        cached = self._decoded.get(index)
        if cached is not None:
            return cached
        image = read_image(self._local(self.samples[index].image))
        size = (self.image_size, self.image_size)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        self._remember(self._decoded, index, array)
        return array

    def load_mask(self, index: int) -> torch.Tensor:
        """1×S×S float 0/1 mask (zeros when the sample has none)."""
        sample = self.samples[index]
        if sample.mask is None:
            return torch.zeros(1, self.image_size, self.image_size)
        mask = self._decoded_masks.get(index)
        if mask is None:
            mask = read_mask(self._local(sample.mask), size=(self.image_size, self.image_size)).astype(np.uint8)
            self._remember(self._decoded_masks, index, mask)
        return torch.from_numpy(mask.astype(np.float32)).unsqueeze(0)  # astype copies: writable

    def _remember(self, store: dict[int, np.ndarray], index: int, array: np.ndarray) -> None:
        if self._decoded_bytes + array.nbytes <= self.decoded_cache_bytes:
            array.setflags(write=False)  # shared by every later item of this index
            store[index] = array
            self._decoded_bytes += array.nbytes

    def normalize(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        pixels = np.asarray(image, dtype=np.uint8)
        # cached pixels are read-only; torch wants to own writable memory (a 1-byte-per-pixel copy)
        tensor = (torch.from_numpy(pixels) if pixels.flags.writeable else torch.tensor(pixels))
        tensor = tensor.permute(2, 0, 1).float().div_(255.0)
        return (tensor - self.mean) / self.std

    def __getitem__(self, index: int) -> Item:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        sample = self.samples[index]
        return {
            "image": self.normalize(self.pixels(index)),
            "mask": self.load_mask(index),
            "label": int(sample.label),
            "category": sample.category,
            "index": index,
            "path": sample.image,
        }


class TransformedDataset(Dataset):
    """``len(transforms)`` variants of every item of ``base``.

    Item ``i`` is ``base[i // n]`` with ``transforms[i % n]`` applied to its image and mask
    (n = ``len(transforms)``); its ``index`` field is ``i``. Deterministic: the transform is
    chosen by index, never at random.
    """

    def __init__(self, base: Dataset, transforms: Sequence[PairTransform]) -> None:
        if not transforms:
            raise ValueError("TransformedDataset needs at least one transform")
        self.base = base
        self.transforms = list(transforms)
        self.factor = len(self.transforms)
        self.samples = getattr(base, "samples", None)
        self.categories = getattr(base, "categories", None)

    def __len__(self) -> int:
        return len(self.base) * self.factor

    def transform_index(self, index: int) -> int:
        return index % self.factor

    def __getitem__(self, index: int) -> Item:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        item = dict(self.base[index // self.factor])
        image, mask = self.transforms[index % self.factor](item["image"], item["mask"])
        item["image"], item["mask"], item["index"] = image.contiguous(), mask.contiguous(), index
        return item
