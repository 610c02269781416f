"""Open a local dataset with `datasets`, and wrap it as a torch dataset of training rows.

    ds = open_dataset(cfg)                          # datasets.Dataset, or IterableDataset if cfg.streaming
    data = ImageCaptionDataset(ds, cfg, train=True)  # a torch Dataset (IterableDataset when streaming)
    sampler = data.batch_sampler(batch_size=4, num_replicas=world, rank=rank)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate_rows, num_workers=cfg.num_workers)
    for epoch in ...: sampler.set_epoch(epoch); data.set_epoch(epoch); for batch in loader: ...

Sources (``DataConfig.kind``, or ``auto`` from what the path holds), all local, never the Hub:
- ``imagefolder``: a folder of images, captions in metadata.jsonl or metadata.csv (``file_name`` column);
- ``parquet``: a .parquet file, a glob, or a folder of parquet files;
- ``saved``: a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
- ``jsonl``: a .jsonl / .json file (or glob) whose image column holds paths relative to that file.
``streaming=True`` gives an IterableDataset (a saved folder through ``to_iterable_dataset``).

Rows (``ImageCaptionDataset``): each index gives the dict that training/collate.py stacks, or a
``SkippedRow`` where the image is bad (training/images.py says what "bad" covers). Bad images are counted
in ``bad`` (path -> reason) and logged once per path and process. Crops, flips and the choice among several
captions come from ``keyed_rng(seed, epoch, index)``: the same in every worker, run and rank.

Captions (``_caption``), one policy per case; each case is counted in ``caption_issues`` (case -> row keys,
``caption_counts`` gives the numbers) and logged once per case and process with the first row that has it:

    missing      None, or a list with no caption in it   -> "" (trained as the unconditional caption)
    empty        ""                                       -> ""
    whitespace   only whitespace                          -> "" (the tokenizer would give the same tokens)
    non_utf8     bytes that are not UTF-8                 -> decoded with U+FFFD replacing the bad bytes
    list         several captions                         -> one at random per (seed, epoch, index) when training,
                                                             the first otherwise (None entries dropped)
    not_text     a number or other non-text value         -> str(value)
    truncated    more than 75 CLIP tokens                 -> kept whole here; the text towers' tokenizer keeps the
                                                             first 75 tokens (77 with start / end), as SD training did;
                                                             the log shows the dropped text
UTF-8 bytes decode silently; a ClassLabel column gives its names. A metadata.jsonl / .csv or .jsonl file that is
not UTF-8 is refused when the dataset is opened, naming the file and line (its encoding cannot be guessed safely).

Epochs and workers: call ``set_epoch`` before creating each epoch's iterator. With
``persistent_workers=True`` the workers keep the epoch they started with, so do not combine the two.
"""
from __future__ import annotations

import glob
import logging
import os
import random
from typing import Any

import datasets
import torch
from torch.utils.data import Dataset, IterableDataset

from .buckets import BucketBatchSampler, closest_bucket, make_buckets
from .collate import SkippedRow
from .data_config import DEFAULT_BUCKET_ASPECT, DataConfig
from .images import BadImage, check_aspect, keyed_rng, load_image, peek_size, transform_image

__all__ = ["ImageCaptionDataset", "StreamingImageCaptionDataset", "check_columns", "detect_kind", "open_dataset"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
BUILTIN_SOURCES = ("shapes",)
CAPTION_CASES = ("missing", "empty", "whitespace", "non_utf8", "list", "not_text", "truncated")
CAPTION_TOKENS = 75  # what a 77-token CLIP context holds between its start and end tokens


# ------------------------------------------------------------------------------------------ opening


def _is_glob(source: str) -> bool:
    return any(c in source for c in "*?[")


def detect_kind(source: str) -> str:
    """imagefolder | parquet | saved | jsonl, from what ``source`` (folder, file or glob) holds."""
    if _is_glob(source):
        return _kind_of_files(source, sorted(glob.glob(source, recursive=True)))
    if os.path.isdir(source):
        if any(os.path.exists(os.path.join(source, f)) for f in ("dataset_dict.json", "state.json")):
            return "saved"
        has_parquet = False
        for root, _dirs, files in os.walk(source):
            for f in files:
                ext = os.path.splitext(f)[1].lower()
                if ext in IMAGE_EXTENSIONS or f in ("metadata.jsonl", "metadata.csv"):
                    return "imagefolder"
                has_parquet = has_parquet or ext == ".parquet"
        if has_parquet:
            return "parquet"
        raise ValueError(
            f"data.source: cannot tell what {source!r} holds (no images, metadata.jsonl / .csv, parquet files or "
            f"save_to_disk files); set data.kind to one of imagefolder, parquet, saved, jsonl"
        )
    if os.path.isfile(source):
        return _kind_of_files(source, [source])
    raise ValueError(f"data.source: no such file or folder: {source!r}")


def _kind_of_files(source: str, files: list[str]) -> str:
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise ValueError(f"data.source: the pattern {source!r} matches no file")
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if exts == {".parquet"}:
        return "parquet"
    if exts <= {".jsonl", ".json"}:
        return "jsonl"
    raise ValueError(
        f"data.source: {source!r} holds files of kind {', '.join(sorted(exts))}; expected .parquet or .jsonl / .json "
        f"files, an image folder or a save_to_disk folder (or set data.kind)"
    )


def open_dataset(cfg: DataConfig) -> datasets.Dataset | datasets.IterableDataset:
    """The split ``cfg.split`` of the local dataset at ``cfg.source``; its columns checked against ``cfg``."""
    if cfg.source in BUILTIN_SOURCES:
        raise ValueError(f"data.source: {cfg.source!r} is a builtin dataset, not a path; open_dataset reads paths")
    if not _is_glob(cfg.source) and not os.path.exists(cfg.source):
        raise ValueError(f"data.source: no such file or folder: {cfg.source!r}")
    kind = detect_kind(cfg.source) if cfg.kind == "auto" else cfg.kind
    common = dict(split=cfg.split, streaming=cfg.streaming, cache_dir=cfg.cache_dir)
    _check_text_files(cfg.source, kind)
    try:
        if kind == "imagefolder":
            if not os.path.isdir(cfg.source):
                raise ValueError(f"data.source: kind imagefolder needs a folder, got {cfg.source!r}")
            ds = datasets.load_dataset("imagefolder", data_dir=cfg.source, **common)
        elif kind == "parquet":
            if os.path.isdir(cfg.source):
                ds = datasets.load_dataset("parquet", data_dir=cfg.source, **common)
            else:
                ds = datasets.load_dataset("parquet", data_files={cfg.split: _files(cfg.source)}, **common)
        elif kind == "jsonl":
            ds = _open_jsonl(cfg, common)
        else:
            ds = _open_saved(cfg)
    except ValueError as e:
        if "Unknown split" in str(e):
            raise ValueError(f"data.split: {cfg.split!r} not found in {cfg.source!r}: {e}") from e
        if str(e).startswith("data."):  # ours, already naming the setting
            raise
        raise ValueError(f"data.source: cannot read {cfg.source!r} ({type(e).__name__}: {e})") from e
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e.__context__ or e
        raise ValueError(f"data.source: cannot read {cfg.source!r} ({type(cause).__name__}: {cause})") from e
    check_columns(ds, cfg)
    if cfg.max_samples is not None:
        ds = ds.take(cfg.max_samples) if cfg.streaming else ds.select(range(min(cfg.max_samples, len(ds))))
    return ds


def _check_text_files(source: str, kind: str) -> None:
    """Refuse caption files that are not UTF-8, naming the file and line (before `datasets` reads them)."""
    if kind == "imagefolder" and os.path.isdir(source):
        files = [os.path.join(root, f) for root, _dirs, names in os.walk(source)
                 for f in names if f in ("metadata.jsonl", "metadata.csv")]  # fmt: skip
    elif kind == "jsonl":
        files = _files(source)
    else:
        return
    for path in files:
        lines = 0
        with open(path, "rb") as f:
            while block := f.read(1 << 22) + f.readline():  # whole lines: b"\n" never occurs inside a UTF-8 character
                try:
                    block.decode("utf-8")
                except UnicodeDecodeError as e:
                    line = lines + block.count(b"\n", 0, e.start) + 1
                    column = e.start - (block.rfind(b"\n", 0, e.start) + 1) + 1
                    raise ValueError(
                        f"data.source: {path} line {line}: not UTF-8 text (byte {block[e.start]:#04x} at column "
                        f"{column}); captions must be UTF-8: re-encode the file, e.g. iconv -f latin1 -t utf-8"
                    ) from None
                lines += block.count(b"\n")


def _files(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern, recursive=True)) if _is_glob(pattern) else [pattern]
    if not files:
        raise ValueError(f"data.source: the pattern {pattern!r} matches no file")
    return [os.path.abspath(f) for f in files]


def _open_jsonl(cfg: DataConfig, common: dict) -> datasets.Dataset | datasets.IterableDataset:
    files = _files(cfg.source)
    if len({os.path.dirname(f) for f in files}) > 1:
        raise ValueError(f"data.source: jsonl files of {cfg.source!r} must lie in one folder (image paths are relative to it)")
    base = os.path.dirname(files[0])
    ds = datasets.load_dataset("json", data_files={cfg.split: files}, **common)
    names = _column_names(ds)
    if cfg.image_column not in names:
        check_columns(ds, cfg)  # raises with the list of columns

    def absolute(path: Any) -> Any:  # leaves non-strings (bytes, dicts) to load_image
        return os.path.join(base, path) if isinstance(path, str) and not os.path.isabs(path) else path

    return ds.map(lambda p: {cfg.image_column: absolute(p)}, input_columns=cfg.image_column)


def _open_saved(cfg: DataConfig) -> datasets.Dataset | datasets.IterableDataset:
    if not os.path.isdir(cfg.source):
        raise ValueError(f"data.source: kind saved needs a folder written by save_to_disk, got {cfg.source!r}")
    try:
        ds = datasets.load_from_disk(cfg.source)
    except FileNotFoundError as e:
        raise ValueError(f"data.source: {cfg.source!r} is not a save_to_disk folder ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise ValueError(f"data.split: {cfg.split!r} not in {cfg.source!r}; available splits: {', '.join(ds)}")
        ds = ds[cfg.split]
    return ds.to_iterable_dataset() if cfg.streaming else ds


def _column_names(ds: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    if ds.column_names is not None:
        return list(ds.column_names)
    first = next(iter(ds.take(1)), None)  # a stream with no declared features: look at one row
    return list(first) if first is not None else []


def check_columns(ds: datasets.Dataset | datasets.IterableDataset, cfg: DataConfig) -> None:
    """Raise naming each configured column that ``ds`` lacks, and the columns it has."""
    names = _column_names(ds)
    wanted = [("image_column", cfg.image_column), ("caption_column", cfg.caption_column)]
    wanted += [("extra_columns", c) for c in cfg.extra_columns]
    missing = [f"data.{field}={col!r}" for field, col in wanted if col is not None and col not in names]
    if missing:
        raise ValueError(
            f"{'; '.join(missing)}: no such column in {cfg.source!r}; available columns: {', '.join(names) or '(none)'}"
        )


# --------------------------------------------------------------------------------------------- rows


class ImageCaptionDataset(Dataset):
    """Training rows from a `datasets` dataset; an IterableDataset input gives a StreamingImageCaptionDataset."""

    def __new__(cls, hf_dataset: Any, cfg: DataConfig, train: bool = True, **kwargs: Any):
        if cls is ImageCaptionDataset and isinstance(hf_dataset, datasets.IterableDataset):
            cls = StreamingImageCaptionDataset
        return super().__new__(cls)

    def __init__(self, hf_dataset: datasets.Dataset | datasets.IterableDataset, cfg: DataConfig, train: bool = True):
        if not isinstance(hf_dataset, (datasets.Dataset, datasets.IterableDataset)):
            raise TypeError(
                f"ImageCaptionDataset: expected a datasets.Dataset or IterableDataset (one split), "
                f"got {type(hf_dataset).__name__}"
            )
        check_columns(hf_dataset, cfg)
        self.cfg, self.train, self.epoch = cfg, train, 0
        features = hf_dataset.features or {}
        caption = features.get(cfg.caption_column) if cfg.caption_column else None
        self.caption_names = caption.names if isinstance(caption, datasets.ClassLabel) else None
        columns = [c for c in (cfg.image_column, cfg.caption_column, *cfg.extra_columns) if c is not None]
        hf_dataset = hf_dataset.select_columns(columns)
        for c in (cfg.image_column, *cfg.image_columns):
            if isinstance(features.get(c), datasets.Image):  # decode here: EXIF, modes, bad files
                hf_dataset = hf_dataset.cast_column(c, datasets.Image(decode=False))
        self.hf = hf_dataset
        self.bad: dict[str, str] = {}  # path -> reason, each logged once
        self.caption_issues: dict[str, set] = {case: set() for case in CAPTION_CASES}  # case -> row keys
        self.buckets: list[tuple[int, int]] | None = None
        if cfg.buckets:
            given = cfg.bucket_sizes
            self.buckets = ([tuple(b) for b in given] if given else
                            make_buckets(cfg.size, cfg.bucket_multiple, cfg.max_aspect or DEFAULT_BUCKET_ASPECT))
        self._bucket_ids: list[int | None] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.hf)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedRow:
        return self.make_row(self.hf[index], index)

    # ------------------------------------------------------------------------------------- sizes, batches

    @property
    def bucket_ids(self) -> list[int | None]:
        """Bucket index of each row (None: unreadable or refused), from the image headers, computed once."""
        if self._bucket_ids is None:
            buckets = self.buckets or [self.cfg.size]
            ids: list[int | None] = []
            for index, row in enumerate(self.hf.select_columns([self.cfg.image_column])):
                obj = row[self.cfg.image_column]
                name = self._name(obj, index)
                try:
                    size = peek_size(obj, name)
                    check_aspect(size, self.cfg.max_aspect, name)
                except BadImage as e:
                    self._record_bad(e)
                    ids.append(None)
                    continue
                ids.append(closest_bucket(size, buckets))
            self._bucket_ids = ids
        return self._bucket_ids

    def batch_sampler(self, batch_size: int, *, num_replicas: int = 1, rank: int = 0,
                      shuffle: bool | None = None) -> BucketBatchSampler:
        """A BucketBatchSampler over this dataset (one bucket without cfg.buckets; then no header scan)."""
        ids = self.bucket_ids if self.cfg.buckets else [0] * len(self)
        return BucketBatchSampler(
            ids, batch_size, shuffle=self.train if shuffle is None else shuffle, seed=self.cfg.seed,
            incomplete=self.cfg.incomplete_batch, num_replicas=num_replicas, rank=rank,
        )

    def target_size(self, index: int | None, size_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of row ``index``: its bucket's (from the scan where done, else from ``size_hw``) or cfg.size."""
        if self.buckets is None:
            return self.cfg.size
        b = self._bucket_ids[index] if self._bucket_ids is not None and isinstance(index, int) else None
        return tuple(self.buckets[b if b is not None else closest_bucket(size_hw, self.buckets)])

    # -------------------------------------------------------------------------------------------- a row

    def make_row(self, row: dict[str, Any], key: Any) -> dict[str, Any] | SkippedRow:
        """The training dict of one source row (``key``: its index, or a stream position)."""
        cfg = self.cfg
        obj = row[cfg.image_column]
        name = self._name(obj, key)
        try:
            im = load_image(obj, cfg.background_rgb, name)
            check_aspect((im.height, im.width), cfg.max_aspect, name)
        except BadImage as e:
            self._record_bad(e)
            return SkippedRow(e.path, e.reason)
        rng = keyed_rng(cfg.seed, self.epoch, key)
        before = rng.getstate()  # aligned image columns replay the image's crop and flip draws
        target = self.target_size(key, (im.height, im.width))
        crop, flip = self.train and cfg.crop == "random", cfg.random_flip if self.train else 0.0
        t = transform_image(im, target, random_crop=crop, flip_prob=flip, rng=rng)
        out = {
            "pixel_values": t.pixel_values, "text": self._caption(row, rng, key), "original_size": t.original_size,
            "crop_coords": t.crop_coords, "target_size": t.target_size, "flipped": t.flipped,
        }
        for c in cfg.extra_columns:
            out[c] = row[c]
        for c in cfg.image_columns:  # a control map, a mask, a low-resolution image: the same pixels' positions
            obj = row[c]
            if obj is None:
                raise ValueError(f"data.image_columns: row {key} has no image in column {c!r}")
            try:
                extra = load_image(obj, cfg.background_rgb, f"{self._name(obj, key)} [column {c!r}]")
            except BadImage as e:
                self._record_bad(e)
                return SkippedRow(e.path, e.reason)
            if extra.size != im.size:
                raise ValueError(f"data.image_columns: column {c!r} of row {key} is {extra.width}x{extra.height}, its "
                                 f"image is {im.width}x{im.height}; aligned images must have the image's size")  # fmt: skip
            replay = random.Random()
            replay.setstate(before)
            out[c] = transform_image(extra, target, random_crop=crop, flip_prob=flip, rng=replay).pixel_values
        return out

    def _caption(self, row: dict[str, Any], rng: Any, key: Any = None) -> str:
        """The caption of a row, by the policy of the module docstring (``key``: the row, for the counts)."""
        if self.cfg.caption_column is None:
            return ""
        value = row[self.cfg.caption_column]
        if self.caption_names is not None and value is not None:  # a ClassLabel: its name
            return self.caption_names[int(value)]
        if isinstance(value, (list, tuple)):  # several captions: one at random when training, else the first
            self._caption_issue("list", key)
            value = [v for v in value if v is not None]
            value = (rng.choice(value) if self.train else value[0]) if value else None
        if value is None:
            self._caption_issue("missing", key)
            return ""
        if isinstance(value, (bytes, bytearray, memoryview)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                value = bytes(value).decode("utf-8", errors="replace")
                self._caption_issue("non_utf8", key, value)
        if not isinstance(value, str):
            self._caption_issue("not_text", key, repr(value))
            value = str(value)
        if not value:
            self._caption_issue("empty", key)
        elif value.isspace():
            self._caption_issue("whitespace", key)
            value = ""
        elif len(value.encode("utf-8")) > CAPTION_TOKENS:  # fewer bytes than that: fewer tokens (a token >= 1 byte)
            from text_encoder.tokenizer import decode, encode

            ids = encode(value)
            if len(ids) > CAPTION_TOKENS:
                dropped = decode(ids[CAPTION_TOKENS:]).strip()
                self._caption_issue("truncated", key, f"{len(ids)} tokens; dropped: {dropped!r}")
        return value

    def _caption_issue(self, case: str, key: Any, detail: str = "") -> None:
        seen = self.caption_issues[case]
        if key in seen:
            return
        seen.add(key)
        if len(seen) == 1:
            logger.warning("caption %s in %s[row %s]%s (the policy is in training/datasets_io.py; further rows with "
                           "this case are counted in caption_counts, not logged)", case, self.cfg.source, key,
                           f": {detail}" if detail else "")  # fmt: skip

    @property
    def caption_counts(self) -> dict[str, int]:
        """Rows per caption case (see the module docstring) met so far in this process."""
        return {case: len(keys) for case, keys in self.caption_issues.items() if keys}

    def _name(self, obj: Any, key: Any) -> str:
        """The path of a row's image file where it has one, else 'source[row key]' (plus its stored name)."""
        if isinstance(obj, (str, os.PathLike)):
            return os.fspath(obj)
        suffix = ""
        if isinstance(obj, dict) and obj.get("path"):
            if obj.get("bytes") is None:  # a file on disk (imagefolder)
                return str(obj["path"])
            suffix = f" ({obj['path']})"  # the name stored beside embedded bytes (parquet, saved)
        return f"{self.cfg.source}[row {key}]{suffix}"

    def _record_bad(self, e: BadImage) -> None:
        if e.path not in self.bad:
            self.bad[e.path] = e.reason
            logger.warning("skipping bad image %s: %s (%d bad so far)", e.path, e.reason, len(self.bad))

    @property
    def num_bad(self) -> int:
        return len(self.bad)


class StreamingImageCaptionDataset(IterableDataset, ImageCaptionDataset):
    """The rows of a streamed dataset, shuffled through a buffer when training and split across ranks.

    Row keys (for the random crop / flip) are 'rank.worker.position' within this epoch's stream.
    """

    def __init__(self, hf_dataset: datasets.IterableDataset, cfg: DataConfig, train: bool = True, *,
                 num_replicas: int = 1, rank: int = 0):
        ImageCaptionDataset.__init__(self, hf_dataset, cfg, train)
        if train and cfg.shuffle_buffer > 0:
            self.hf = self.hf.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
        if num_replicas > 1:
            from datasets.distributed import split_dataset_by_node

            self.hf = split_dataset_by_node(self.hf, rank=rank, world_size=num_replicas)
        self.rank = rank

    def __len__(self) -> int:
        raise TypeError("a streamed dataset has no length")

    def __getitem__(self, index: int):
        raise TypeError("a streamed dataset is read by iterating over it, not by index")

    def batch_sampler(self, *args: Any, **kwargs: Any):
        raise TypeError("a streamed dataset takes no batch sampler; use DataLoader(dataset, batch_size=...)")

    def __iter__(self):
        self.hf.set_epoch(self.epoch)
        worker = torch.utils.data.get_worker_info()
        wid = worker.id if worker is not None else 0
        for position, row in enumerate(self.hf):
            yield self.make_row(row, f"{self.rank}.{wid}.{position}")
