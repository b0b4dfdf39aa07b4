"""Each rank's share of an epoch: DistributedSampler's indices in batches, the steps an epoch takes, the images
that were trained (without the sampler's padding), and the disjoint, unpadded evaluation shards."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data.distributed import DistributedSampler


def make_sampler(n: int, rank: int, world_size: int, seed: int, shuffle: bool = True) -> DistributedSampler:
    # DistributedSampler only needs len(); explicit rank/replicas keep it usable without a process group.
    return DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)


def epoch_batches(sampler: DistributedSampler, epoch: int, batch_size: int,
                  device: torch.device) -> Iterator[torch.Tensor]:
    """This rank's batches of indices for one epoch: every rank gets the same number of batches."""
    sampler.set_epoch(epoch)
    index = torch.tensor(list(sampler), dtype=torch.long, device=device)
    yield from index.split(batch_size)


def steps_per_epoch(sampler: DistributedSampler, batch_size: int, drop_single: bool = False) -> int:
    """Batches per rank per epoch; with `drop_single` (BatchNorm models) a last batch of one image is left out:
    BatchNorm cannot normalise a batch of one."""
    return -(-len(sampler) // batch_size) - (drop_single and len(sampler) % batch_size == 1 and len(sampler) > 1)


def images_seen(sampler: DistributedSampler, batch_size: int, batches: int, drop_single: bool = False) -> int:
    """Distinct images all ranks trained on in an epoch's first `batches` batches.

    The sampler pads the split to a multiple of the world size by repeating its first indices; the
    repeats are the last item of some ranks' shards, so they fall in the epoch's last batch (which is the
    one a BatchNorm model leaves out when it holds one image: then every image it trained on is distinct).
    """
    steps = steps_per_epoch(sampler, batch_size, drop_single)
    per_rank = min(batches * batch_size, sampler.num_samples)
    padding = sampler.total_size - len(sampler.dataset)
    if batches >= steps and steps < steps_per_epoch(sampler, batch_size):  # the single last batch left out
        return (sampler.num_samples - 1) * sampler.num_replicas
    return per_rank * sampler.num_replicas - (padding if batches >= steps else 0)


def eval_shard(n: int, rank: int, world_size: int, device: torch.device) -> torch.Tensor:
    """A disjoint, unpadded shard: the union over ranks is every index exactly once (empty when rank >= n)."""
    return torch.arange(min(rank, n), n, world_size, device=device)
