"""Which training images each DDP worker sees in each step of an epoch.

Unlike ``DistributedSampler`` (pads the shard with repeats) plus ``drop_last`` (drops the
tail), every training image is seen exactly once per epoch across all workers, and every
worker runs the same number of steps, which DDP needs to stay in lock-step.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from agpctl.errors import UserError


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for one worker.

    One epoch is a seeded permutation of all indices cut into global steps of
    ``batch_size × world_size`` images; worker ``rank`` takes every ``world_size``-th image of
    each step. A tail too small to give every worker an image is merged into the step before,
    so the last step can be a little larger or smaller than the others. The order depends on
    (seed, epoch) only, so a resumed run sees the batches an uninterrupted one would.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size} workers")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if size < world_size:
            raise UserError(f"{size} training image(s) cannot feed {world_size} workers: lower --workers to {max(1, size)}")
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _bounds(self) -> list[int]:
        step = self.batch_size * self.world_size
        bounds = [*range(0, self.size, step), self.size]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < self.world_size:
            del bounds[-2]
        return bounds

    def global_steps(self) -> list[list[int]]:
        """All workers' indices per step of the current epoch."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        bounds = self._bounds()
        return [order[a:b] for a, b in zip(bounds, bounds[1:])]

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.global_steps():
            yield step[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self._bounds()) - 1
