"""Every training image is seen exactly once per epoch across DDP workers, in lock-step."""

from collections import Counter

import pytest

from agpctl.errors import UserError
from agpctl.training.sharding import ShardedBatchSampler


def _epoch(size, batch, world, seed=0, epoch=0):
    per_rank = []
    for rank in range(world):
        sampler = ShardedBatchSampler(size, batch, rank=rank, world_size=world, seed=seed)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("size,batch,world", [(10, 4, 1), (9, 4, 2), (17, 4, 2), (16, 4, 2), (7, 2, 3), (5, 8, 4)])
def test_each_image_once_per_epoch_and_equal_step_counts(size, batch, world):
    per_rank = _epoch(size, batch, world)
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert sorted(seen) == list(range(size))
    assert set(seen.values()) == {1}
    steps = {len(batches) for batches in per_rank}
    assert len(steps) == 1, f"workers disagree on steps per epoch: {steps}"
    assert all(len(b) >= 1 for batches in per_rank for b in batches)


def test_tail_smaller_than_world_is_merged_into_previous_step():
    # 9 images, 2 workers × 4: a step of 8 and a tail of 1 that cannot feed both workers.
    rank0, rank1 = _epoch(9, 4, 2)
    assert [len(b) for b in rank0] == [5] and [len(b) for b in rank1] == [4]
    # 10 images: the tail of 2 gives each worker one image.
    rank0, rank1 = _epoch(10, 4, 2)
    assert [len(b) for b in rank0] == [4, 1] and [len(b) for b in rank1] == [4, 1]


def test_order_depends_on_seed_and_epoch_only():
    assert _epoch(20, 4, 2, seed=3, epoch=1) == _epoch(20, 4, 2, seed=3, epoch=1)
    assert _epoch(20, 4, 2, seed=3, epoch=1) != _epoch(20, 4, 2, seed=3, epoch=2)
    assert _epoch(20, 4, 2, seed=3, epoch=1) != _epoch(20, 4, 2, seed=4, epoch=1)


def test_fewer_images_than_workers_is_refused():
    with pytest.raises(UserError, match="cannot feed 3 workers: lower --workers to 2"):
        ShardedBatchSampler(2, 4, rank=0, world_size=3)
