"""Scoring a dataset with a model: predictions in dataset order, and thresholds from them.

Runs in one process or across a DDP group (each worker scores a shard, rank 0 gathers);
used by training (validation, thresholds, the final test evaluation) and by ``agpctl eval``.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from agp_data import storage
from agp_data.tiling import Tiling
from agp_models.base import AnomalyModel
from agp_models.metrics import per_category_metrics
from agpctl.distributed import WorkerContext, gather_to_main
from agpctl.errors import UserError, first_line
from agpctl.inference.tiled_scoring import fit_to_shape, score_shard
from agpctl.models import autocast, move_batch


@dataclass
class Predictions:
    """Everything needed to recompute every metric, in dataset order."""

    indices: np.ndarray  # (N,)
    scores: np.ndarray  # (N,) float32
    maps: np.ndarray  # (N, H, W) float32; (0, 0, 0) when maps were not kept
    masks: np.ndarray  # (N, H, W) bool; likewise
    labels: np.ndarray  # (N,) int
    categories: list[str]
    paths: list[str]

    @classmethod
    def concatenate(cls, parts: list["Predictions"], reindex: bool = False) -> "Predictions":
        """``parts`` one after the other; ``reindex`` numbers the result 0..N-1 (parts from
        different datasets), else each keeps its dataset indices (shards of one dataset)."""
        parts = [p for p in parts if len(p.indices)]
        with_maps = [p for p in parts if p.maps.ndim == 3 and len(p.maps)]
        count = sum(len(p.indices) for p in parts)
        maps, masks = _stacked_maps(with_maps)
        return cls(
            indices=np.arange(count) if reindex else
            (np.concatenate([p.indices for p in parts]) if parts else np.zeros((0,), np.int64)),
            scores=np.concatenate([p.scores for p in parts]) if parts else np.zeros((0,), np.float32),
            maps=maps,
            masks=masks,
            labels=np.concatenate([p.labels for p in parts]) if parts else np.zeros((0,), np.int64),
            categories=[c for p in parts for c in p.categories],
            paths=[x for p in parts for x in p.paths],
        )

    def in_index_order(self) -> "Predictions":
        order = np.argsort(self.indices, kind="stable")
        has_maps = self.maps.ndim == 3 and len(self.maps) == len(order)
        return Predictions(
            indices=self.indices[order], scores=self.scores[order],
            maps=self.maps[order] if has_maps else self.maps, masks=self.masks[order] if has_maps else self.masks,
            labels=self.labels[order], categories=[self.categories[i] for i in order],
            paths=[self.paths[i] for i in order],
        )

    def metrics(self) -> dict[str, dict[str, float]]:
        return per_category_metrics(self.categories, self.scores, self.labels, self.maps, self.masks)

    def save_npz(self, path: str) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, scores=self.scores, maps=self.maps.astype(np.float32), masks=self.masks,
                            labels=self.labels, categories=np.array(self.categories), paths=np.array(self.paths))
        storage.write_bytes(path, buffer.getvalue())

    @classmethod
    def load_npz(cls, path: str) -> "Predictions":
        """The predictions :meth:`save_npz` wrote (``agpctl eval --save-maps``), numbered 0..N-1."""
        fix = "write one with `agpctl eval --run RUN --save-maps FILE.npz`"
        names = ("scores", "maps", "masks", "labels", "categories", "paths")
        try:
            data = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an .npz archive")
            with data:
                missing = [name for name in names if name not in data.files]
                if missing:
                    raise ValueError(f"no {', '.join(missing)} in it")
                fields = {name: data[name] for name in names}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise UserError(f"{path} is not a maps file of agpctl eval --save-maps ({first_line(exc)}); {fix}") from None
        count = len(fields["scores"])
        if fields["maps"].ndim != 3 or fields["maps"].shape != fields["masks"].shape or any(
                len(fields[name]) != count for name in names):
            raise UserError(f"{path}: its scores, maps, masks, labels and paths do not match in length; {fix}")
        return cls(indices=np.arange(count), scores=fields["scores"].astype(np.float32),
                   maps=fields["maps"].astype(np.float32), masks=fields["masks"].astype(bool),
                   labels=fields["labels"].astype(np.int64), categories=[str(c) for c in fields["categories"]],
                   paths=[str(p) for p in fields["paths"]])


def _stacked_maps(parts: list[Predictions]) -> tuple[np.ndarray, np.ndarray]:
    """The maps and masks of ``parts`` stacked; parts whose maps differ in size (the sub-runs of
    a tiled per-category run each keep theirs at their own working size) are first brought to
    the largest height and width with :func:`fit_to_shape`."""
    if not parts:
        return np.zeros((0, 0, 0), np.float32), np.zeros((0, 0, 0), bool)
    shapes = {p.maps.shape[1:] for p in parts}
    if len(shapes) == 1:
        return np.concatenate([p.maps for p in parts]), np.concatenate([p.masks for p in parts])
    shape = (max(h for h, _ in shapes), max(w for _, w in shapes))
    fitted = [fit_to_shape(m, k, shape) for p in parts for m, k in zip(p.maps, p.masks)]
    return (np.stack([m.astype(np.float32, copy=False) for m, _ in fitted]),
            np.stack([k for _, k in fitted]))


def predict_dataset(model: AnomalyModel, dataset: Dataset, ctx: WorkerContext, batch_size: int, precision: str,
                    on_batch: Callable[[int, int], None] | None = None, loader_workers: int = 0,
                    keep_maps: bool = True, tiling: Tiling | None = None) -> Predictions | None:
    """Scores this worker's shard (every world_size-th sample) and gathers the whole set
    on rank 0, which gets the result in dataset order; other ranks get None. With a
    ``tiling`` the items are whole images at the working resolution, scored tile by tile
    (:mod:`agpctl.inference.tiled_scoring`; ``batch_size`` tiles per model call)."""
    shard = list(range(ctx.rank, len(dataset), ctx.world_size))
    if tiling is not None:
        local = Predictions(**score_shard(model, dataset, shard, ctx.device, batch_size, precision, tiling,
                                          on_image=on_batch, loader_workers=loader_workers, keep_maps=keep_maps))
        gathered = gather_to_main(local, ctx)
        return None if gathered is None else Predictions.concatenate(gathered).in_index_order()
    loader = DataLoader(Subset(dataset, shard), batch_size=batch_size, shuffle=False, num_workers=loader_workers)
    model.eval()
    batches: list[Predictions] = []
    done = 0
    with torch.no_grad():
        for batch in loader:
            images = batch["image"].to(ctx.device, non_blocking=True)
            with autocast(precision, ctx.device):
                pred = model.predict(images, move_batch(batch, ctx.device))
            batches.append(Predictions(
                indices=batch["index"].numpy(),
                scores=pred.scores.float().cpu().numpy(),
                maps=pred.maps.float().cpu().numpy() if keep_maps else np.zeros((0, 0, 0), np.float32),
                masks=batch["mask"][:, 0].numpy() > 0.5 if keep_maps else np.zeros((0, 0, 0), bool),
                labels=batch["label"].numpy(),
                categories=list(batch["category"]),
                paths=list(batch["path"]),
            ))
            done += len(images)
            if on_batch is not None:
                on_batch(done, len(shard))
    shards = gather_to_main(Predictions.concatenate(batches), ctx)
    if shards is None:
        return None
    return Predictions.concatenate(shards).in_index_order()


# Below this many held-out normal images a category's quantile is essentially the largest of
# a handful of scores: one unusual image moves it, and it cannot tell a false-alarm rate under
# 1/(n+1) from any other. The rule 1/(1-q) images (100 at the default q = 0.99) would flag
# nearly every real category (val_fraction 0.1 of a few hundred images), so a fixed floor of
# ten is the practical line: real datasets clear it, a handful of images does not.
MIN_STABLE_IMAGES = 10


def calibrate_thresholds(val: Predictions | None, quantile: float) -> dict[str, Any]:
    """Thresholds from held-out *normal* training images: ``quantile`` of their image
    scores, and of their per-image maximum pixel values for the defect masks; pooled over
    every category (the fallback) and per category (``stable`` false, with a warning line,
    when a category has fewer than :data:`MIN_STABLE_IMAGES` images)."""
    if val is None or len(val.scores) == 0:
        return {"source": "none", "image": None, "pixel": None, "per_category": {}, "warnings": []}
    pixel_max = val.maps.reshape(len(val.maps), -1).max(axis=1)
    categories = np.array(val.categories)
    per_category: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for category in sorted(set(val.categories)):
        chosen = categories == category
        count = int(chosen.sum())
        stable = count >= MIN_STABLE_IMAGES
        per_category[category] = {
            "image": float(np.quantile(val.scores[chosen], quantile)),
            "pixel": float(np.quantile(pixel_max[chosen], quantile)),
            "images": count,
            "stable": stable,
        }
        if not stable:
            warnings.append(f"category {category}: only {count} held-out normal image(s) for its thresholds "
                            f"(fewer than {MIN_STABLE_IMAGES}), so predict uses the pooled ones for it; "
                            "raise --val-fraction or add normal images")
    return {
        "source": f"quantile {quantile} of {len(val.scores)} held-out normal training images",
        "quantile": quantile,
        "image": float(np.quantile(val.scores, quantile)),
        "pixel": float(np.quantile(pixel_max, quantile)),
        "normal_image_scores": {"mean": float(val.scores.mean()), "max": float(val.scores.max())},
        "per_category": per_category,
        "warnings": warnings,
    }
