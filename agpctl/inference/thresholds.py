"""Which image and pixel thresholds decide an image: given, or the run's calibrated ones.

A run's ``thresholds.json`` (and its checkpoint payload) holds pooled thresholds over every
category and, since per-category calibration, one pair per category (see
:func:`agpctl.inference.scoring.calibrate_thresholds`). An image of a category with stable
thresholds of its own is decided by those; every other image by the pooled ones. An explicit
``--threshold VALUE`` overrides all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from agpctl.errors import UserError


@dataclass
class Thresholds:
    image: float
    pixel: float
    source: str


def resolve_thresholds(stored: dict[str, Any], threshold: str = "auto", pixel_threshold: float | None = None
                       ) -> Thresholds:
    """``auto``: the run's calibrated thresholds; a number overrides the image threshold and,
    unless ``pixel_threshold`` is given, the pixel threshold too. Thresholds are finite numbers."""
    if pixel_threshold is not None:
        pixel_threshold = _finite(pixel_threshold, "--pixel-threshold")
    if is_auto(threshold):
        image, pixel = stored.get("image"), stored.get("pixel")
        if image is None or pixel is None:
            raise UserError("this run has no calibrated thresholds: pass --threshold VALUE "
                            "(training calibrates them on held-out normal images, see --val-fraction)")
        source = f"auto: {stored.get('source', 'calibrated at training')}"
        if pixel_threshold is not None:
            pixel, source = pixel_threshold, source + "; pixel threshold given"
        return Thresholds(float(image), float(pixel), source)
    value = _finite(threshold, "--threshold")
    pixel = value if pixel_threshold is None else pixel_threshold
    return Thresholds(value, pixel, "given" if pixel_threshold is None else "given (image and pixel)")


def check_threshold_options(threshold: str, pixel_threshold: float | None) -> None:
    """``--threshold`` / ``--pixel-threshold`` as given are usable (before any work starts)."""
    resolve_thresholds({"image": 0.0, "pixel": 0.0}, threshold, pixel_threshold)


def is_auto(threshold: Any) -> bool:
    return str(threshold).lower() == "auto"


def _finite(value: Any, flag: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
        if flag == "--threshold":
            raise UserError(f"--threshold must be 'auto' or a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{flag} must be a finite number, got {value!r}")
    return number


class ThresholdPolicy:
    """The thresholds of each category of one run, as ``threshold`` / ``pixel_threshold`` ask.

    ``default`` (pooled, or given) decides images of a category without stable thresholds of
    its own and images whose category is unknown. A run calibrated before per-category
    thresholds existed gets one warning through ``warn``.
    """

    def __init__(self, stored: dict[str, Any], threshold: str = "auto", pixel_threshold: float | None = None,
                 run: str = "this run", warn: Callable[[str], None] | None = None):
        self.default = resolve_thresholds(stored, threshold, pixel_threshold)
        self.per_category: dict[str, Thresholds] = {}
        if not is_auto(threshold):
            return
        calibrated = stored.get("per_category")
        if calibrated is None:
            if warn is not None:
                warn(f"{run} has no per-category thresholds (trained before they existed): every image uses "
                     "the pooled ones; retrain to calibrate one pair per category")
            return
        quantile = stored.get("quantile")
        for category, entry in sorted(calibrated.items()):
            if not entry.get("stable"):
                continue  # its warning was printed at training; the pooled thresholds rest on more images
            source = f"auto: category {category}, quantile {quantile} of {entry.get('images')} held-out normal images"
            pixel = float(entry["pixel"])
            if pixel_threshold is not None:
                pixel, source = self.default.pixel, source + "; pixel threshold given"
            self.per_category[category] = Thresholds(float(entry["image"]), pixel, source)

    def for_category(self, category: str | None) -> Thresholds:
        return self.per_category.get(category or "", self.default)
