"""Checks that run before Ray starts, shared by `agpctl train` and `agpctl tune`.

A mistake found here costs the user a second, not a cluster start-up: configuration values,
paths, the dataset's layout and the backbone are all checked on the driver.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from agp_data import storage
from agp_data.integrity import check_masks, verify_images
from agp_data.splits import SampleSplits, split_samples
from agpctl.cluster.connect import address_kind
from agpctl.config import RunConfig, check_choices, resolve_recipe
from agpctl.errors import UserError
from agpctl.models import resolve_pretrained
from agpctl.paths import absolute
from agpctl.training.tracking import check_tracking

LOCAL_PATH_FIELDS = (
    ("data", ("root", "normal_dir", "abnormal_dir", "mask_dir", "cache_dir", "texture_root")),
    ("model.backbone", ("weights",)),
    ("storage", ("out",)),
)
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# (config path, the flag that sets it, test, what the value must be); checked in this order.
VALUE_RULES: list[tuple[str, str, Callable[[Any], bool], str]] = [
    ("train.epochs", "--epochs", lambda v: v >= 1, "at least 1"),
    ("train.batch_size", "--batch-size", lambda v: v >= 1, "at least 1"),
    ("train.eval_batch_size", "--eval-batch-size", lambda v: v >= 1, "at least 1"),
    ("train.checkpoint_every", "--checkpoint-every", lambda v: v >= 1, "at least 1"),
    ("train.validate_every", "--validate-every", lambda v: v >= 1, "at least 1"),
    ("train.keep_checkpoints", "--keep-checkpoints", lambda v: v >= 1, "at least 1"),
    ("train.seed", "--seed", lambda v: v >= 0, "0 or more"),
    ("train.threshold_quantile", "train.threshold_quantile", lambda v: 0 < v < 1, "between 0 and 1"),
    ("data.val_fraction", "--val-fraction", lambda v: 0 <= v < 0.5, "at least 0 and below 0.5"),
    ("data.shots", "--shots", lambda v: v >= 0, "0 or more"),
    ("data.loader_workers", "--loader-workers", lambda v: v >= 0, "0 or more"),
    ("model.lr", "--lr", lambda v: v > 0 and v == v and v != float("inf"), "a number above 0"),
    ("model.weight_decay", "model.weight_decay", lambda v: v >= 0, "0 or more"),
    ("model.image_size", "--image-size", lambda v: v >= 16, "at least 16 (pixels)"),
    ("model.layers", "--layers", lambda v: all(i >= 0 for i in v), "0 or more each"),
    ("model.grad_clip_norm", "model.grad_clip_norm", lambda v: v >= 0, "0 (off) or more"),
    ("model.smoothing_sigma", "model.smoothing_sigma", lambda v: v >= 0, "0 (off) or more"),
    ("model.score_pool", "model.score_pool", lambda v: v >= 0, "0 (plain max) or more"),
    ("cluster.workers", "--workers", lambda v: v >= 1, "at least 1"),
    ("cluster.gpus_per_worker", "--gpus-per-worker", lambda v: v == "auto" or v >= 0, "auto, 0 or more"),
    ("cluster.cpus_per_worker", "--cpus-per-worker", lambda v: v is None or v > 0, "above 0"),
    ("cluster.max_failures", "--max-failures", lambda v: v >= 0, "0 or more"),
]


def check_config(cfg: RunConfig) -> None:
    """Every configuration value a run needs is usable, and every local path is absolute
    (Ray workers run in their own directories: relative paths must not reach them)."""
    storage.configure_s3(cfg.storage.s3_endpoint)
    resolve_recipe(cfg)  # epochs, batch size, lr and schedule left unset: the method's recipe
    check_values(cfg)
    check_tracking(cfg)
    absolute_local_paths(cfg)
    storage.check_writable_dir(cfg.storage.out)


def check_values(cfg: RunConfig) -> None:
    """Every value within its range, one line naming the flag on the first one that is not."""
    check_choices(cfg)
    for path, flag, valid, expected in VALUE_RULES:
        value: Any = cfg
        for part in path.split("."):
            value = getattr(value, part)
        if not valid(value):
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            raise UserError(f"{flag} must be {expected}, got {shown}")
    if cfg.storage.name is not None and not RUN_NAME.fullmatch(cfg.storage.name):
        raise UserError(f"--name {cfg.storage.name!r}: use letters, digits, '.', '_' and '-' only "
                        "(a run name is one folder below --out)")
    address_kind(cfg.cluster.address)  # an address of no known form fails here
    if cfg.train.validation == "synthetic" and cfg.data.val_fraction <= 0 and not cfg.data.shots:
        raise UserError("train.validation synthetic (the default) needs held-out normal images; set --val-fraction "
                        "above 0 or pass --validation none")
    gpus = cfg.cluster.gpus_per_worker
    if gpus != "auto" and gpus > 0 and cfg.cluster.address is None and not torch.cuda.is_available():
        raise UserError("--gpus-per-worker > 0 but this machine has no CUDA GPU; drop the flag or use --address")


def absolute_local_paths(cfg: RunConfig) -> None:
    for section_path, names in LOCAL_PATH_FIELDS:
        section = cfg
        for part in section_path.split("."):
            section = getattr(section, part)
        for name in names:
            setattr(section, name, absolute(getattr(section, name)))


DRIVER_SAMPLE_OF_REMOTE_DATA = 16  # images decoded on the driver when the data is on s3://


def check_data_and_model(cfg: RunConfig, *, pin_pretrained: bool = True,
                         on_progress: Callable[[int, int], None] | None = None) -> tuple[SampleSplits, list[str]]:
    """The dataset splits, every image decoded (a corrupt file fails here, not mid-training)
    and the masks checked, then with ``pin_pretrained`` the model built once (backbone mistakes
    fail here; ``pretrained: auto`` is pinned). Returns the splits and the warnings raised.

    Data on s3:// is decoded in full on the cluster, before the first training step (see
    :func:`agpctl.training.worker.train_on_worker`); here only a sample, so a laptop never downloads it all."""
    splits = split_samples(cfg.data, cfg.train.seed)
    samples = all_samples(splits)
    notes = check_masks(samples, strict=cfg.data.strict)
    if cfg.data.root and storage.is_s3(cfg.data.root):
        samples = samples[:: max(1, len(samples) // DRIVER_SAMPLE_OF_REMOTE_DATA)][:DRIVER_SAMPLE_OF_REMOTE_DATA]
    verify_images(samples, on_progress=on_progress, cache_dir=cfg.data.cache_dir)
    if pin_pretrained:
        notes += resolve_pretrained(cfg)
    return splits, notes


def all_samples(splits: SampleSplits) -> list:
    """Train, held-out and test samples, each once (few-shot runs hold out their shots)."""
    seen: dict[str, object] = {}
    for sample in splits.train + splits.val + splits.test:
        seen.setdefault(sample.image, sample)
    return list(seen.values())
