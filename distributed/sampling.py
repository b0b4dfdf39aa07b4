"""Which images each rank trains on in each optimiser step, and the disjoint, unpadded evaluation shards.

A run's mathematics does not depend on its world size. An epoch is a permutation of the training split
(DistributedSampler's: `randperm` seeded with seed + epoch); the k-th optimiser step takes the k-th block of
`global_batch` indices of it, at every world size. Inside a block:
  - the ranks share it strided (rank r takes positions r, r + R, r + 2R, ... of the block), so shares differ
    by one image at most; R is the world size, fewer only when the block has fewer images than ranks (at
    the epoch's end) or, for a BatchNorm model, fewer than two per rank;
  - each rank cuts its share into the same number of micro-batches of at most `micro_batch` images (sizes
    differing by one); a rank with fewer images than micro-steps (or none) makes up the difference with
    idle passes of zero weight, so that every rank runs the same forwards and backwards (DDP's collectives);
  - each image's loss is weighted world_size / len(block): DDP's mean over ranks of the summed, weighted
    losses' gradients is then exactly the mean over the block's images.
No padding: the epoch's last block is short (len(split) mod global_batch images) and every image of the
epoch is trained once. With global_batch = micro_batch x world size this is DistributedSampler's order,
batch for batch, except that its padding (repeats of the first indices) is gone. A BatchNorm model cannot
normalise one image, so its last block is left out when it holds exactly one image; and with
`--batch-size 2` its micro-batch takes 3 images rather than leave one alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepShare:
    """One rank's part of one optimiser step."""
    micro_batches: list[torch.Tensor]  # indices into the training split, in order
    idle: int  # zero-weight passes this rank makes so that every rank makes the same number
    weight: float  # each image's summed loss is multiplied by this (world size / images in the step)
    block: torch.Tensor  # the step's images, all ranks' (an idle pass runs on its first)


@dataclass(frozen=True)
class EpochPlan:
    """How a run's training split becomes optimiser steps; everything but `rank` and `world_size` fixes the
    mathematics, those two only say which part of it this process computes."""
    images: int  # training images
    global_batch: int
    micro_batch: int
    rank: int
    world_size: int
    seed: int
    shuffle: bool = True
    min_share: int = 1  # 2 for BatchNorm models: no rank trains on one image alone

    @property
    def steps(self) -> int:
        """Optimiser steps per epoch: a function of the split and the global batch alone."""
        single_left_out = self.min_share > 1 and self.images % self.global_batch == 1 and self.images > 1
        return -(-self.images // self.global_batch) - single_left_out

    def order(self, epoch: int, device: torch.device) -> torch.Tensor:
        """The epoch's permutation (DistributedSampler's: the same seed + epoch generator)."""
        if not self.shuffle:
            return torch.arange(self.images, device=device)
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.images, generator=generator).to(device)

    def share(self, order: torch.Tensor, step: int) -> StepShare:
        """This rank's micro-batches of step `step` (0-based within the epoch) of an epoch's `order`."""
        block = order[step * self.global_batch:(step + 1) * self.global_batch]
        ranks = min(self.world_size, len(block) // self.min_share)
        mine = block[self.rank::ranks] if self.rank < ranks else block[:0]
        largest = -(-len(block) // ranks)
        passes = min(-(-largest // self.micro_batch), largest // self.min_share)  # the largest share's pieces
        pieces = min(passes, len(mine) // self.min_share)
        micro_batches = list(mine.tensor_split(pieces)) if pieces else []
        return StepShare(micro_batches, passes - pieces, self.world_size / len(block), block)

    def images_done(self, steps: int) -> int:
        """Distinct images trained in an epoch's first `steps` steps, over all ranks."""
        return min(steps * self.global_batch, self.images)


def eval_shard(n: int, rank: int, world_size: int, device: torch.device) -> torch.Tensor:
    """A disjoint, unpadded shard: the union over ranks is every index exactly once (empty when rank >= n)."""
    return torch.arange(min(rank, n), n, world_size, device=device)
