"""agp from Python: load a trained run, score images, get decisions.

    from agpctl.api import load

    detector = load("runs/agpnet-mvtec-20261123-101500")   # or s3://…; category= for --per-category runs
    for result in detector.predict(["part1.png", "part2.png"]):
        print(result.path, result.score, result.anomalous, result.category)

``detector.predict`` takes image paths, PIL images, numpy arrays (HxWx3 uint8 or float in
[0, 1]) and torch tensors (3xHxW or Bx3xHxW RGB in [0, 1]), and returns one
:class:`Detection` per image: ``score``, ``map`` and ``mask`` at the image's size,
``anomalous``, the image's ``category`` (and how it was found) and the thresholds used. The
numbers are those of ``agpctl predict``: both go through :class:`Detector`. Mistakes raise
:class:`UserError` with one line naming the fix.

``load("model.onnx")`` loads a model written by ``agpctl export --format onnx`` (with its
``model.onnx.json`` beside it) as an :class:`OnnxDetector`: the same ``predict`` and answers,
with onnxruntime, numpy and Pillow only — torch need not be installed, and importing this
module does not import it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from agpctl.errors import UserError
from agpctl.inference.detection import Detection
from agpctl.inference.onnx_runtime import OnnxDetector, is_onnx_model, load_onnx_detector

if TYPE_CHECKING:  # pragma: no cover
    from agpctl.inference.detector import Detector

__all__ = ["Detection", "Detector", "OnnxDetector", "UserError", "load"]


def load(model: str | os.PathLike, category: str | None = None, *, threshold: str | float = "auto",
         pixel_threshold: float | None = None, device: Any = None, batch_size: int | None = None,
         on_warning: Callable[[str], None] | None = None) -> Detector | OnnxDetector:
    """The detector of a trained run (a directory or ``s3://`` URI, see
    :func:`agpctl.inference.detector.load_detector`) or of an exported ``.onnx`` model (see
    :func:`agpctl.inference.onnx_runtime.load_onnx_detector`); the same options for both."""
    options = dict(threshold=threshold, pixel_threshold=pixel_threshold, device=device, batch_size=batch_size,
                   on_warning=on_warning)
    if is_onnx_model(model):
        return load_onnx_detector(model, category, **options)
    # Imported here: it loads torch, which an ONNX deployment need not have.
    from agpctl.inference.detector import load_detector

    return load_detector(model, category, **options)


def __getattr__(name: str) -> Any:
    """``Detector`` on first use (importing it loads torch)."""
    if name == "Detector":
        from agpctl.inference.detector import Detector

        return Detector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
