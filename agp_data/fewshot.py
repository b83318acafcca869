"""Few-shot setting: k normal images per category, each expanded 32-fold geometrically.

The 32 transforms are the 8 symmetries of the square (4 quarter turns, each with or without a
horizontal flip: exact, no interpolation) followed by one of 4 small rotations, 0°, +10°, −10°,
+20° (bilinear for the image, nearest for the mask, reflection padding so no black corners).
Transform ``t`` uses symmetry ``t % 8`` and small rotation ``t // 8``: a factor of 8 gives the
exact symmetries only, 32 all of them. No two of the 32 coincide, since the small angles never
differ by a multiple of 90°.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from agp_data.dataset import AnomalyDataset, TransformedDataset
from agp_data.errors import DataError
from agp_data.samples import Sample

SMALL_ROTATIONS_DEG = (0.0, 10.0, -10.0, 20.0)
MAX_FACTOR = 8 * len(SMALL_ROTATIONS_DEG)


@dataclass(frozen=True)
class GeometricTransform:
    """Quarter turns + optional flip (``symmetry`` 0..7), then a small rotation in degrees."""

    symmetry: int
    degrees: float

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.shape[-1] != image.shape[-2]:
            raise ValueError("geometric few-shot transforms need square images")
        image, mask = self._symmetry(image), self._symmetry(mask)
        if self.degrees:
            image = self._rotate(image, "bilinear")
            mask = self._rotate(mask, "nearest")
        return image, mask

    def _symmetry(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetry >= 4:
            x = torch.flip(x, dims=(-1,))
        return torch.rot90(x, self.symmetry % 4, dims=(-2, -1))

    def _rotate(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        radians = math.radians(self.degrees)
        cos, sin = math.cos(radians), math.sin(radians)
        theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], dtype=x.dtype)
        grid = F.affine_grid(theta, (1, *x.shape), align_corners=False)
        return F.grid_sample(x.unsqueeze(0), grid, mode=mode, padding_mode="reflection", align_corners=False)[
            0
        ]


def fewshot_transforms(factor: int = MAX_FACTOR) -> list[GeometricTransform]:
    """The first ``factor`` (1..32) transforms; index 0 is the identity."""
    if not 1 <= int(factor) <= MAX_FACTOR:
        raise DataError(f"few-shot expansion factor must be between 1 and {MAX_FACTOR}, got {factor}")
    return [GeometricTransform(t % 8, SMALL_ROTATIONS_DEG[t // 8]) for t in range(int(factor))]


def select_shots(samples: list[Sample], k: int, seed: int) -> list[Sample]:
    """``k`` normal training samples per category, drawn reproducibly for ``seed``.

    The draw for a category depends only on (seed, category) and its sorted candidates, not on
    the other categories. Categories with fewer than ``k`` normal training images raise DataError.
    """
    if int(k) < 1:
        raise DataError(f"few-shot k must be at least 1, got {k}")
    by_category: dict[str, list[Sample]] = {}
    for sample in samples:
        if sample.split == "train" and sample.label == 0:
            by_category.setdefault(sample.category, []).append(sample)
    if not by_category:
        raise DataError("few-shot selection found no normal training images")
    chosen: list[Sample] = []
    for category in sorted(by_category):
        candidates = sorted(by_category[category], key=lambda s: s.image)
        if len(candidates) < k:
            raise DataError(
                f"category '{category}' has {len(candidates)} normal training images, fewer than k={k}"
            )
        rng = random.Random(f"agp-fewshot:{seed}:{category}")  # str seeds hash deterministically
        picked = rng.sample(range(len(candidates)), int(k))
        chosen.extend(candidates[i] for i in sorted(picked))
    return chosen


class ExpandedDataset(TransformedDataset):
    """Item ``i`` = ``base[i // factor]`` under transform ``i % factor`` (image and mask)."""

    def __init__(self, base: AnomalyDataset, factor: int = MAX_FACTOR) -> None:
        super().__init__(base, fewshot_transforms(factor))
