"""Rows to a batch: the dict the trainer and the conditioners read.

    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_rows)
    batch = next(iter(loader))
    batch["pixel_values"]   # (B, 3, H, W) float32 in [-1, 1]
    batch["text"]           # list of B captions
    batch["original_size"]  # (B, 2) long, (h, w) before resizing        } SDXL micro-conditioning
    batch["crop_coords"]    # (B, 2) long, (top, left) of the crop        } (Podell et al. 2023, sec. 2.2)
    batch["target_size"]    # (B, 2) long, (h, w) == (H, W)               }
    batch["flipped"]        # (B,) bool
    batch["skipped"]        # list of 'path: reason' for rows of this batch that could not be read
    batch[extra]            # each DataConfig.extra_columns: a tensor where the values are numbers or
                            # tensors of one shape, else a list

Rows that are ``None`` or ``SkippedRow`` (bad images) are left out, so a batch may be smaller than the
batch size. A batch with no good row at all is returned as ``None``: the training loop must skip it
(and, when distributed, still take part in the step's collectives, e.g. with a zero loss).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .data_config import BATCH_KEYS

__all__ = ["SkippedRow", "collate_rows"]

SIZE_KEYS = ("original_size", "crop_coords", "target_size")


@dataclass(frozen=True)
class SkippedRow:
    """A row the dataset could not use: where it came from and why (carried to the batch's ``skipped``)."""

    path: str
    reason: str


def collate_rows(rows: Sequence[dict[str, Any] | SkippedRow | None]) -> dict[str, Any] | None:
    """Stack the good rows of ``rows`` into one batch dict (see the module docstring); None if none is good."""
    skipped = [f"{r.path}: {r.reason}" for r in rows if isinstance(r, SkippedRow)]
    good = [r for r in rows if isinstance(r, dict)]
    if not good:
        return None
    shapes = {tuple(r["pixel_values"].shape) for r in good}
    if len(shapes) > 1:
        raise ValueError(
            f"collate_rows: images of one batch have different shapes {sorted(shapes)}; batch images of one "
            f"size only (one resolution, or aspect-ratio buckets with BucketBatchSampler)"
        )
    batch: dict[str, Any] = {
        "pixel_values": torch.stack([r["pixel_values"] for r in good]),  # (B, 3, H, W)
        "text": [r["text"] for r in good],
    }
    for key in SIZE_KEYS:
        batch[key] = torch.tensor([list(r[key]) for r in good], dtype=torch.long)  # (B, 2)
    batch["flipped"] = torch.tensor([bool(r["flipped"]) for r in good], dtype=torch.bool)  # (B,)
    batch["skipped"] = skipped
    for key in good[0]:
        if key not in BATCH_KEYS:
            batch[key] = _collate_values([r[key] for r in good])
    return batch


def _collate_values(values: list[Any]) -> Any:
    """Numbers -> (B,) tensor; tensors / arrays of one shape -> (B, ...) tensor; anything else -> list."""
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return torch.tensor([bool(v) for v in values], dtype=torch.bool)
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values):
        return torch.tensor(values)
    if all(isinstance(v, (torch.Tensor, np.ndarray)) for v in values):
        tensors = [torch.as_tensor(v) for v in values]
        if len({t.shape for t in tensors}) == 1:
            return torch.stack(tensors)
    return list(values)
