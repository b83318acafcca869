"""A trained run as a detector: images in, one decision per image out.

The one path from pixels to a decision, shared by ``agpctl predict`` (local and on Ray) and
the Python API (:mod:`agpctl.api`), so both give the same numbers: resize and normalise
(:meth:`Detector.preprocess`), score and resize the map back to the image's size, find the
image's category, apply that category's thresholds (:meth:`Detector.detect`).

An image's category, first that applies: ``given`` (``--category`` / ``category=``),
``single`` (the model knows one category), ``path`` (a folder of the image's path is named
like a known category), ``inferred`` (closest category prototype, see
:mod:`agpctl.inference.categories`), else ``unknown`` (a run from before prototypes were
stored: the pooled thresholds decide).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from agp_data.tiling import Tiling, to_working_resolution
from agp_models.base import AnomalyModel
from agpctl import runs
from agpctl.errors import UserError
from agpctl.inference.categories import PAYLOAD_KEY, CategoryPrototypes, pooled_features
# The torch-free half, shared with the ONNX runtime (Detection is re-exported from here).
from agpctl.inference.detection import (
    Detection,
    FoundCategory,
    as_images,
    check_category,
    decide,
    decode,
    find_categories,
    resized_rgb,
)
from agpctl.inference.thresholds import ThresholdPolicy
from agpctl.inference.tiled_scoring import score_image, tile_batches
from agpctl.models import autocast, default_device

__all__ = ["Detection", "Detector", "load_detector", "resize_maps", "run_categories"]


class Detector:
    """Scores images with an eval-mode model and decides them with a run's thresholds."""

    def __init__(self, model: AnomalyModel, thresholds: ThresholdPolicy, *, precision: str = "fp32",
                 batch_size: int = 16, prototypes: CategoryPrototypes | None = None,
                 categories: Iterable[str] = (), category: str | None = None, run: str = "this run",
                 device: torch.device | None = None, tiling: Tiling | None = None):
        if batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        self.model = model
        self.thresholds = thresholds
        self.precision = precision
        self.batch_size = int(batch_size)
        self.prototypes = prototypes
        self.categories = sorted(prototypes.names if prototypes is not None else categories)
        self.run = run
        self.device = device or next(iter(model.parameters()), torch.zeros(0)).device
        self.category = check_category(category, self.categories, run)
        self.size = int(model.cfg.image_size)
        self.tiling = tiling  # the run's: whole images are cut, scored tile by tile, stitched
        self._mean = torch.tensor(model.backbone.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(model.backbone.std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_run(cls, run: runs.LoadedRun, *, category: str | None = None, threshold: str = "auto",
                 pixel_threshold: float | None = None, batch_size: int | None = None,
                 device: torch.device | None = None, warn: Callable[[str], None] | None = None) -> "Detector":
        prototypes = CategoryPrototypes.from_payload(run.checkpoint.payload.get(PAYLOAD_KEY))
        policy = ThresholdPolicy(run.thresholds, threshold, pixel_threshold, run=run.uri, warn=warn)
        return cls(run.model, policy, precision=run.cfg.train.precision,
                   batch_size=batch_size or run.cfg.train.eval_batch_size, prototypes=prototypes,
                   categories=run_categories(run, prototypes), category=category, run=run.uri, device=device,
                   tiling=Tiling.from_config(run.cfg.data))

    # -- the shared path -------------------------------------------------------------------
    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB → the model's (3, S, S) normalised input, on the CPU; with a
        tiling the whole image at the working resolution (3, H', W'), cut later by :meth:`detect`."""
        if self.tiling is not None:
            working = to_working_resolution(rgb, self.tiling)
            pixels = torch.from_numpy(np.array(working, dtype=np.float32)).permute(2, 0, 1) / 255.0
            return (pixels - self._mean) / self._std
        return (torch.from_numpy(resized_rgb(rgb, self.size)).permute(2, 0, 1) - self._mean) / self._std

    def collate(self, images: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Preprocessed images as one batch for :meth:`detect` (tiled: the list, sizes may differ)."""
        return list(images) if self.tiling is not None else torch.stack(images)

    def detect(self, images: torch.Tensor, sizes: list[tuple[int, int]], paths: list[str | None] | None = None,
               category: str | None = None) -> list[Detection]:
        """Decisions on a batch of preprocessed ``images`` (B, 3, S, S) whose originals had
        ``sizes`` (height, width); ``paths`` may name the category, ``category`` names it."""
        paths = paths or [None] * len(images)
        if self.tiling is not None:
            return self._detect_tiled(images, sizes, paths, category)
        images = images.to(self.device)
        with torch.no_grad(), autocast(self.precision, self.device):
            prediction = self.model.predict(images)
        scores = prediction.scores.float().cpu().numpy()
        maps = resize_maps(prediction.maps, sizes)
        found = self.categories_of(images, paths, category)
        return [decide(score, full_map, one, self.thresholds, path)
                for score, full_map, one, path in zip(scores, maps, found, paths)]

    def categories_of(self, images: torch.Tensor, paths: list[str | None], category: str | None = None
                      ) -> list[FoundCategory]:
        """(category, source, similarity) of each image; see the module's docstring."""
        given = check_category(category, self.categories, self.run) if category is not None else self.category

        def nearest(indices: list[int]) -> list[tuple[str, float]]:
            return self.prototypes.nearest(self._pooled(images, indices))

        inferable = self.prototypes is not None and bool(self.prototypes.names)
        return find_categories(paths, self.categories, given, nearest if inferable else None)

    def _pooled(self, images: torch.Tensor | list[torch.Tensor], indices: list[int]) -> torch.Tensor:
        """Pooled features of ``images[indices]``; tiled: the mean over each image's tiles, as the
        prototypes of a tiled run are means over training tiles."""
        if self.tiling is None:
            return pooled_features(self.model, images[indices], self.precision)
        rows = []
        for i in indices:
            tiles, _ = tile_batches(images[i], self.tiling, self.size)
            rows.append(torch.cat([pooled_features(self.model, tiles[s:s + self.batch_size].to(self.device),
                                                   self.precision) for s in range(0, len(tiles), self.batch_size)
                                   ]).mean(dim=0))
        return torch.stack(rows)

    def _detect_tiled(self, images: list[torch.Tensor], sizes: list[tuple[int, int]], paths: list[str | None],
                      category: str | None) -> list[Detection]:
        found = self.categories_of(images, paths, category)
        detections = []
        for image, size, one, path in zip(images, sizes, found, paths):
            # No category for the model, as for whole images and in the ONNX graph (OneNIP then
            # picks its prompt by similarity); the category still chooses the thresholds.
            full_map, score = score_image(self.model, image, self.tiling, self.batch_size, self.precision,
                                          self.device)
            if full_map.shape != tuple(size):  # a working resolution: back to the original's size
                full_map = resize_maps(torch.from_numpy(full_map)[None], [size])[0]
            detections.append(decide(score, full_map, one, self.thresholds, path))
        return detections

    # -- the Python API -------------------------------------------------------------------
    def predict(self, images: Any, category: str | None = None) -> list[Detection]:
        """One :class:`Detection` per image, in input order. ``images``: a path (local or
        ``s3://``), a PIL image, a numpy array (HxWx3 uint8, or float RGB in [0, 1]; NxHxWx3 for
        several), a torch tensor (3xHxW or Bx3xHxW RGB in [0, 1], or uint8), or a list of them.
        ``category`` names the images' category (else the detector's, else found per image)."""
        inputs = as_images(images)
        check_category(category, self.categories, self.run)
        detections: list[Detection] = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = [(decode(item), item if isinstance(item, str) else None)
                     for item in inputs[start:start + self.batch_size]]
            batch = self.collate([self.preprocess(rgb) for rgb, _ in chunk])
            detections += self.detect(batch, [rgb.shape[:2] for rgb, _ in chunk], [path for _, path in chunk],
                                      category)
        return detections


def run_categories(run: runs.LoadedRun, prototypes: CategoryPrototypes | None) -> list[str]:
    """The sorted names of the categories ``run``'s model knows."""
    if prototypes is not None:
        return sorted(prototypes.names)
    # Runs from before prototypes were stored still name their categories here.
    return sorted(list(run.thresholds.get("per_category") or {}) or list(run.cfg.data.categories or []))


def load_detector(run: str | os.PathLike, category: str | None = None, *, threshold: str | float = "auto",
                  pixel_threshold: float | None = None, device: str | torch.device | None = None,
                  batch_size: int | None = None, on_warning: Callable[[str], None] | None = None) -> Detector:
    """The detector of a trained run (a local directory or ``s3://`` URI). ``category``: for a
    per-category run the category's model (required when it holds several); for a multi-class
    run the category of every image. ``threshold``: "auto" (the run's calibrated thresholds)
    or a number; ``device``: default CUDA when available. Warnings go to ``on_warning``
    (default: Python's ``warnings``)."""
    warn = on_warning or (lambda text: warnings.warn(text, stacklevel=3))
    model_uri = runs.select_model_run(os.fspath(run), category)
    chosen = torch.device(device) if device is not None else default_device()
    loaded = runs.load_run(model_uri, chosen, warn=warn)
    return Detector.from_run(loaded, category=category, threshold=str(threshold), pixel_threshold=pixel_threshold,
                             batch_size=batch_size, device=chosen, warn=warn)


def resize_maps(maps: torch.Tensor, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Each (S, S) model map bilinearly resized to its image's (height, width), on the maps' device."""
    out = []
    for m, (height, width) in zip(maps, sizes):
        resized = F.interpolate(m[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
        out.append(resized[0, 0].cpu().numpy())
    return out

