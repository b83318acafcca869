"""Where a run's data comes from: the data section of a run's configuration.

Plain dataclasses; the application (``agpctl.config``) reads and writes them as YAML. Fixed
choices are ``Literal`` types, checked wherever a configuration is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DatasetName = Literal["synthetic", "mvtec", "visa", "btad", "mvtec3d", "folder"]


@dataclass(kw_only=True)
class SyntheticConfig:
    """Parameters of the built-in generated dataset (``--dataset synthetic``)."""

    categories: int = 3
    train: int = 40
    test: int = 20
    size: int = 128
    seed: int = 0


@dataclass(kw_only=True)
class DataConfig:
    dataset: DatasetName = "synthetic"
    root: str | None = None  # local dir or s3://bucket/prefix; synthetic: generated on first use
    categories: list[str] | None = None  # None = all categories found
    normal_dir: str | None = None  # folder layout only
    abnormal_dir: str | None = None
    mask_dir: str | None = None
    per_category: bool = False  # one-class setting: one model per category
    shots: int = 0  # few-shot: k normal images per category (0 = all)
    val_fraction: float = 0.1  # normal training images held out for thresholds / validation
    loader_workers: int = 1  # DataLoader processes per training worker
    # Decoded, resized training/validation images kept in memory per loader process (MiB;
    # 0 = decode every epoch). MVTec-AD at 256 px takes about 700 MiB.
    decoded_cache_mb: int = 2048
    cache_dir: str | None = None  # local cache for s3:// images (default ~/.cache/agp)
    texture_root: str | None = None  # DTD-style texture folder for pseudo-anomalies (else generated)
    strict: bool = False  # --strict-data: mask problems are errors instead of warnings
    # Tiling for high-resolution images (agp_data/tiling.py): tiles of `tile` px at the working
    # resolution (native, or longer side = tile_working_size), overlapping by tile_overlap.
    tile: int | None = None  # None = resize whole images to model.image_size
    tile_overlap: float = 0.25
    tile_working_size: int | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
