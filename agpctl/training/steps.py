"""The method-agnostic training and evaluation core.

Everything here runs inside one process — a Ray Train worker, or a plain process for
evaluation and tests. Distribution enters only through :class:`WorkerContext`; the methods
enter only through :class:`agp_models.base.AnomalyModel`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from agp_data import storage
from agp_models.backbones import build_backbone
from agp_models.base import AnomalyModel
from agp_models.metrics import per_category_metrics
from agp_models.registry import method_class
from agpctl.checkpoint import capture_rng_state, restore_rng_state
from agpctl.config import RunConfig


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def build_model(cfg: RunConfig, device: torch.device | None = None) -> AnomalyModel:
    """The method named by ``cfg.method`` with its frozen backbone.

    Random parts (a randomly initialised backbone included) are drawn from ``train.seed``
    alone, so a run's backbone can be rebuilt bit-identically for evaluation even when no
    pretrained weights were available.
    """
    model_cfg = cfg.model
    backbone_cfg = model_cfg.backbone
    if backbone_cfg.weights and storage.is_s3(backbone_cfg.weights):
        backbone_cfg = type(backbone_cfg)(**{**vars(backbone_cfg), "weights": storage.local_copy(backbone_cfg.weights)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        backbone = build_backbone(backbone_cfg, model_cfg.layers, model_cfg.image_size)
        model = method_class(cfg.method)(model_cfg, backbone)
    return model.to(device or torch.device("cpu"))


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    total_steps: int = 1


class Trainer:
    """Owns the optimisers and the step loop for one model on one worker."""

    def __init__(self, model: AnomalyModel, wrapped: torch.nn.Module, cfg: RunConfig, steps_per_epoch: int,
                 ctx: WorkerContext):
        self.model = model
        self.wrapped = wrapped  # DDP wrapper (or the model itself)
        self.cfg = cfg
        self.ctx = ctx
        self.state = TrainState(total_steps=max(1, steps_per_epoch * cfg.train.epochs))
        self.optimizers = model.configure_optimizers(self.state.total_steps)

    def train_epoch(self, loader: Iterable[dict[str, Any]], on_step: Callable[[int, dict[str, float]], None] | None = None
                    ) -> dict[str, float]:
        self.wrapped.train()
        sums: dict[str, float] = {}
        batches = 0
        for batch in loader:
            batch = move_batch(batch, self.ctx.device)
            progress = min(1.0, self.state.step / self.state.total_steps)
            with autocast(self.cfg.train.precision, self.ctx.device):
                losses = self.wrapped(batch, progress)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {self.state.step}; lower --lr")
            for optimizer, _ in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.model.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.cfg.model.grad_clip_norm)
            for optimizer, scheduler in self.optimizers:
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            self.state.step += 1
            self.model.after_step(self.state.step)
            values = {k: float(v.detach()) for k, v in losses.items()}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
            if on_step is not None:
                on_step(batches, values)
        self.state.epoch += 1
        means = {k: v / max(1, batches) for k, v in sums.items()}
        return average_across_workers(means, self.ctx)

    # -- checkpoints --------------------------------------------------------------------
    def checkpoint_payload(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "format": 1,
            "method": self.cfg.method,
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt, _ in self.optimizers],
            "schedulers": [s.state_dict() if s is not None else None for _, s in self.optimizers],
            "epoch": self.state.epoch,
            "step": self.state.step,
            "total_steps": self.state.total_steps,
            "rng": capture_rng_state(),
            **(extra or {}),
        }

    def restore(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        for (opt, sched), opt_state, sched_state in zip(self.optimizers, payload["optimizers"], payload["schedulers"]):
            opt.load_state_dict(opt_state)
            if sched is not None and sched_state is not None:
                sched.load_state_dict(sched_state)
        self.state.epoch = int(payload["epoch"])
        self.state.step = int(payload["step"])
        restore_rng_state(payload["rng"])


def average_across_workers(values: dict[str, float], ctx: WorkerContext) -> dict[str, float]:
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_collective_device(ctx))
    dist.all_reduce(tensor)
    tensor /= ctx.world_size
    return {k: float(v) for k, v in zip(keys, tensor.tolist())}


def _collective_device(ctx: WorkerContext) -> torch.device:
    return ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")


# -- evaluation --------------------------------------------------------------------------
@dataclass
class Predictions:
    """Everything needed to recompute every metric, in dataset order."""

    indices: np.ndarray  # (N,)
    scores: np.ndarray  # (N,) float32
    maps: np.ndarray  # (N, H, W) float32
    masks: np.ndarray  # (N, H, W) bool
    labels: np.ndarray  # (N,) int
    categories: list[str]
    paths: list[str]

    def metrics(self) -> dict[str, dict[str, float]]:
        return per_category_metrics(self.categories, self.scores, self.labels, self.maps, self.masks)

    def save_npz(self, path: str) -> None:
        import io

        buffer = io.BytesIO()
        np.savez_compressed(buffer, scores=self.scores, maps=self.maps.astype(np.float32), masks=self.masks,
                            labels=self.labels, categories=np.array(self.categories), paths=np.array(self.paths))
        storage.write_bytes(path, buffer.getvalue())


def predict_dataset(model: AnomalyModel, dataset: Dataset, ctx: WorkerContext, batch_size: int, precision: str,
                    on_batch: Callable[[int, int], None] | None = None, loader_workers: int = 0,
                    keep_maps: bool = True) -> Predictions | None:
    """Scores this worker's shard (every world_size-th sample) and gathers the whole set
    on rank 0, which gets the result in dataset order; other ranks get None."""
    shard = list(range(ctx.rank, len(dataset), ctx.world_size))
    loader = DataLoader(Subset(dataset, shard), batch_size=batch_size, shuffle=False, num_workers=loader_workers)
    model.eval()
    parts: dict[str, list] = {k: [] for k in ("indices", "scores", "maps", "masks", "labels", "categories", "paths")}
    done = 0
    with torch.no_grad():
        for batch in loader:
            images = batch["image"].to(ctx.device, non_blocking=True)
            with autocast(precision, ctx.device):
                pred = model.predict(images, move_batch(batch, ctx.device))
            parts["indices"].append(batch["index"].numpy())
            parts["scores"].append(pred.scores.float().cpu().numpy())
            if keep_maps:
                parts["maps"].append(pred.maps.float().cpu().numpy())
                parts["masks"].append(batch["mask"][:, 0].numpy() > 0.5)
            parts["labels"].append(batch["label"].numpy())
            parts["categories"].extend(batch["category"])
            parts["paths"].extend(batch["path"])
            done += len(images)
            if on_batch is not None:
                on_batch(done, len(shard))
    local = _concat(parts, keep_maps)
    if ctx.distributed:
        gathered: list | None = [None] * ctx.world_size if ctx.is_main else None
        dist.gather_object(local, gathered, dst=0)
        if not ctx.is_main:
            return None
        local = _merge(gathered)
    order = np.argsort(local.indices, kind="stable")
    return Predictions(
        indices=local.indices[order], scores=local.scores[order],
        maps=local.maps[order] if keep_maps else local.maps, masks=local.masks[order] if keep_maps else local.masks,
        labels=local.labels[order], categories=[local.categories[i] for i in order],
        paths=[local.paths[i] for i in order],
    )


def _concat(parts: dict[str, list], keep_maps: bool) -> Predictions:
    empty = np.zeros((0,), np.float32)
    return Predictions(
        indices=np.concatenate(parts["indices"]) if parts["indices"] else np.zeros((0,), np.int64),
        scores=np.concatenate(parts["scores"]) if parts["scores"] else empty,
        maps=np.concatenate(parts["maps"]) if keep_maps and parts["maps"] else np.zeros((0, 0, 0), np.float32),
        masks=np.concatenate(parts["masks"]) if keep_maps and parts["masks"] else np.zeros((0, 0, 0), bool),
        labels=np.concatenate(parts["labels"]) if parts["labels"] else np.zeros((0,), np.int64),
        categories=parts["categories"], paths=parts["paths"],
    )


def _merge(shards: list[Predictions]) -> Predictions:
    shards = [s for s in shards if len(s.indices)]
    with_maps = [s for s in shards if s.maps.ndim == 3 and len(s.maps)]
    return Predictions(
        indices=np.concatenate([s.indices for s in shards]),
        scores=np.concatenate([s.scores for s in shards]),
        maps=np.concatenate([s.maps for s in with_maps]) if with_maps else np.zeros((0, 0, 0), np.float32),
        masks=np.concatenate([s.masks for s in with_maps]) if with_maps else np.zeros((0, 0, 0), bool),
        labels=np.concatenate([s.labels for s in shards]),
        categories=[c for s in shards for c in s.categories],
        paths=[p for s in shards for p in s.paths],
    )


def calibrate_thresholds(val: Predictions | None, quantile: float) -> dict[str, Any]:
    """Thresholds from held-out *normal* training images: ``quantile`` of their image
    scores, and of their per-image maximum pixel values for the defect masks."""
    if val is None or len(val.scores) == 0:
        return {"source": "none", "image": None, "pixel": None}
    pixel_max = val.maps.reshape(len(val.maps), -1).max(axis=1)
    return {
        "source": f"quantile {quantile} of {len(val.scores)} held-out normal training images",
        "quantile": quantile,
        "image": float(np.quantile(val.scores, quantile)),
        "pixel": float(np.quantile(pixel_max, quantile)),
        "normal_image_scores": {"mean": float(val.scores.mean()), "max": float(val.scores.max())},
    }


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def loader_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
