"""Aspect-ratio buckets and the batch sampler that keeps each batch inside one bucket.

Multi-aspect training (NovelAI's aspect-ratio bucketing; SDXL, Podell et al. 2023, sec. 2.3): instead of
cropping every image to a square, each image goes to the bucket (h, w) whose aspect ratio is closest to
its own, and every batch is drawn from a single bucket, so its tensors stack.

    buckets = make_buckets((1024, 1024), multiple=64, max_aspect=4.0)   # [(512, 2048), ..., (2048, 512)]
    ids = [closest_bucket(size_hw, buckets) for size_hw in sizes]       # sizes from image headers
    sampler = BucketBatchSampler(ids, batch_size=4, seed=0, num_replicas=world, rank=rank)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_rows)
    sampler.set_epoch(epoch)  # before each epoch: a new, reproducible order

Sampler contract:
- every batch holds indices of one bucket; ``None`` ids (unreadable images) are never yielded;
- the order depends only on (seed, epoch): every rank computes the same global list of batches and
  takes every ``num_replicas``-th one, starting at ``rank``;
- ``incomplete='drop'``: a bucket's last partial batch is dropped, and so are the last
  ``len % num_replicas`` batches, so ranks get disjoint batches and the same number of them;
  ``incomplete='pad'``: a partial batch is filled with repeats from its own bucket, and the batch list is
  extended with repeats from its start to a multiple of ``num_replicas``: nothing is left out, at the price
  of a few repeats (as torch's DistributedSampler pads);
- with Accelerate: either shard here (num_replicas / rank) and do not hand the DataLoader to
  ``accelerator.prepare``, or leave num_replicas=1 and let ``prepare`` shard whole batches.

A non-bucketed run is the special case of one bucket: ``BucketBatchSampler([0] * n, ...)``.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

__all__ = ["BucketBatchSampler", "closest_bucket", "make_buckets"]


def make_buckets(resolution_hw: tuple[int, int], multiple: int = 64, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """Buckets (h, w) of about the area of ``resolution_hw``, sides multiples of ``multiple``, sorted by h / w.

    For each height h (a multiple of ``multiple``) the width is the largest multiple whose area does not
    exceed the target area; buckets with max(h, w) / min(h, w) > max_aspect are left out. The transposed
    bucket of each one is present too, so portrait and landscape are treated alike.
    """
    th, tw = resolution_hw
    area = th * tw
    if multiple < 1 or max_aspect < 1:
        raise ValueError(f"make_buckets: need multiple >= 1 and max_aspect >= 1, got {multiple}, {max_aspect}")
    if area < multiple * multiple:
        raise ValueError(
            f"make_buckets: resolution {th}x{tw} is smaller than one {multiple}x{multiple} cell; "
            f"lower data.bucket_multiple"
        )
    found = set()
    h = multiple
    while h * multiple <= area:
        w = (area // h) // multiple * multiple
        if w >= multiple and max(h, w) / min(h, w) <= max_aspect:
            found.add((h, w))
            found.add((w, h))
        h += multiple
    if not found:  # a tolerance too tight for the grid: keep the squarest cell
        s = max(multiple, int(math.isqrt(area)) // multiple * multiple)
        found.add((s, s))
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def closest_bucket(size_hw: tuple[int, int], buckets: Sequence[Sequence[int]]) -> int:
    """Index of the bucket whose aspect ratio is closest to ``size_hw``'s, compared as |log(h/w) - log(bh/bw)|.

    On a tie the bucket listed first wins.
    """
    h, w = size_hw
    if h < 1 or w < 1:
        raise ValueError(f"closest_bucket: image size must be positive, got {size_hw}")
    log_aspect = math.log(h / w)
    return min(range(len(buckets)), key=lambda i: abs(log_aspect - math.log(buckets[i][0] / buckets[i][1])))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, each from one bucket; reproducible from (seed, epoch); rank-sharded."""

    def __init__(self, bucket_ids: Sequence[int | None], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 incomplete: str = "drop", num_replicas: int = 1, rank: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"BucketBatchSampler: batch_size must be an integer >= 1, got {batch_size!r}")
        if incomplete not in ("drop", "pad"):
            raise ValueError(f"BucketBatchSampler: incomplete must be 'drop' or 'pad', got {incomplete!r}")
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"BucketBatchSampler: num_replicas must be an integer >= 1, got {num_replicas!r}")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"BucketBatchSampler: rank must be in [0, {num_replicas}), got {rank!r}")
        self.members: dict[int, list[int]] = {}  # bucket id -> dataset indices, in dataset order
        for index, b in enumerate(bucket_ids):
            if b is not None:
                self.members.setdefault(int(b), []).append(index)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.incomplete = incomplete
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_global_batches(self) -> int:
        rounding = math.floor if self.incomplete == "drop" else math.ceil
        return sum(rounding(len(m) / self.batch_size) for m in self.members.values())

    def __len__(self) -> int:
        n = self._num_global_batches()
        return n // self.num_replicas if self.incomplete == "drop" else math.ceil(n / self.num_replicas)

    def global_batches(self) -> list[list[int]]:
        """The batches of all ranks for this epoch, in order (rank r takes items r, r + R, r + 2R, ...)."""
        rng = random.Random(f"buckets/{self.seed}/{self.epoch}")
        batches: list[list[int]] = []
        for b in sorted(self.members):
            idx = list(self.members[b])
            if self.shuffle:
                rng.shuffle(idx)
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start:start + self.batch_size]
                if len(batch) < self.batch_size:
                    if self.incomplete == "drop":
                        continue
                    batch = batch + [idx[i % len(idx)] for i in range(self.batch_size - len(batch))]
                batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)  # interleave the buckets
        extra = len(batches) % self.num_replicas
        if extra and self.incomplete == "drop":
            batches = batches[: len(batches) - extra]
        elif extra:
            batches += [batches[i % len(batches)] for i in range(self.num_replicas - extra)]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.global_batches()[self.rank::self.num_replicas]
