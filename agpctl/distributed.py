"""A process's place in a data-parallel group: its rank, the group's size, its device.

Training and evaluation run the same code in a Ray Train worker and in a plain process;
distribution enters only through :class:`WorkerContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


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


def average_across_workers(values: dict[str, float], ctx: WorkerContext) -> dict[str, float]:
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_collective_device(ctx))
    dist.all_reduce(tensor)
    tensor /= ctx.world_size
    return {k: float(v) for k, v in zip(keys, tensor.tolist())}


def gather_to_main(local, ctx: WorkerContext) -> list | None:
    """Every worker's ``local`` object on rank 0 (in rank order); None on the others."""
    if not ctx.distributed:
        return [local]
    gathered: list | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(local, gathered, dst=0)
    return gathered if ctx.is_main else None


def _collective_device(ctx: WorkerContext) -> torch.device:
    return ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
