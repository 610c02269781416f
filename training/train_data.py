"""The trainer's data: the dataset of a TrainConfig, an endless resumable stream of micro-batches, caches.

    rows = train_rows(cfg)                                    # ImageCaptionDataset (or CachedLatentRows)
    stream = BatchStream(rows, cfg.batch_size, rank, world, epoch=3, consumed=5, num_workers=0)
    for epoch, consumed, batch in stream: ...                 # consumed: batches of `epoch` taken so far

Position and resume: the batch order of an epoch depends only on (data.seed, epoch) (training/buckets.py), and
every process gets the same number of batches per epoch. The stream's sampler calls ``set_epoch`` on the batch
sampler and hands out (epoch, index) keys, so the dataset (in the DataLoader workers) switches epoch itself; it
skips the batches already consumed without loading them, so a run resumed at (epoch, consumed) sees exactly the
batches the uninterrupted run saw next.

Each row carries its dataset index (``ROW_INDEX``), so per-sample random draws can be keyed by it
(training/conditions.py).

Latent cache (``cache.latents``): the VAE posterior moments (mean, logvar) of every image, computed once with the
evaluation transform (centre crop, no flip) and kept on the CPU; each step samples a fresh latent from them.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .collate import SkippedRow, collate_rows
from .conditions import keyed_seed
from .config import SHAPES_SOURCE, TrainConfig
from .datasets_io import ImageCaptionDataset, open_dataset
from .images import keyed_rng

__all__ = ["BatchStream", "CachedLatentRows", "ROW_INDEX", "cache_latents", "open_train_dataset", "train_rows"]

logger = logging.getLogger(__name__)
ROW_INDEX = "_row_index"  # the dataset index of each row, collated to a (B,) long tensor


def open_train_dataset(cfg: TrainConfig):
    """The ``datasets.Dataset`` of the run: the builtin shapes (``data.source: shapes``) or a local dataset."""
    if cfg.data.source == SHAPES_SOURCE:
        from ldm.shapes import shapes_dataset

        return shapes_dataset(cfg.shapes_rows, cfg.shapes_config())
    return open_dataset(cfg.data)


class IndexedRows(Dataset):
    """Rows of an ImageCaptionDataset with their index added (``ROW_INDEX``). ``shuffle``: the batch order is a
    seeded permutation per epoch (training), else the rows' order; it is independent of the transform, so rows
    prepared with the evaluation transform for the latent cache are still drawn in random batches."""

    def __init__(self, rows: ImageCaptionDataset, shuffle: bool = True):
        self.rows, self.shuffle = rows, shuffle

    def set_epoch(self, epoch: int) -> None:
        self.rows.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedRow:
        row = self.rows[index]
        return {**row, ROW_INDEX: index} if isinstance(row, dict) else row

    def batch_sampler(self, batch_size: int, *, num_replicas: int, rank: int):
        return self.rows.batch_sampler(batch_size, num_replicas=num_replicas, rank=rank, shuffle=self.shuffle)


def train_rows(cfg: TrainConfig, hf_dataset=None, eval_transform: bool = False) -> IndexedRows:
    """The training rows; with ``cache.latents`` (or ``eval_transform``) the images are prepared with the
    evaluation transform (centre crop, no flip)."""
    hf_dataset = open_train_dataset(cfg) if hf_dataset is None else hf_dataset
    rows = ImageCaptionDataset(hf_dataset, cfg.data, train=not (cfg.cache.latents or eval_transform))
    return IndexedRows(rows, shuffle=not eval_transform)  # cached latents: evaluation transform, shuffled batches


class _EpochRows(Dataset):
    """Reads ``(epoch, index)`` keys: a worker's copy of the rows switches epoch itself, so one DataLoader (and one
    set of worker processes) serves every epoch."""

    def __init__(self, rows):
        self.rows, self.epoch = rows, None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if epoch != self.epoch:
            self.rows.set_epoch(epoch)
            self.epoch = epoch
        return self.rows[index]


class _Endless(Sampler[list[tuple[int, int]]]):
    """The batches of every epoch from (epoch, consumed) on, as (epoch, index) keys; records the position after
    each batch it hands out in ``positions`` (the DataLoader returns batches in this order)."""

    def __init__(self, sampler, epoch: int, consumed: int, positions: deque):
        self.sampler, self.epoch, self.consumed, self.positions = sampler, epoch, consumed, positions

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, skip = self.epoch, self.consumed
        while True:
            if skip >= len(self.sampler):
                epoch, skip = epoch + 1, 0
            self.sampler.set_epoch(epoch)
            for k, batch in enumerate(self.sampler):  # the batches of an epoch depend only on (seed, epoch)
                if k >= skip:
                    self.positions.append((epoch, k + 1))
                    yield [(epoch, i) for i in batch]
            epoch, skip = epoch + 1, 0


class BatchStream:
    """Endless micro-batches of this process from (epoch, consumed) on; yields (epoch, consumed after, batch).

    One DataLoader for the whole run: its workers live as long as the stream (a DataLoader per epoch forked its
    workers again every epoch, which at a few dozen steps an epoch cost a small model much of its time)."""

    def __init__(self, rows, batch_size: int, rank: int, world_size: int, *, epoch: int = 0, consumed: int = 0,
                 num_workers: int = 0, collate: Callable = collate_rows):  # fmt: skip
        self.rows, self.epoch, self.consumed = rows, epoch, consumed
        self.sampler = rows.batch_sampler(batch_size, num_replicas=world_size, rank=rank)
        self.num_workers, self.collate, self.rank = num_workers, collate, rank
        if len(self.sampler) == 0:
            raise ValueError(
                f"batch_size: {len(rows)} usable rows give no full batch of {batch_size} for each of {world_size} "
                f"process(es); lower batch_size, add data, or set data.incomplete_batch=pad"
            )

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int, dict | None]]:
        positions: deque = deque()
        # its own generator: creating an iterator draws a base seed, which must not move the global RNG
        # (a resumed run creates one where the uninterrupted run did not)
        seed = keyed_seed(self.sampler.seed, self.epoch, self.rank, "loader")
        loader = DataLoader(_EpochRows(self.rows), batch_sampler=_Endless(self.sampler, self.epoch, self.consumed, positions),
                            collate_fn=self.collate, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(seed))  # fmt: skip
        for batch in loader:
            self.epoch, self.consumed = positions.popleft()
            yield self.epoch, self.consumed, batch


# ---------------------------------------------------------------------------------------------- caches


class CachedLatentRows(Dataset):
    """Rows whose image is replaced by cached VAE moments: {"moments": (2z, h, w), "text", sizes..., index}."""

    def __init__(self, rows: IndexedRows, moments: list[Tensor | None], seed: int):
        self.rows, self.moments, self.seed, self.epoch = rows, moments, seed, 0
        base = rows.rows
        column = base.cfg.caption_column
        self.captions = base.hf.select_columns([column]) if column else None
        self.fixed: dict[int, dict] = {}  # per index: the sizes and extra columns of the evaluation transform

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedRow:
        m = self.moments[index]
        if m is None:
            return SkippedRow(f"row {index}", "could not be read when the latent cache was built")
        fixed = self.fixed[index]
        text = ""
        if self.captions is not None:  # the caption choice among several, per epoch (as the image rows do)
            text = self.rows.rows._caption(self.captions[index], keyed_rng(self.seed, self.epoch, index, "caption"))
        return {**fixed, "pixel_values": m, "text": text, ROW_INDEX: index}

    def batch_sampler(self, batch_size: int, *, num_replicas: int, rank: int):
        return self.rows.batch_sampler(batch_size, num_replicas=num_replicas, rank=rank)


@torch.no_grad()
def cache_latents(rows: IndexedRows, vae, batch_size: int, device, dtype, seed: int,
                  progress: Callable[[int, int], None] | None = None) -> CachedLatentRows:  # fmt: skip
    """Encode every row once: moments (mean and logvar stacked on channels, (2z, h, w)) on the CPU."""
    n = len(rows)
    moments: list[Tensor | None] = [None] * n
    cached = CachedLatentRows(rows, moments, seed)
    loader = DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate_rows)
    done = 0
    for batch in loader:
        done += batch_size
        if progress is not None:
            progress(min(done, n), n)
        if batch is None:
            continue
        mean, logvar = vae.moments(batch["pixel_values"].to(device, dtype))  # (B, z, h, w) each
        both = torch.cat([mean, logvar], dim=1).cpu()  # (B, 2z, h, w)
        for j, index in enumerate(batch[ROW_INDEX].tolist()):
            moments[index] = both[j]
            fixed = {k: tuple(batch[k][j].tolist()) for k in ("original_size", "crop_coords", "target_size")}
            cached.fixed[index] = {**fixed, "flipped": bool(batch["flipped"][j])}
            for key in rows.rows.cfg.extra_columns:
                cached.fixed[index][key] = batch[key][j]
    missing = sum(m is None for m in moments)
    if missing:
        logger.warning("latent cache: %d of %d rows could not be read and are skipped", missing, n)
    return cached
