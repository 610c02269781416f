"""DataConfig: where the training images come from and how a row becomes a (3, H, W) tensor.

The code it configures: training/datasets_io.py (open a dataset, wrap it for torch), training/images.py
(decode, orient, composite, resize, crop, flip), training/buckets.py (aspect-ratio buckets and the batch
sampler), training/collate.py (rows to a batch).

Policies chosen here (and tested):
- ``resolution`` is the training size: an int (square) or [height, width]. Images are scaled so they
  *cover* the target (shorter side to the target for a square), upscaling small ones, then cropped.
- ``max_aspect``: an image whose long side is more than ``max_aspect`` times its short side is refused
  (skipped, counted, logged with its path), because a crop to the training shape would keep only a sliver
  of it and the caption would no longer describe what is seen. ``null`` accepts every aspect ratio.
  A 1x1 image is not refused: it is upscaled to a flat colour.
- ``buckets`` (SDXL-style multi-aspect training, Podell et al. 2023, sec. 2.3): every image goes to the
  bucket (h, w) of closest aspect ratio; the batch sampler only batches images of one bucket. Without
  ``bucket_sizes`` they are generated with about the area of ``resolution``, sides multiples of
  ``bucket_multiple`` and aspect ratios up to ``max_aspect`` (or 4 where that is null).
- Buckets need the image sizes of the whole dataset up front, so they need a map-style dataset:
  ``buckets`` with ``streaming`` is refused.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from PIL import ImageColor

from ldm.config import check_choices, choice

KINDS = ("auto", "imagefolder", "parquet", "saved", "jsonl")
CROPS = ("random", "center")
INCOMPLETE = ("drop", "pad")
# Keys of the batch dict built by training/collate.py; an extra column may not shadow one of them.
BATCH_KEYS = ("pixel_values", "text", "original_size", "crop_coords", "target_size", "flipped", "skipped")
DEFAULT_BUCKET_ASPECT = 4.0  # the widest generated bucket where max_aspect is null (SDXL goes to 4:1)


@dataclass
class DataConfig:
    """Settings of the training data; validated on construction, every error names its ``data.<field>``."""

    source: str = "shapes"  # a path: folder, file or glob ('shapes' and other builtins are opened elsewhere)
    kind: str = choice("auto", *KINDS)  # how to open source; auto: by what the path holds
    split: str = "train"  # the split to read (imagefolder, parquet, saved DatasetDict)
    image_column: str = "image"
    caption_column: Optional[str] = "text"  # null: no captions (text is "")
    extra_columns: list[str] = field(default_factory=list)  # handed through to the batch for conditioners
    image_columns: list[str] = field(default_factory=list)  # extra columns holding images aligned with the image:
    # decoded, resized, cropped and flipped with it, (3, H, W) in [-1, 1] (the trainer fills it from conditions)
    resolution: Any = 512  # int (square) or [height, width]
    crop: str = choice("random", *CROPS)  # random or center crop when training; evaluation always centers
    random_flip: float = 0.0  # probability of a horizontal flip when training
    max_aspect: Optional[float] = 4.0  # refuse images with long/short side above this; null: no limit
    background: Any = "white"  # RGBA / LA / transparent-P images are composited on it: name, '#rrggbb' or [r, g, b]
    buckets: bool = False  # multi-aspect training with aspect-ratio buckets
    bucket_sizes: Optional[list[list[int]]] = None  # [[h, w], ...]; null: generated from resolution
    bucket_multiple: int = 64  # bucket sides are multiples of this (8 suits small images)
    incomplete_batch: str = choice("drop", *INCOMPLETE)  # last partial batch of a bucket: drop, or pad by repeats
    streaming: bool = False  # read as an IterableDataset (no length, no buckets)
    shuffle_buffer: int = 1000  # streaming: size of the shuffle buffer (0: no shuffling)
    max_samples: Optional[int] = None  # keep only the first N rows
    seed: int = 0  # crops, flips, caption choice and batch order derive from (seed, epoch, index)
    num_workers: int = 2  # DataLoader worker processes
    cache_dir: Optional[str] = None  # where `datasets` writes its Arrow cache; null: its default

    def __post_init__(self) -> None:
        check_choices(self, "data")
        if not isinstance(self.source, (str, os.PathLike)) or not str(self.source).strip():
            raise ValueError(f"data.source: must be a non-empty path or builtin name, got {self.source!r}")
        self.source = os.fspath(self.source)
        for name in ("image_column", "split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"data.{name}: must be a non-empty string, got {getattr(self, name)!r}")
        if self.caption_column is not None and (not isinstance(self.caption_column, str) or not self.caption_column):
            raise ValueError(f"data.caption_column: must be a non-empty string or null, got {self.caption_column!r}")
        self._check_extra_columns()
        self.resolution = _resolution(self.resolution)
        if not 0.0 <= _number(self.random_flip, "random_flip") <= 1.0:
            raise ValueError(f"data.random_flip: a probability in [0, 1], got {self.random_flip!r}")
        if self.max_aspect is not None and not _number(self.max_aspect, "max_aspect") >= 1.0:
            raise ValueError(f"data.max_aspect: must be >= 1 (long side / short side) or null, got {self.max_aspect!r}")
        self.background = _colour(self.background)
        for name in ("buckets", "streaming"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"data.{name}: must be true or false, got {getattr(self, name)!r}")
        _int(self.bucket_multiple, "bucket_multiple", 1)
        if self.bucket_sizes is not None:
            self.bucket_sizes = self._checked_bucket_sizes()
        if self.buckets and self.streaming:
            raise ValueError(
                "data.buckets: aspect-ratio buckets need every image size up front, which a streamed dataset "
                "cannot give; set data.streaming=false or data.buckets=false"
            )
        _int(self.shuffle_buffer, "shuffle_buffer", 0)
        if self.max_samples is not None:
            _int(self.max_samples, "max_samples", 1)
        _int(self.seed, "seed", 0)
        _int(self.num_workers, "num_workers", 0)

    # ------------------------------------------------------------------------------------ derived values

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the training images without buckets."""
        if isinstance(self.resolution, int):
            return self.resolution, self.resolution
        return int(self.resolution[0]), int(self.resolution[1])

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return tuple(self.background)  # type: ignore[return-value]

    # ---------------------------------------------------------------------------------------- checks

    def _check_extra_columns(self) -> None:
        if isinstance(self.extra_columns, str) or not all(isinstance(c, str) and c for c in self.extra_columns):
            raise ValueError(f"data.extra_columns: must be a list of column names, got {self.extra_columns!r}")
        self.extra_columns = list(self.extra_columns)
        for c in self.extra_columns:
            if c in BATCH_KEYS:
                raise ValueError(
                    f"data.extra_columns: {c!r} would shadow a batch key; the batch already has {', '.join(BATCH_KEYS)}"
                )
            if c in (self.image_column, self.caption_column):
                raise ValueError(f"data.extra_columns: {c!r} is already the image or caption column")
        if len(set(self.extra_columns)) != len(self.extra_columns):
            raise ValueError(f"data.extra_columns: duplicate names in {self.extra_columns!r}")
        if isinstance(self.image_columns, str) or not all(isinstance(c, str) for c in self.image_columns):
            raise ValueError(f"data.image_columns: must be a list of column names, got {self.image_columns!r}")
        self.image_columns = list(self.image_columns)
        stray = [c for c in self.image_columns if c not in self.extra_columns]
        if stray:
            raise ValueError(f"data.image_columns: {stray[0]!r} is not one of data.extra_columns")

    def _checked_bucket_sizes(self) -> list[list[int]]:
        sizes = []
        for s in self.bucket_sizes:  # type: ignore[union-attr]
            try:
                h, w = (int(v) for v in s)
                ok = all(not isinstance(v, bool) and float(v) == int(v) for v in s)
            except (TypeError, ValueError):
                ok = False
            if not ok or h < 1 or w < 1:
                raise ValueError(f"data.bucket_sizes: each bucket must be [height, width] of positive integers, got {s!r}")
            if h % self.bucket_multiple or w % self.bucket_multiple:
                raise ValueError(
                    f"data.bucket_sizes: bucket {[h, w]} has a side that is not a multiple of "
                    f"data.bucket_multiple={self.bucket_multiple}"
                )
            sizes.append([h, w])
        if not sizes:
            raise ValueError("data.bucket_sizes: must hold at least one [height, width], or be null to generate them")
        if len({tuple(s) for s in sizes}) != len(sizes):
            raise ValueError(f"data.bucket_sizes: duplicate buckets in {sizes}")
        return sizes


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"data.{name}: must be a finite number, got {value!r}")
    return float(value)


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"data.{name}: must be an integer >= {minimum}, got {value!r}")
    return value


def _resolution(value: Any) -> int | list[int]:
    """An int, or [height, width] (a list from YAML / OmegaConf or a tuple) of positive integers."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"data.resolution: must be >= 1, got {value!r}")
        return value
    try:
        items = list(value)
    except TypeError:
        items = None
    if (
        items is None or len(items) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items)
    ):
        raise ValueError(f"data.resolution: must be a positive int or [height, width] of positive ints, got {value!r}")
    return [int(v) for v in items]


def _colour(value: Any) -> list[int]:
    """'white', '#rrggbb', 'rgb(...)' (anything PIL.ImageColor reads) or [r, g, b] in 0..255 -> [r, g, b]."""
    if isinstance(value, str):
        try:
            rgb = ImageColor.getrgb(value)
        except ValueError:
            raise ValueError(
                f"data.background: unknown colour {value!r}; use a name ('white'), '#rrggbb' or [r, g, b]"
            ) from None
        return [int(v) for v in rgb[:3]]
    try:
        items = list(value)
    except TypeError:
        items = None
    if items is None or len(items) != 3 or any(
        isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255 for v in items
    ):
        raise ValueError(f"data.background: must be a colour name, '#rrggbb' or [r, g, b] with 0..255, got {value!r}")
    return [int(v) for v in items]
