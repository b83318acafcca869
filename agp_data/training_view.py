"""Training view of a dataset: adds the batch extras a method asks for.

``TrainingView(dataset, extras)`` returns the dataset's own items (``image``, ``mask``,
``label``, ``category``, ``index``, ``path``) plus, per requested extra:

- ``"pseudo_anomaly"``: ``anomaly_image`` (3×S×S, normalised like ``image``) — the item's
  image with a synthesised defect (:mod:`agp_data.anomaly_synthesis`) — and ``anomaly_mask``
  (1×S×S float 0/1), its exact mask: outside the mask ``anomaly_image`` equals ``image``
  bit for bit, inside every pixel differs. The defect is drawn on the un-normalised uint8
  view of exactly the image the dataset returned (so augmentations done by the dataset are
  kept), then normalised with the dataset's mean / std.
- ``"prompt"``: ``prompt_image`` (3×S×S) — another normal training image of the same
  category — and ``prompt_index``, its index in the dataset (so a method can reuse cached
  clean features of it). The prompt is drawn from the category's normal items made from
  *another* image; in a few-shot expansion with one image per category it is another variant
  of the same image, and a category with one item in all prompts with itself.

Randomness: every draw comes from a generator seeded by ``(seed, epoch, index, stream)``, so
an item is reproducible, differs from epoch to epoch (:meth:`TrainingView.set_epoch`), and
needs no shared mutable RNG — DataLoader workers give the same items as the main process.
The epoch is kept in shared memory: ``set_epoch`` before creating the epoch's iterator
reaches the workers, ``persistent_workers=True`` included.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from agp_data.anomaly_synthesis import SynthesisConfig, list_texture_files, synthesize

EXTRAS = frozenset({"pseudo_anomaly", "prompt"})
_ANOMALY_STREAM, _PROMPT_STREAM = 1, 2


class TrainingView(Dataset):
    def __init__(
        self,
        dataset: Any,
        extras: Iterable[str] = (),
        synthesis: SynthesisConfig | None = None,
        seed: int = 0,
    ):
        extras = frozenset(extras)
        unknown = sorted(extras - EXTRAS)
        if unknown:
            raise ValueError(f"unknown batch extras {unknown}; known: {sorted(EXTRAS)}")
        self.dataset = dataset
        self.extras = extras
        self.synthesis = synthesis or SynthesisConfig()
        self.seed = int(seed)
        # The epoch lives in shared memory so that DataLoader workers, persistent ones
        # included, see set_epoch() from the main process (it is a counter, not an RNG).
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._mean = torch.as_tensor(_find(dataset, "mean"), dtype=torch.float32).reshape(3, 1, 1)
        self._std = torch.as_tensor(_find(dataset, "std"), dtype=torch.float32).reshape(3, 1, 1)
        # Listed once, here, so a wrong texture folder fails before training starts.
        self._textures: list[str] | None = None
        if "pseudo_anomaly" in extras and self.synthesis.texture_root:
            self._textures = list_texture_files(self.synthesis.texture_root)
        self._samples: list[Any] = []
        self._factor = 1
        self._normal_by_category: dict[str, list[int]] = {}
        if "prompt" in extras:
            self._samples = list(_find(dataset, "samples"))
            if len(dataset) % len(self._samples) != 0:
                raise ValueError(
                    f"TrainingView: dataset has {len(dataset)} items but {len(self._samples)} samples; "
                    "expected one item per sample, or a whole number of variants per sample"
                )
            # TransformedDataset (few-shot expansion): item i is variant i % f of sample i // f.
            self._factor = len(dataset) // len(self._samples)
            for i in range(len(dataset)):
                sample = self._samples[i // self._factor]
                if int(sample.label) == 0:
                    self._normal_by_category.setdefault(sample.category, []).append(i)

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Draws of the next iteration use ``epoch``; call before creating the epoch's iterator."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.dataset)

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, int(index), stream]))

    # -- normalisation -----------------------------------------------------------------
    def to_uint8(self, image: torch.Tensor) -> np.ndarray:
        """Normalised 3×H×W tensor → H×W×3 uint8 (the dataset's un-normalised pixels)."""
        pixels = (image.float() * self._std + self._mean) * 255.0
        return pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()

    def normalise(self, image: np.ndarray) -> torch.Tensor:
        """H×W×3 uint8 → normalised 3×H×W float tensor."""
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        return (pixels - self._mean) / self._std

    # -- extras ------------------------------------------------------------------------
    def prompt_index(self, index: int) -> int:
        """Index of the prompt for item ``index`` in the current epoch: a uniformly drawn
        normal item of the same category made from another image; failing that another
        variant of the same image (few-shot with k = 1); failing that the item itself."""
        source = index // self._factor
        category = self._samples[source].category
        same_category = self._normal_by_category.get(category, [])
        candidates = [j for j in same_category if j // self._factor != source]
        if not candidates:
            candidates = [j for j in same_category if j != index]
        if not candidates:
            return int(index)
        return int(candidates[int(self._rng(index, _PROMPT_STREAM).integers(0, len(candidates)))])

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        if "pseudo_anomaly" in self.extras:
            image = item["image"]
            anomalous, mask = synthesize(
                self.to_uint8(image), self._rng(index, _ANOMALY_STREAM), self.synthesis, self._textures
            )
            inside = torch.from_numpy(mask)
            # Outside the mask keep the original tensor exactly (no uint8 round trip).
            item["anomaly_image"] = torch.where(inside, self.normalise(anomalous), image.float())
            item["anomaly_mask"] = inside.unsqueeze(0).float()
        if "prompt" in self.extras:
            j = self.prompt_index(index)
            item["prompt_image"] = self.dataset[j]["image"]
            item["prompt_index"] = j
        return item


def _find(dataset: Any, name: str) -> Any:
    """``dataset.<name>``, looking through wrappers (``.base``, ``.dataset``) if needed."""
    current = dataset
    for _ in range(8):
        value = getattr(current, name, None)
        if value is not None:
            return value
        current = getattr(current, "base", None) or getattr(current, "dataset", None)
        if current is None:
            break
    raise ValueError(f"TrainingView needs a dataset with .{name} (an agp_data.dataset.AnomalyDataset or a wrapper of one)")
