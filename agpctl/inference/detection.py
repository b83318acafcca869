"""The half of a detector that needs no torch: what a decision on one image is, which inputs
are accepted, how an image's category is found and how a score, a map and thresholds become a
:class:`Detection`.

Both detectors use it — the PyTorch one (:mod:`agpctl.inference.detector`) and the exported
ONNX one (:mod:`agpctl.inference.onnx_runtime`) — so they resize, name categories and decide
alike by construction. This module must stay importable where torch is not installed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from agp_data import storage
from agp_data.errors import DataError
from agp_data.images import read_image, rgb_array
from agpctl.errors import UserError
from agpctl.inference.thresholds import ThresholdPolicy

ACCEPTED = ("an image path, a PIL image, a numpy array (HxWx3, uint8 or float in [0, 1]), "
            "a torch tensor (3xHxW or Bx3xHxW, RGB in [0, 1]) or a list of them")

# (category, source, similarity) of one image; source: given | single | path | inferred | unknown
FoundCategory = tuple[str | None, str, float | None]


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


def decide(score: float, full_map: np.ndarray, found: FoundCategory, thresholds: ThresholdPolicy,
           path: str | None) -> Detection:
    """The decision on one image from its score, its map at the image's size and its category."""
    name, source, similarity = found
    chosen = thresholds.for_category(name)
    return Detection(score=float(score), map=full_map, mask=full_map > chosen.pixel,
                     anomalous=bool(score > chosen.image), category=name, category_source=source,
                     category_similarity=similarity, image_threshold=chosen.image, pixel_threshold=chosen.pixel,
                     path=path)


def resized_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB → (size, size, 3) float32 in [0, 1], resized bilinearly by PIL."""
    image = Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


# -- categories -----------------------------------------------------------------------------
def category_in_path(path: str | None, names: list[str]) -> str | None:
    """The deepest folder of ``path`` whose name is one of ``names`` (``<root>/<category>/test/...``
    of the MVTec layout and its kin), or None. The file name itself never counts."""
    if not path or not names:
        return None
    if storage.is_s3(path):
        folders = path[len("s3://"):].split("/")[1:-1]  # without the bucket and the file name
    else:
        folders = os.path.normpath(str(path)).replace("\\", "/").split("/")[:-1]
    known = set(names)
    for folder in reversed(folders):
        if folder in known:
            return folder
    return None


def check_category(category: str | None, names: list[str], run: str) -> str | None:
    """``category`` when the run knows it (or knows no names: a run from before they were
    recorded); a name the run does not know is the user's mistake."""
    if category is not None and names and category not in names:
        raise UserError(f"{run} has no category {category!r}; choose one of {', '.join(sorted(names))}")
    return category


def find_categories(paths: Sequence[str | None], names: list[str], given: str | None,
                    nearest: Callable[[list[int]], list[tuple[str, float]]] | None) -> list[FoundCategory]:
    """The category of each image, first that applies: ``given``, the model's ``single`` one,
    one named by a folder of its ``path``, the ``inferred`` one (``nearest(indices)`` gives
    (name, similarity) of the images at ``indices``; None when the model has no prototypes),
    else ``unknown``."""
    if given is not None:
        return [(given, "given", None)] * len(paths)
    if len(names) == 1:
        return [(names[0], "single", None)] * len(paths)
    found: list[FoundCategory] = [(None, "unknown", None)] * len(paths)
    unnamed = []
    for i, path in enumerate(paths):
        name = category_in_path(path, names)
        if name is None:
            unnamed.append(i)
        else:
            found[i] = (name, "path", None)
    if unnamed and nearest is not None:
        for i, (name, similarity) in zip(unnamed, nearest(unnamed)):
            found[i] = (name, "inferred", similarity)
    return found


# -- inputs of the Python API ---------------------------------------------------------------
def as_images(images: Any) -> list[str | np.ndarray]:
    """``images`` as a flat list of paths (checked to exist when local) and (H, W, 3) arrays
    (converted and checked now, so a bad input fails before any image is scored)."""
    if isinstance(images, (list, tuple)):
        return [one for item in images for one in as_images(item)]
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
    # A torch tensor can only exist when torch was imported: never import it here.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(images, torch.Tensor):
        return _from_tensor(images)
    if isinstance(images, np.ndarray):
        return _from_array(images)
    raise UserError(f"cannot score a {type(images).__name__}; pass {ACCEPTED}")


def decode(item: str | np.ndarray) -> np.ndarray:
    """An item of :func:`as_images` as (H, W, 3) uint8 RGB; an unreadable file is a UserError."""
    if isinstance(item, np.ndarray):
        return item
    try:
        return np.asarray(read_image(item))
    except DataError as exc:
        raise UserError(str(exc)) from None


def _from_tensor(tensor: Any) -> list[np.ndarray]:
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
