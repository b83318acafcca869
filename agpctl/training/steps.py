"""The method-agnostic step loop: optimisers, precision, gradient clipping, checkpoint state.

Runs inside one process (a Ray Train worker or a plain one); the methods enter only through
:class:`agp_models.base.AnomalyModel`, distribution only through :class:`WorkerContext`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from agp_models.base import AnomalyModel
from agpctl.checkpoint import capture_rng_state, restore_rng_state
from agpctl.config import RunConfig
from agpctl.distributed import WorkerContext, average_across_workers
from agpctl.models import autocast, move_batch


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
