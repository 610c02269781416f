"""training/datasets_io.py, data_config.py and collate.py: from a local dataset on disk to a batch of tensors.

Every dataset is built here in tmp_path with PIL; expected pixels come from PIL operations on the source
images, expected captions and columns from what was written. One optional test reads a few rows of the
shared real data when it is present.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from training.collate import SkippedRow, collate_rows
from training.data_config import DataConfig
from training.datasets_io import ImageCaptionDataset, StreamingImageCaptionDataset, detect_kind, open_dataset

SHARED = "/work/shared/data"
SIZES = [(16, 16), (24, 16), (16, 32), (20, 20)]  # (w, h) of the written images


def pattern(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def expected_center(im: Image.Image, side: int) -> torch.Tensor:
    """PIL reference: shorter side to ``side`` (LANCZOS), centre crop (torchvision rounding), to [-1, 1]."""
    w, h = im.size
    s = side / min(w, h)
    rw, rh = max(side, round(w * s)), max(side, round(h * s))
    if (rw, rh) != (w, h):
        im = im.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = int(round((rw - side) / 2.0)), int(round((rh - side) / 2.0))
    arr = np.asarray(im.crop((left, top, left + side, top + side)), dtype=np.float64)
    return torch.tensor(arr).permute(2, 0, 1) / 127.5 - 1


def make_imagefolder(root, metadata: str = "jsonl", extra_files: dict[str, bytes] | None = None):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (w, h) in enumerate(SIZES):
        pattern(w, h, i).save(root / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"caption {i}", "score": i * 10})
    for name, data in (extra_files or {}).items():
        (root / name).write_bytes(data)
        rows.append({"file_name": name, "text": f"bad {name}", "score": -1})
    if metadata == "jsonl":
        with open(root / "metadata.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text", "score"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def hf_table(n: int = 4) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["cat", "dog"])})
    return datasets.Dataset.from_dict(
        {"image": [pattern(*SIZES[i % 4], i) for i in range(n)], "text": [f"row {i}" for i in range(n)],
         "label": [i % 2 for i in range(n)]}, features=features)


def cfg_for(tmp_path, source, **kw) -> DataConfig:
    kw.setdefault("resolution", 16)
    kw.setdefault("num_workers", 0)
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "hf_cache"), **kw)


# ------------------------------------------------------------------------------------------ sources


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_imagefolder_with_metadata(tmp_path, metadata):
    root = make_imagefolder(tmp_path / "folder", metadata)
    cfg = cfg_for(tmp_path, root, extra_columns=["score"], crop="center")
    assert detect_kind(str(root)) == "imagefolder"
    data = ImageCaptionDataset(open_dataset(cfg), cfg, train=False)
    assert len(data) == 4
    rows = {r["text"]: r for r in (data[i] for i in range(4))}
    assert set(rows) == {f"caption {i}" for i in range(4)}
    for i, (w, h) in enumerate(SIZES):
        r = rows[f"caption {i}"]
        assert r["score"] == i * 10 and r["original_size"] == (h, w) and r["target_size"] == (16, 16)
        torch.testing.assert_close(r["pixel_values"].double(), expected_center(pattern(w, h, i), 16), atol=1e-6, rtol=0)


def test_parquet_file_glob_and_folder(tmp_path):
    (tmp_path / "pq").mkdir()
    hf_table(4).to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    hf_table(2).to_parquet(str(tmp_path / "pq" / "part-1.parquet"))
    for source, n in [(tmp_path / "pq" / "part-0.parquet", 4), (tmp_path / "pq" / "part-*.parquet", 6)]:
        cfg = cfg_for(tmp_path, source)
        assert detect_kind(cfg.source) == "parquet"
        ds = open_dataset(cfg)
        assert len(ds) == n
        row = ImageCaptionDataset(ds, cfg, train=False)[0]
        assert row["text"] == "row 0"
        torch.testing.assert_close(row["pixel_values"].double(), expected_center(pattern(16, 16, 0), 16), atol=1e-6, rtol=0)
    assert detect_kind(str(tmp_path / "pq")) == "parquet"
    assert len(open_dataset(cfg_for(tmp_path, tmp_path / "pq"))) == 6


def test_save_to_disk_dataset_and_dict(tmp_path):
    hf_table(3).save_to_disk(str(tmp_path / "saved"))
    cfg = cfg_for(tmp_path, tmp_path / "saved", caption_column="label")
    assert detect_kind(cfg.source) == "saved"
    data = ImageCaptionDataset(open_dataset(cfg), cfg, train=False)
    assert [data[i]["text"] for i in range(3)] == ["cat", "dog", "cat"]  # a ClassLabel caption gives its name

    datasets.DatasetDict({"train": hf_table(2), "validation": hf_table(1)}).save_to_disk(str(tmp_path / "dd"))
    assert len(open_dataset(cfg_for(tmp_path, tmp_path / "dd", split="validation"))) == 1
    with pytest.raises(ValueError, match=r"data.split: 'test'.*available splits: train, validation"):
        open_dataset(cfg_for(tmp_path, tmp_path / "dd", split="test"))


def test_jsonl_with_relative_image_paths(tmp_path):
    (tmp_path / "j" / "pics").mkdir(parents=True)
    pattern(20, 20, 0).save(tmp_path / "j" / "pics" / "a.png")
    (tmp_path / "j" / "list.jsonl").write_text(json.dumps({"path": "pics/a.png", "caption": "an a"}) + "\n")
    cfg = cfg_for(tmp_path, tmp_path / "j" / "list.jsonl", image_column="path", caption_column="caption")
    assert detect_kind(cfg.source) == "jsonl"
    row = ImageCaptionDataset(open_dataset(cfg), cfg, train=False)[0]
    assert row["text"] == "an a"
    torch.testing.assert_close(row["pixel_values"].double(), expected_center(pattern(20, 20, 0), 16), atol=1e-6, rtol=0)


def test_streaming_gives_an_iterable_dataset(tmp_path):
    root = make_imagefolder(tmp_path / "folder")
    cfg = cfg_for(tmp_path, root, streaming=True, shuffle_buffer=0, max_samples=3)
    ds = open_dataset(cfg)
    assert isinstance(ds, datasets.IterableDataset)
    data = ImageCaptionDataset(ds, cfg)
    assert isinstance(data, StreamingImageCaptionDataset) and isinstance(data, torch.utils.data.IterableDataset)
    batches = list(DataLoader(data, batch_size=2, collate_fn=collate_rows))
    assert [b["pixel_values"].shape for b in batches] == [(2, 3, 16, 16), (1, 3, 16, 16)]
    assert sorted(t for b in batches for t in b["text"]) == sorted(f"caption {i}" for i in range(3))
    hf_table(2).save_to_disk(str(tmp_path / "saved"))
    assert isinstance(open_dataset(cfg_for(tmp_path, tmp_path / "saved", streaming=True)), datasets.IterableDataset)


def test_missing_columns_name_the_available_ones(tmp_path):
    root = make_imagefolder(tmp_path / "folder")
    with pytest.raises(ValueError, match=r"data.caption_column='caption'.*available columns: image, text, score"):
        open_dataset(cfg_for(tmp_path, root, caption_column="caption"))
    hf_table(1).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(ValueError, match=r"data.image_column='img'.*data.extra_columns='size'.*image, text, label"):
        open_dataset(cfg_for(tmp_path, tmp_path / "t.parquet", image_column="img", extra_columns=["size"]))
    with pytest.raises(ValueError, match="no such file or folder"):
        open_dataset(cfg_for(tmp_path, tmp_path / "nowhere"))


# -------------------------------------------------------------------------------------- bad images


def test_bad_files_are_skipped_counted_and_logged_once(tmp_path, caplog):
    good = io.BytesIO()
    pattern(32, 32, 9).save(good, "PNG")
    bad = {"zero.png": b"", "text.png": b"a caption, not pixels\n", "truncated.png": good.getvalue()[:200],
           "corrupt.png": bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8))}
    root = make_imagefolder(tmp_path / "folder", extra_files=bad)
    cfg = cfg_for(tmp_path, root)
    data = ImageCaptionDataset(open_dataset(cfg), cfg)
    caplog.set_level(logging.WARNING, logger="training.datasets_io")
    loader = DataLoader(data, batch_size=8, collate_fn=collate_rows)
    for _ in range(2):  # two passes: each bad path is logged once
        (batch,) = list(loader)
        assert batch["pixel_values"].shape == (4, 3, 16, 16)
        assert sorted(s.split(": ")[0] for s in batch["skipped"]) == sorted(str(root / n) for n in bad)
    assert data.num_bad == 4 and set(data.bad) == {str(root / n) for n in bad}
    logged = [r.getMessage() for r in caplog.records if "skipping bad image" in r.getMessage()]
    assert len(logged) == 4 and all(any(str(root / n) in m for m in logged) for n in bad)


def test_extreme_aspect_policy_in_the_dataset(tmp_path):
    (tmp_path / "f").mkdir()
    Image.new("RGB", (1, 1), (255, 0, 0)).save(tmp_path / "f" / "dot.png")
    Image.new("RGB", (1000, 1), (0, 0, 255)).save(tmp_path / "f" / "strip.png")
    cfg = cfg_for(tmp_path, tmp_path / "f", caption_column=None)
    data = ImageCaptionDataset(open_dataset(cfg), cfg)
    rows = {os.path.basename(r.path) if isinstance(r, SkippedRow) else "dot": r for r in (data[0], data[1])}
    assert isinstance(rows["strip.png"], SkippedRow) and "max_aspect=4" in rows["strip.png"].reason
    torch.testing.assert_close(rows["dot"]["pixel_values"][0], torch.ones(16, 16))  # a flat red square
    assert rows["dot"]["text"] == ""


# ----------------------------------------------------------------------------------- randomness, buckets


def test_random_crop_and_flip_reproducible_from_seed_epoch_index(tmp_path):
    root = make_imagefolder(tmp_path / "folder")
    cfg = cfg_for(tmp_path, root, crop="random", random_flip=0.5, seed=3)
    ds = open_dataset(cfg)
    a, b = ImageCaptionDataset(ds, cfg), ImageCaptionDataset(ds, cfg)
    key = lambda r: (r["crop_coords"], r["flipped"], r["pixel_values"].sum().item())  # noqa: E731
    epoch0 = [key(a[i]) for i in range(4)]
    assert epoch0 == [key(b[i]) for i in range(4)]
    a.set_epoch(1)
    assert [key(a[i]) for i in range(4)] != epoch0
    loader = DataLoader(b, batch_size=4, collate_fn=collate_rows, num_workers=2)  # the same in worker processes
    (batch,) = list(loader)
    assert [(tuple(c.tolist()), bool(f)) for c, f in zip(batch["crop_coords"], batch["flipped"])] == [k[:2] for k in epoch0]


def test_bucketed_batches_have_one_shape(tmp_path):
    (tmp_path / "f").mkdir()
    sizes = [(40, 20), (42, 20), (20, 40), (20, 44), (30, 30), (31, 30), (60, 31), (80, 40)]  # (w, h)
    for i, (w, h) in enumerate(sizes):
        pattern(w, h, i).save(tmp_path / "f" / f"{i}.png")
    cfg = cfg_for(tmp_path, tmp_path / "f", caption_column=None, buckets=True, bucket_multiple=8,
                  bucket_sizes=[[16, 32], [32, 16], [24, 24]])
    data = ImageCaptionDataset(open_dataset(cfg), cfg)
    expect = {(40, 20): 0, (42, 20): 0, (20, 40): 1, (20, 44): 1, (30, 30): 2, (31, 30): 2, (60, 31): 0, (80, 40): 0}
    by_name = {os.path.basename(data.hf[i]["image"]["path"]): data.bucket_ids[i] for i in range(len(data))}
    assert by_name == {f"{i}.png": expect[s] for i, s in enumerate(sizes)}
    seen = 0
    for batch in DataLoader(data, batch_sampler=data.batch_sampler(2), collate_fn=collate_rows):
        h, w = batch["pixel_values"].shape[-2:]
        assert (h, w) in {(16, 32), (32, 16), (24, 24)}
        assert batch["target_size"].tolist() == [[h, w]] * 2
        seen += 2
    assert seen == 8


# -------------------------------------------------------------------------------------- config, collate


@pytest.mark.parametrize("kw, field", [
    (dict(resolution=[64]), "data.resolution"), (dict(resolution=0), "data.resolution"),
    (dict(random_flip=1.5), "data.random_flip"), (dict(background="mauve-ish"), "data.background"),
    (dict(background=[0, 0, 300]), "data.background"), (dict(kind="zip"), "data.kind"),
    (dict(bucket_sizes=[[64, 100]]), "data.bucket_sizes"), (dict(buckets=True, streaming=True), "data.buckets"),
    (dict(extra_columns=["text"]), "data.extra_columns"), (dict(extra_columns=["pixel_values"]), "data.extra_columns"),
    (dict(max_aspect=0.5), "data.max_aspect"), (dict(num_workers=-1), "data.num_workers"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        DataConfig(**kw)


def test_config_normalises_values():
    cfg = DataConfig(resolution=(96, 64), background="#102030", bucket_sizes=[(64, 128)])
    assert cfg.size == (96, 64) and cfg.background_rgb == (16, 32, 48) and cfg.bucket_sizes == [[64, 128]]
    assert DataConfig(background=[1, 2, 3]).background_rgb == (1, 2, 3) and DataConfig().size == (512, 512)


def test_collate_skips_bad_rows_and_hands_extras_through():
    def row(v, extra):
        return {"pixel_values": torch.full((3, 2, 2), v), "text": f"t{v}", "original_size": (5, 6),
                "crop_coords": (1, 0), "target_size": (2, 2), "flipped": v > 0, "score": extra[0], "tag": extra[1]}
    rows = [row(0.5, (1, "a")), None, SkippedRow("x.png", "zero-byte file"), row(-0.5, (2.5, "b"))]
    batch = collate_rows(rows)
    assert batch["pixel_values"].shape == (2, 3, 2, 2) and batch["text"] == ["t0.5", "t-0.5"]
    assert batch["original_size"].tolist() == [[5, 6], [5, 6]] and batch["crop_coords"].dtype == torch.long
    assert batch["flipped"].tolist() == [True, False] and batch["skipped"] == ["x.png: zero-byte file"]
    assert batch["score"].tolist() == [1.0, 2.5] and batch["tag"] == ["a", "b"]
    assert collate_rows([None, SkippedRow("y.png", "bad")]) is None
    odd = row(0.0, (0, "c"))
    odd["pixel_values"] = torch.zeros(3, 4, 2)
    with pytest.raises(ValueError, match="different shapes"):
        collate_rows([row(0.0, (0, "c")), odd])


def test_rgba_rows_use_the_configured_background(tmp_path):
    (tmp_path / "f").mkdir()
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "f" / "clear.png")  # fully transparent red
    cfg = cfg_for(tmp_path, tmp_path / "f", caption_column=None, resolution=8, background=[0, 255, 0])
    px = ImageCaptionDataset(open_dataset(cfg), cfg)[0]["pixel_values"]
    torch.testing.assert_close(px, torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8))


# ---------------------------------------------------------------------------------- optional real data


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="shared real data not present")
def test_a_few_rows_of_the_shared_data(tmp_path):
    moji = cfg_for(tmp_path, f"{SHARED}/openmoji", streaming=True, max_samples=3, resolution=64, crop="center")
    rows = list(ImageCaptionDataset(open_dataset(moji), moji, train=False))
    assert len(rows) == 3 and all(isinstance(r["text"], str) and r["text"] for r in rows)
    for r in rows:  # 128x128 RGBA emoji: transparent corners become the white background
        assert r["original_size"] == (128, 128) and r["pixel_values"].shape == (3, 64, 64)
        torch.testing.assert_close(r["pixel_values"][:, 0, 0], torch.ones(3))
    cifar = cfg_for(tmp_path, f"{SHARED}/cifar10/test.parquet", streaming=True, max_samples=2, resolution=32,
                    extra_columns=["label"])
    rows = list(ImageCaptionDataset(open_dataset(cifar), cifar, train=False))
    assert [r["text"].startswith("a photo of a") for r in rows] == [True, True]
    assert all(r["pixel_values"].shape == (3, 32, 32) and isinstance(r["label"], int) for r in rows)
