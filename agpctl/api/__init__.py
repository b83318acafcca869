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
"""

from agpctl.errors import UserError
from agpctl.inference.detector import Detection, Detector
from agpctl.inference.detector import load_detector as load

__all__ = ["Detection", "Detector", "UserError", "load"]
