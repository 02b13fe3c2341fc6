"""Samplers for iteration-based training and sharded inference.

Training draws from one endless global stream of ``(index, aug_seed)`` pairs built from
seeded per-epoch permutations (optionally with LVIS repeat factors). The augmentation seed is
``socokit.resume.sample_seed(seed, epoch, position in the epoch)``: a hash, so different run
seeds give unrelated streams, and an image repeated within an epoch (repeat factors) gets a
different augmentation each time. Rank ``r`` of ``W`` takes
stream positions ``r, r + W, r + 2W, ...``. With ``b`` images per rank per step, global
step ``i`` therefore consumes positions ``[i*b*W, (i+1)*b*W)`` whatever ``W`` is, and the
augmentation seed belongs to the stream position: 2 ranks x 1 image see exactly the samples of
1 rank x 2 images, and a resumed run continues the very same stream.

:class:`AspectRatioGroupedBatchSampler` (detectron2's ``ASPECT_RATIO_GROUPING``, on in every
reference recipe) batches each rank's stream by orientation instead, so a batch never mixes
landscape and portrait images; batches then no longer map one-to-one onto stream positions, and
a resumed run replays the (cheap, index-only) grouping from the start of the stream.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.utils.data import Sampler

from socokit.resume import sample_seed


def repeat_factors(records: list, repeat_thresh: float) -> torch.Tensor:
    """LVIS repeat factors (Gupta et al. 2019; detectron2 ``RepeatFactorTrainingSampler``).

    r(c) = max(1, sqrt(t / f(c))) with f(c) the fraction of training images containing
    category c; an image repeats max over its categories of r(c) (1 for images without
    annotations).

    Returns:
        float Tensor[N] of per-image repeat factors.
    """
    counts = defaultdict(int)
    for rec in records:
        for label in {a["label"] for a in rec.anns}:
            counts[label] += 1
    n = max(1, len(records))
    cat_rep = {c: max(1.0, math.sqrt(repeat_thresh / (k / n))) for c, k in counts.items()}
    return torch.tensor([max([cat_rep[a["label"]] for a in rec.anns], default=1.0)
                         for rec in records], dtype=torch.float64)


class InfiniteSampler(Sampler):
    """Endless shuffled stream of ``(index, aug_seed)`` for this rank.

    Args:
        size: number of images.
        seed: shared by all ranks (same global stream everywhere).
        rank, world_size: this process's slice of the stream.
        start: number of stream items this rank has already consumed (resume).
        shuffle: permute each epoch (otherwise 0..size-1 repeated).
        rep_factors: optional per-image repeat factors (stochastic rounding per epoch).
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0,
                 shuffle: bool = True, rep_factors: torch.Tensor | None = None):
        if size <= 0:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        self.size, self.seed, self.rank, self.world_size = size, int(seed), rank, world_size
        self.start, self.shuffle, self.rep_factors = int(start), shuffle, rep_factors

    def _epoch(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        if self.rep_factors is None:
            idx = torch.arange(self.size)
        else:
            frac = self.rep_factors - self.rep_factors.floor()
            reps = self.rep_factors.floor() + (torch.rand(self.size, generator=g, dtype=torch.float64) < frac)
            idx = torch.repeat_interleave(torch.arange(self.size), reps.long())
        if self.shuffle:
            idx = idx[torch.randperm(len(idx), generator=g)]
        return idx

    def __iter__(self):
        pos = self.start * self.world_size + self.rank  # global stream position
        epoch, offset = 0, 0
        perm = self._epoch(0)
        while True:
            while pos - offset >= len(perm):
                offset += len(perm)
                epoch += 1
                perm = self._epoch(epoch)
            idx = int(perm[pos - offset])
            yield idx, sample_seed(self.seed, epoch, pos - offset)
            pos += self.world_size

    def __len__(self):  # endless; DataLoader only needs this for len(loader)
        return 2 ** 62


class InferenceSampler(Sampler):
    """Contiguous shard of ``range(size)`` for this rank, every image exactly once.

    Contiguous shards concatenated in rank order give back the single-process order, so the
    gathered results are identical to a one-process evaluation.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        per = size // world_size
        extra = size % world_size
        begin = rank * per + min(rank, extra)
        self.indices = list(range(begin, begin + per + (1 if rank < extra else 0)))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class AspectRatioGroupedBatchSampler(Sampler):
    """Batches of ``batch_size`` stream items of one orientation (detectron2
    ``AspectRatioGroupedDataset``).

    Items of this rank's stream go to one of two buckets, landscape (``width > height``) or not;
    a bucket that reaches ``batch_size`` items is emitted as a batch, in stream order. Padding a
    batch to its largest image then adds no area for the other orientation (less padding in the
    BN statistics and less compute).

    Args:
        sampler: this rank's endless stream (an :class:`InfiniteSampler` started at 0).
        landscape: per dataset index, True when the image is wider than high.
        batch_size: images per batch.
        skip_batches: batches already consumed (resume); they are regrouped and dropped.
    """

    def __init__(self, sampler: InfiniteSampler, landscape, batch_size: int, skip_batches: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler, self.batch_size, self.skip_batches = sampler, int(batch_size), int(skip_batches)
        self.landscape = [bool(v) for v in landscape]

    def __iter__(self):
        buckets = ([], [])
        emitted = 0
        for item in self.sampler:
            bucket = buckets[0 if self.landscape[item[0]] else 1]
            bucket.append(item)
            if len(bucket) == self.batch_size:
                batch = list(bucket)
                bucket.clear()
                emitted += 1
                if emitted > self.skip_batches:
                    yield batch

    def __len__(self):  # endless
        return 2 ** 62
