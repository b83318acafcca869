"""The one record every dataset layout is parsed into."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    image: str  # local path or s3:// URI
    mask: str | None  # None: no mask file (a normal image, or a defect without annotation)
    label: int  # 0 = normal, 1 = anomalous
    category: str
    defect: str  # "good" for normal images, else the defect type
    split: str  # "train" | "test"
