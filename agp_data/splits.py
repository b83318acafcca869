"""Turns a run's DataConfig into train / validation / test datasets.

Validation images are held out from the *normal training* images (never from the test
split): they calibrate thresholds and drive checkpoint-free model selection in sweeps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from agp_data.config import DataConfig
from agp_data.dataset import AnomalyDataset
from agp_data.errors import DataError
from agp_data.fewshot import ExpandedDataset, select_shots
from agp_data.generate import synthetic_root
from agp_data.layouts import FolderLayout, load_samples
from agp_data.samples import Sample
from agp_data.tiled import build_tiled_datasets
from agp_data.tiling import Tiling

FEW_SHOT_EXPANSION = 32


@dataclass
class SampleSplits:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    @property
    def categories(self) -> list[str]:
        return sorted({s.category for s in self.train + self.test})


def resolve_root(data: DataConfig) -> str:
    if data.dataset == "synthetic" and data.root is None:
        params = vars(data.synthetic).copy()
        return synthetic_root(data.cache_dir, **params)
    if data.dataset == "folder":
        return data.root or ""
    if not data.root:
        raise DataError(f"--root is required for --dataset {data.dataset}: the folder or s3:// prefix holding it")
    return data.root


def folder_layout(data: DataConfig) -> FolderLayout | None:
    if data.dataset != "folder":
        return None
    if not data.normal_dir:
        raise DataError("--dataset folder needs --normal-dir (and usually --abnormal-dir and --mask-dir)")
    return FolderLayout(normal_dir=data.normal_dir, abnormal_dir=data.abnormal_dir, mask_dir=data.mask_dir)


def split_samples(data: DataConfig, seed: int) -> SampleSplits:
    Tiling.from_config(data)  # bad tiling values fail here, before any image is read
    root = resolve_root(data)
    samples = load_samples(data.dataset, root, categories=data.categories, folder=folder_layout(data))
    train = [s for s in samples if s.split == "train" and s.label == 0]
    test = [s for s in samples if s.split == "test"]
    if not train:
        raise DataError(f"no normal training images found under {root}; check --dataset/--root")
    if not test:
        raise DataError(f"no test images found under {root}; check --dataset/--root")
    if data.shots:
        shots = select_shots(train, data.shots, seed)
        # k images cannot spare a held-out one: thresholds are calibrated on the shots themselves
        return SampleSplits(train=shots, val=list(shots), test=test)
    train, val = hold_out(train, data.val_fraction)
    return SampleSplits(train=train, val=val, test=test)


def hold_out(train: list[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Every k-th normal image per category (sorted by path) goes to validation."""
    if fraction <= 0:
        return train, []
    if fraction >= 0.5:
        raise DataError(f"val_fraction {fraction} is too large; use a value below 0.5")
    keep, val = [], []
    step = max(2, round(1 / fraction))
    by_category: dict[str, list[Sample]] = {}
    for s in train:
        by_category.setdefault(s.category, []).append(s)
    for cat in sorted(by_category):
        items = sorted(by_category[cat], key=lambda s: s.image)
        for i, s in enumerate(items):
            (val if i % step == step - 1 else keep).append(s)
    return keep, val


def build_datasets(data: DataConfig, splits: SampleSplits, image_size: int, mean, std):
    tiling = Tiling.from_config(data)
    if tiling is not None:  # train on tiles, evaluate whole images tile by tile (agp_data/tiled.py)
        train, val, test = build_tiled_datasets(data, splits.train, splits.val, splits.test, tiling, image_size,
                                                mean, std)
        return (ExpandedDataset(train, FEW_SHOT_EXPANSION) if data.shots else train), val, test
    s3_cache = os.path.join(data.cache_dir, "s3") if data.cache_dir else None

    def make(samples):
        return AnomalyDataset(samples, image_size=image_size, mean=mean, std=std, cache_dir=s3_cache,
                              decoded_cache_mb=data.decoded_cache_mb)

    train = make(splits.train)
    if data.shots:
        train = ExpandedDataset(train, FEW_SHOT_EXPANSION)
    return train, make(splits.val) if splits.val else None, make(splits.test)
