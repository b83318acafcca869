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
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from agp_data import storage
from agp_data.errors import DataError
from agp_data.images import read_image, rgb_array
from agp_models.base import AnomalyModel
from agpctl import runs
from agpctl.errors import UserError
from agpctl.inference.categories import (
    PAYLOAD_KEY,
    CategoryPrototypes,
    category_in_path,
    check_category,
    pooled_features,
)
from agpctl.inference.thresholds import ThresholdPolicy
from agpctl.models import autocast, default_device

ACCEPTED = ("an image path, a PIL image, a numpy array (HxWx3, uint8 or float in [0, 1]), "
            "a torch tensor (3xHxW or Bx3xHxW, RGB in [0, 1]) or a list of them")


@dataclass(eq=False)  # arrays have no single truth value: compare fields, not detections
class Detection:
    """The decision on one image; ``map`` and ``mask`` have the image's original size."""

    score: float
    map: np.ndarray = field(repr=False)  # (H, W) float32 anomaly map
    mask: np.ndarray = field(repr=False)  # (H, W) bool: map > pixel_threshold
    anomalous: bool  # score > image_threshold
    category: str | None
    category_source: str  # given | single | path | inferred | unknown
    category_similarity: float | None  # cosine similarity to the category's prototype (inferred only)
    image_threshold: float
    pixel_threshold: float
    path: str | None = None  # the input's path, when it was given as one


class Detector:
    """Scores images with an eval-mode model and decides them with a run's thresholds."""

    def __init__(self, model: AnomalyModel, thresholds: ThresholdPolicy, *, precision: str = "fp32",
                 batch_size: int = 16, prototypes: CategoryPrototypes | None = None,
                 categories: Iterable[str] = (), category: str | None = None, run: str = "this run",
                 device: torch.device | None = None):
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
        self._mean = torch.tensor(model.backbone.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(model.backbone.std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_run(cls, run: runs.LoadedRun, *, category: str | None = None, threshold: str = "auto",
                 pixel_threshold: float | None = None, batch_size: int | None = None,
                 device: torch.device | None = None, warn: Callable[[str], None] | None = None) -> "Detector":
        prototypes = CategoryPrototypes.from_payload(run.checkpoint.payload.get(PAYLOAD_KEY))
        # Runs from before prototypes were stored still name their categories here.
        known = list(run.thresholds.get("per_category") or {}) or list(run.cfg.data.categories or [])
        policy = ThresholdPolicy(run.thresholds, threshold, pixel_threshold, run=run.uri, warn=warn)
        return cls(run.model, policy, precision=run.cfg.train.precision,
                   batch_size=batch_size or run.cfg.train.eval_batch_size, prototypes=prototypes,
                   categories=known, category=category, run=run.uri, device=device)

    # -- the shared path -------------------------------------------------------------------
    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB → the model's (3, S, S) normalised input, on the CPU."""
        image = Image.fromarray(rgb).resize((self.size, self.size), Image.Resampling.BILINEAR)
        resized = np.asarray(image, dtype=np.float32) / 255.0
        return (torch.from_numpy(resized).permute(2, 0, 1) - self._mean) / self._std

    def detect(self, images: torch.Tensor, sizes: list[tuple[int, int]], paths: list[str | None] | None = None,
               category: str | None = None) -> list[Detection]:
        """Decisions on a batch of preprocessed ``images`` (B, 3, S, S) whose originals had
        ``sizes`` (height, width); ``paths`` may name the category, ``category`` names it."""
        paths = paths or [None] * len(images)
        images = images.to(self.device)
        with torch.no_grad(), autocast(self.precision, self.device):
            prediction = self.model.predict(images)
        scores = prediction.scores.float().cpu().numpy()
        maps = resize_maps(prediction.maps, sizes)
        found = self.categories_of(images, paths, category)
        detections = []
        for score, full_map, (name, source, similarity), path in zip(scores, maps, found, paths):
            chosen = self.thresholds.for_category(name)
            detections.append(Detection(
                score=float(score), map=full_map, mask=full_map > chosen.pixel, anomalous=bool(score > chosen.image),
                category=name, category_source=source, category_similarity=similarity,
                image_threshold=chosen.image, pixel_threshold=chosen.pixel, path=path,
            ))
        return detections

    def categories_of(self, images: torch.Tensor, paths: list[str | None], category: str | None = None
                      ) -> list[tuple[str | None, str, float | None]]:
        """(category, source, similarity) of each image; see the module's docstring."""
        given = check_category(category, self.categories, self.run) if category is not None else self.category
        if given is not None:
            return [(given, "given", None)] * len(images)
        if len(self.categories) == 1:
            return [(self.categories[0], "single", None)] * len(images)
        found: list[tuple[str | None, str, float | None]] = [(None, "unknown", None)] * len(images)
        unnamed = []
        for i, path in enumerate(paths):
            name = category_in_path(path, self.categories)
            if name is None:
                unnamed.append(i)
            else:
                found[i] = (name, "path", None)
        if unnamed and self.prototypes is not None and self.prototypes.names:
            features = pooled_features(self.model, images[unnamed], self.precision)
            for i, (name, similarity) in zip(unnamed, self.prototypes.nearest(features)):
                found[i] = (name, "inferred", similarity)
        return found

    # -- the Python API -------------------------------------------------------------------
    def predict(self, images: Any, category: str | None = None) -> list[Detection]:
        """One :class:`Detection` per image, in input order. ``images``: a path (local or
        ``s3://``), a PIL image, a numpy array (HxWx3 uint8, or float RGB in [0, 1]; NxHxWx3 for
        several), a torch tensor (3xHxW or Bx3xHxW RGB in [0, 1], or uint8), or a list of them.
        ``category`` names the images' category (else the detector's, else found per image)."""
        inputs = _inputs(images)
        check_category(category, self.categories, self.run)
        detections: list[Detection] = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = [(_decode(item), item if isinstance(item, str) else None)
                     for item in inputs[start:start + self.batch_size]]
            batch = torch.stack([self.preprocess(rgb) for rgb, _ in chunk])
            detections += self.detect(batch, [rgb.shape[:2] for rgb, _ in chunk], [path for _, path in chunk],
                                      category)
        return detections


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


# -- inputs of the Python API ---------------------------------------------------------------
def _inputs(images: Any) -> list[str | np.ndarray]:
    """``images`` as a flat list of paths (checked to exist when local) and (H, W, 3) arrays
    (converted and checked now, so a bad input fails before any image is scored)."""
    if isinstance(images, (list, tuple)):
        return [one for item in images for one in _inputs(item)]
    if isinstance(images, (str, os.PathLike)):
        path = os.fspath(images)
        if not storage.is_s3(path):
            if os.path.isdir(path):
                raise UserError(f"{path} is a folder; pass image paths (e.g. sorted(glob.glob('{path}/*.png')))")
            if not os.path.isfile(path):
                raise UserError(f"image {path} does not exist; check the path")
        return [path]
    if isinstance(images, Image.Image):
        try:
            return [rgb_array(images)]
        except DataError as exc:
            raise UserError(str(exc)) from None
    if isinstance(images, torch.Tensor):
        return _from_tensor(images)
    if isinstance(images, np.ndarray):
        return _from_array(images)
    raise UserError(f"cannot score a {type(images).__name__}; pass {ACCEPTED}")


def _from_tensor(tensor: torch.Tensor) -> list[np.ndarray]:
    if tensor.ndim == 3 and tensor.shape[0] == 3:
        return _from_array(tensor.detach().cpu().permute(1, 2, 0).numpy(), what="tensor")
    if tensor.ndim == 4 and tensor.shape[1] == 3:
        return _from_array(tensor.detach().cpu().permute(0, 2, 3, 1).numpy(), what="tensor")
    raise UserError(f"a torch tensor image must be 3xHxW or Bx3xHxW RGB, got shape {tuple(tensor.shape)}")


def _from_array(array: np.ndarray, what: str = "numpy array") -> list[np.ndarray]:
    if array.ndim == 4 and array.shape[-1] == 3:
        return [one for image in array for one in _from_array(image, what)]
    if array.ndim != 3 or array.shape[-1] != 3 or 0 in array.shape:
        expected = "3xHxW or Bx3xHxW" if what == "tensor" else "HxWx3 (or NxHxWx3)"
        raise UserError(f"a {what} image must be {expected} RGB, got shape {tuple(array.shape)}; "
                        "convert grey or RGBA images to RGB first")
    if array.dtype == np.uint8:
        return [np.ascontiguousarray(array)]
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"a {what} image must be uint8 (0-255) or float (RGB in [0, 1]), got {array.dtype}")
    low, high = float(np.min(array)), float(np.max(array))
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0.0 or high > 1.0:
        raise UserError(f"a float {what} image must hold RGB values in [0, 1], got values from {low:g} to {high:g}"
                        f"{' (divide by 255)' if high > 1.0 else ''}")
    # To 8 bits, as files are: the model was trained on 8-bit images, and a float image then
    # scores exactly like the uint8 image (or file) it came from.
    return [np.round(array * 255.0).astype(np.uint8)]


def _decode(item: str | np.ndarray) -> np.ndarray:
    if isinstance(item, np.ndarray):
        return item
    try:
        return np.asarray(read_image(item))
    except DataError as exc:
        raise UserError(str(exc)) from None
