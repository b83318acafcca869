"""A labelled validation set made from normal images only.

Unsupervised anomaly detection has no defective images to select hyper-parameters on
(the test split must stay untouched). :class:`SyntheticValidationSet` turns the held-out
*normal* training images into a labelled set: every normal image appears twice, once as
itself (label 0, empty mask) and once with a pseudo anomaly synthesised on it
(:func:`agp_data.anomaly_synthesis.synthesize`, label 1, its exact mask).

Items ``0 .. n-1`` are the normal images, items ``n .. 2n-1`` their anomalous copies, in the
item format of :class:`agp_data.dataset.AnomalyDataset` (``image``, ``mask``, ``label``,
``category``, ``index``, ``path``). The defect of item ``n + i`` is drawn from a generator
seeded by ``(seed, i)`` only, so the set is identical in every process, every epoch and every
trial of a sweep: trials are compared on exactly the same images.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from agp_data.anomaly_synthesis import SynthesisConfig, list_texture_files, synthesize
from agp_data.dataset import AnomalyDataset
from agp_data.errors import DataError

_VALIDATION_STREAM = 7  # keeps these draws apart from the training view's streams


class SyntheticValidationSet(Dataset):
    def __init__(self, normals: AnomalyDataset, seed: int = 0, synthesis: SynthesisConfig | None = None) -> None:
        if normals is None or len(normals) == 0:
            raise DataError("synthetic validation needs held-out normal images; raise --val-fraction")
        labels = {int(s.label) for s in normals.samples}
        if labels != {0}:
            raise DataError("synthetic validation must be built from normal images only")
        self.normals = normals
        self.seed = int(seed)
        # Every anomalous copy must carry a defect: probability 1 whatever the caller's config.
        self.synthesis = dataclasses.replace(synthesis or SynthesisConfig(), probability=1.0)
        self._textures = list_texture_files(self.synthesis.texture_root) if self.synthesis.texture_root else None
        self.samples = normals.samples
        self.categories = normals.categories
        self.mean, self.std = normals.mean, normals.std

    def __len__(self) -> int:
        return 2 * len(self.normals)

    def anomaly(self, source: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 H×W×3 image, bool H×W mask) of the anomalous copy of normal image ``source``."""
        image = np.asarray(self.normals.load_image(source).convert("RGB"), dtype=np.uint8)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(source), _VALIDATION_STREAM]))
        return synthesize(image, rng, self.synthesis, self._textures)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        count = len(self.normals)
        source = index % count
        item = dict(self.normals[source])
        item["index"] = index
        if index < count:
            item["label"] = 0
            item["mask"] = torch.zeros_like(item["mask"])
            return item
        image, mask = self.anomaly(source)
        item["image"] = self.normals.normalize(Image.fromarray(image))
        item["mask"] = torch.from_numpy(mask.astype(np.float32)).unsqueeze(0)
        item["label"] = 1
        return item
