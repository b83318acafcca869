"""The method-agnostic step loop: optimisers, precision, gradient clipping, checkpoint state.

Runs inside one process (a Ray Train worker or a plain one); the methods enter only through
:class:`agp_models.base.AnomalyModel`, distribution only through :class:`WorkerContext`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.profiler import record_function

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

    def train_epoch(self, loader: Iterable[dict[str, Any]], on_step: Callable[[int, dict[str, float]], None] | None = None,
                    sync_interval: float = 0.5) -> dict[str, float]:
        """One pass over ``loader``; the epoch's mean losses, averaged over workers.

        Losses are summed on the device; the host reads them (a device sync) at most every
        ``sync_interval`` seconds and at the end of the epoch, when ``on_step`` gets the
        latest step's losses and non-finite losses are caught.
        """
        self.wrapped.train()
        sums: dict[str, torch.Tensor] = {}
        batches = 0
        last_sync = time.monotonic()
        first_unchecked = self.state.step
        batch_iter = iter(loader)
        while True:
            with record_function("agp:data"):
                batch = next(batch_iter, None)
                if batch is None:
                    break
                batch = move_batch(batch, self.ctx.device)
            progress = min(1.0, self.state.step / self.state.total_steps)
            with record_function("agp:forward"), autocast(self.cfg.train.precision, self.ctx.device):
                losses = self.wrapped(batch, progress)
            with record_function("agp:backward"):
                for optimizer, _ in self.optimizers:
                    optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
            with record_function("agp:optimizer"):
                if self.cfg.model.grad_clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.cfg.model.grad_clip_norm)
                for optimizer, scheduler in self.optimizers:
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                self.state.step += 1
                self.model.after_step(self.state.step)
            latest = {k: v.detach() for k, v in losses.items()}
            for k, v in latest.items():
                sums[k] = sums[k] + v if k in sums else v.float().clone()
            batches += 1
            if time.monotonic() - last_sync >= sync_interval:
                values = self._checked(latest, sums, first_unchecked)
                first_unchecked, last_sync = self.state.step, time.monotonic()
                if on_step is not None:
                    on_step(batches, values)
        if batches:
            self._checked(latest, sums, first_unchecked)
        self.state.epoch += 1
        means = {k: float(v) / max(1, batches) for k, v in sums.items()}
        return average_across_workers(means, self.ctx)

    def _checked(self, latest: dict[str, torch.Tensor], sums: dict[str, torch.Tensor], since_step: int
                 ) -> dict[str, float]:
        """The latest losses on the host (one sync); a non-finite loss since ``since_step``
        stops the run (the sums carry any NaN or inf of the steps in between)."""
        values = {k: float(v) for k, v in latest.items()}
        total = float(sums["loss"])
        if not math.isfinite(total) or not math.isfinite(values["loss"]):
            where = (f"at step {self.state.step}" if since_step + 1 >= self.state.step
                     else f"between steps {since_step + 1} and {self.state.step}")
            raise FloatingPointError(f"loss became {values['loss'] if not math.isfinite(values['loss']) else total} "
                                     f"{where}; lower --lr")
        return values

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
