"""The report's example panels: which test images to show per category (worst false
positives, worst false negatives, best detections) and their small pictures (image | ground
truth | heatmap | predicted mask), in the heatmap colours of ``agpctl predict``."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from agp_data.errors import DataError
from agp_data.images import read_image
from agpctl.inference.predict import COLORMAP, colorize
from agpctl.inference.scoring import Predictions

THUMBNAIL_PX = 160  # the longer side of every tile
JPEG_QUALITY = 85
# Groups of examples per category, in the order shown: (key, title, what it shows).
EXAMPLE_GROUPS = (
    ("false_positives", "worst false positives", "normal images with the highest scores"),
    ("false_negatives", "worst false negatives", "defective images with the lowest scores"),
    ("best_detections", "best detections", "defective images with the highest scores"),
)


def select_examples(predictions: Predictions, category: str, count: int) -> dict[str, list[int]]:
    """Indices into ``predictions`` for each of :data:`EXAMPLE_GROUPS`, most telling first.
    A defective image is shown once; with fewer than 2 × ``count`` of them, the lower-scoring
    half are the false negatives and the rest the best detections."""
    in_category = np.array([c == category for c in predictions.categories], dtype=bool)

    def lowest_score_first(indices: np.ndarray) -> np.ndarray:
        return indices[np.argsort(predictions.scores[indices], kind="stable")]

    normal = lowest_score_first(np.flatnonzero(in_category & (predictions.labels == 0)))
    defective = lowest_score_first(np.flatnonzero(in_category & (predictions.labels != 0)))
    misses = min(count, (len(defective) + 1) // 2)
    best = min(count, len(defective) - misses)
    return {"false_positives": normal[::-1][:count].tolist(), "false_negatives": defective[:misses].tolist(),
            "best_detections": defective[::-1][:best].tolist()}


@dataclass
class ColourScale:
    """Map values ``low`` → dark blue … ``high`` and above → dark red; ``mid`` is shown on
    the legend (the pixel threshold, which :func:`colour_scale` puts in the middle)."""

    low: float
    high: float
    mid: float | None


def colour_scale(maps: np.ndarray, pixel_threshold: float | None) -> ColourScale:
    """``agpctl predict`` draws 0 → blue and 2 × the pixel threshold → red, so the threshold
    sits mid-scale. Models whose maps do not start at 0 (AGPNet's lie around a large offset)
    would come out one flat colour; so the scale starts at the category's 1st percentile of
    map values and keeps the threshold in the middle. Without a threshold: low to maximum."""
    sample = maps.reshape(-1)[:: max(1, maps.size // 1_000_000)]  # a percentile needs no more
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return ColourScale(0.0, 1.0, pixel_threshold)
    low, top = float(np.percentile(sample, 1)), float(sample.max())
    if pixel_threshold is not None and pixel_threshold > low:
        return ColourScale(low, 2 * pixel_threshold - low, pixel_threshold)
    return ColourScale(low, top if top > low else low + 1.0, pixel_threshold)


def heat(values: np.ndarray, scale: ColourScale) -> np.ndarray:
    return colorize(values - scale.low, scale.high - scale.low)


def colour_bar(width: int = 240, height: int = 12) -> bytes:
    """The heatmap colours left (low) to right (high), as a PNG strip for the legend."""
    row = COLORMAP[np.linspace(0, 255, width).astype(np.uint8)]
    return _png(np.repeat(row[None], height, axis=0))


@dataclass
class Tiles:
    image: bytes  # JPEG
    ground_truth: bytes  # PNG
    heatmap: bytes  # JPEG
    predicted: bytes | None  # PNG; None without a pixel threshold
    defect_px: int | None  # predicted defect area in the tile's pixels
    unreadable: str | None = None  # why the image could not be shown (the tile is grey then)


def example_tiles(path: str, score_map: np.ndarray, mask: np.ndarray, scale: ColourScale,
                  pixel_threshold: float | None) -> Tiles:
    """The four pictures of one test image, its longer side :data:`THUMBNAIL_PX`: the image
    in its own aspect ratio, with the model's square map and mask stretched onto it as
    ``agpctl predict`` does."""
    unreadable = None
    try:
        image = read_image(path)
    except DataError as exc:
        image, unreadable = Image.new("RGB", (score_map.shape[1], score_map.shape[0]), (128, 128, 128)), str(exc)
    ratio = THUMBNAIL_PX / max(image.size)
    size = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
    picture = np.asarray(image.resize(size, Image.Resampling.BILINEAR))
    full_map = np.asarray(Image.fromarray(score_map.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
    truth = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST))
    predicted = None if pixel_threshold is None else full_map > pixel_threshold
    return Tiles(
        image=_jpeg(picture),
        ground_truth=_png(truth),
        heatmap=_jpeg(heat(full_map, scale)),
        predicted=None if predicted is None else _png(predicted.astype(np.uint8) * 255),
        defect_px=None if predicted is None else int(predicted.sum()),
        unreadable=unreadable,
    )


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
