"""The epoch plan (distributed/sampling.py): the same images in the same optimiser steps at any world size."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler

from distributed.sampling import EpochPlan

CPU = torch.device("cpu")


def plans(n: int, global_batch: int, micro: int, world: int, min_share: int = 1) -> list[EpochPlan]:
    return [EpochPlan(n, global_batch, micro, rank, world, seed=0, min_share=min_share) for rank in range(world)]


def epoch(n: int, global_batch: int, micro: int, world: int, min_share: int = 1):
    """Every step's shares, rank by rank: [[StepShare of rank 0, rank 1, ...] per step]."""
    ranks = plans(n, global_batch, micro, world, min_share)
    order = ranks[0].order(0, CPU)
    return [[plan.share(order, k) for plan in ranks] for k in range(ranks[0].steps)], order


SHAPES = [(101, 16, 8, 1), (101, 16, 8, 2), (101, 16, 8, 3), (101, 16, 4, 3), (100, 64, 64, 3), (10, 4, 1, 3),
          (7, 64, 2, 4), (101, 16, 3, 5)]


@pytest.mark.parametrize("n,global_batch,micro,world", SHAPES)
def test_each_step_is_its_block_shared_without_padding(n: int, global_batch: int, micro: int, world: int) -> None:
    steps, order = epoch(n, global_batch, micro, world)
    assert len(steps) == -(-n // global_batch)  # the steps depend on n and the global batch only
    seen = []
    for k, shares in enumerate(steps):
        block = order[k * global_batch:(k + 1) * global_batch].tolist()
        mine = [torch.cat(s.micro_batches).tolist() if s.micro_batches else [] for s in shares]
        assert sorted(i for m in mine for i in m) == sorted(block)  # the block, each image once, nothing else
        assert max(map(len, mine)) - min(map(len, mine)) <= 1  # shares differ by one image at most
        assert len({len(s.micro_batches) + s.idle for s in shares}) == 1  # same passes on every rank (DDP)
        assert all(len(m) <= micro for s in shares for m in s.micro_batches)
        assert all(len(m) > 0 for s in shares for m in s.micro_batches)
        assert {s.weight for s in shares} == {world / len(block)}
        seen += block
    assert sorted(seen) == list(range(n))  # every image of the epoch exactly once
    assert ranks_done(n, global_batch, micro, world) == n


def ranks_done(n: int, global_batch: int, micro: int, world: int) -> int:
    plan = plans(n, global_batch, micro, world)[0]
    return plan.images_done(plan.steps)


@pytest.mark.parametrize("n,global_batch", [(101, 16), (64, 64), (50, 7)])
def test_the_steps_images_are_the_same_at_every_world_size(n: int, global_batch: int) -> None:
    def step_sets(world: int, micro: int) -> list[list[int]]:
        steps, _ = epoch(n, global_batch, micro, world)
        return [sorted(i for s in shares for m in s.micro_batches for i in m.tolist()) for shares in steps]
    one = step_sets(1, global_batch)
    assert all(step_sets(world, micro) == one for world, micro in ((1, 3), (2, 8), (3, 5), (4, 2)))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_without_accumulation_the_batches_are_distributed_samplers(world: int) -> None:
    """--global-batch-size = --batch-size x world size: each rank trains on DistributedSampler's batches, batch
    for batch, up to the last (where the sampler pads with repeats and the plan does not)."""
    n, micro = 103, 8
    steps, _ = epoch(n, micro * world, micro, world)
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(0)
        batches = torch.tensor(list(sampler)).split(micro)
        for k, shares in enumerate(steps[:-1]):
            assert shares[rank].micro_batches[0].tolist() == batches[k].tolist()


def test_the_order_reshuffles_every_epoch_and_overfit_keeps_it_fixed() -> None:
    plan = EpochPlan(50, 50, 50, 0, 1, seed=0)
    a, b = plan.order(0, CPU).tolist(), plan.order(1, CPU).tolist()
    assert sorted(a) == sorted(b) == list(range(50)) and a != b
    fixed = EpochPlan(50, 50, 50, 0, 1, seed=0, shuffle=False)
    assert fixed.order(0, CPU).tolist() == fixed.order(1, CPU).tolist() == list(range(50))


@pytest.mark.parametrize("n,global_batch,micro,world", [(101, 16, 2, 3), (33, 16, 2, 4), (9, 8, 2, 8), (10, 4, 2, 3)])
def test_batchnorm_never_trains_on_one_image(n: int, global_batch: int, micro: int, world: int) -> None:
    steps, order = epoch(n, global_batch, micro, world, min_share=2)
    lone = n % global_batch == 1
    assert len(steps) == -(-n // global_batch) - lone  # a last block of one image is left out
    trained = sorted(i for shares in steps for s in shares for m in s.micro_batches for i in m.tolist())
    assert trained == sorted(order[:n - lone].tolist())
    assert all(len(m) >= 2 for shares in steps for s in shares for m in s.micro_batches)
    assert all(len(m) <= micro + 1 for shares in steps for s in shares for m in s.micro_batches)
    plan = plans(n, global_batch, micro, world, 2)[0]
    assert plan.images_done(plan.steps) == n - lone


@pytest.mark.parametrize("world,micro", [(1, 16), (1, 5), (2, 8), (3, 4), (5, 2)])
def test_weighted_micro_batches_give_the_blocks_mean_gradient(world: int, micro: int) -> None:
    """What DDP computes (the mean over ranks of each rank's accumulated gradient of weight x summed loss)
    equals the gradient of the mean loss over the step's block, for a short last block too."""
    torch.manual_seed(0)
    x, y = torch.randn(21, 5), torch.randint(0, 3, (21,))
    w = torch.randn(5, 3, requires_grad=True)
    ranks = plans(21, 16, micro, world)
    order = ranks[0].order(0, CPU)
    for k in range(ranks[0].steps):
        block = order[k * 16:(k + 1) * 16]
        expected, = torch.autograd.grad(F.cross_entropy(x[block] @ w, y[block]), w)
        total = torch.zeros_like(w)
        for plan in ranks:
            share = plan.share(order, k)
            for index in share.micro_batches:
                loss = F.cross_entropy(x[index] @ w, y[index], reduction="sum") * share.weight
                total += torch.autograd.grad(loss, w)[0]
        torch.testing.assert_close(total / world, expected)
