"""A CIFAR-10 split of the shared parquet (shared/data/README.md: ``image`` = {bytes: JPEG, path}, ``label``,
``text``) as in-memory tensors: ``load_cifar_split(folder, "test") -> (uint8 (N, 3, 32, 32), int64 (N,), names)``.

Reads the parquet with pyarrow and decodes the JPEGs with PIL in a thread pool (PIL releases the GIL while it
decodes): 60,000 images in a few seconds. The class names come from the file's ``ClassLabel`` feature when stored.
"""
from __future__ import annotations

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .cifar_net import CIFAR10_CLASSES


def split_file(folder: str | os.PathLike, split: str) -> Path:
    """FOLDER/SPLIT.parquet, or ValueError naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder (expected the CIFAR-10 folder with train.parquet, test.parquet)")
    path = folder / f"{split}.parquet"
    if not path.is_file():
        raise ValueError(f"{folder}: holds no {split}.parquet (see shared/data/README.md)")
    return path


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def load_cifar_split(folder: str | os.PathLike, split: str, limit: int | None = None
                     ) -> tuple[Tensor, Tensor, tuple[str, ...]]:  # fmt: skip
    """(images uint8 (N, 3, H, W), labels int64 (N,), class names) of FOLDER/SPLIT.parquet, its first ``limit`` rows."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    path = split_file(folder, split)
    table = pq.read_table(path, columns=None)
    missing = {"image", "label"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: no column {', '.join(sorted(missing))} (columns: {', '.join(table.column_names)})")
    if limit is not None:
        table = table.slice(0, limit)
    names = CIFAR10_CLASSES
    meta = (table.schema.metadata or {}).get(b"huggingface")
    if meta:
        label = json.loads(meta).get("info", {}).get("features", {}).get("label", {})
        names = tuple(label.get("names", names))
    column = table.column("image").combine_chunks()
    blobs = column.field("bytes").to_pylist() if hasattr(column, "field") else column.to_pylist()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(_decode, blobs, chunksize=256))
    sizes = {a.shape for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"{path}: images of several sizes {sorted(sizes)[:3]}; expected one size")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
    labels = torch.tensor(table.column("label").to_numpy(), dtype=torch.int64)
    return images, labels, names
