"""Reliability of the training data (issue 9, rows 14-19; docs/reliability.md lists every row and its test).

- decompression bombs are refused from the header alone: no pixel buffer is ever allocated (a spy on PIL's
  ``load`` proves nothing was decoded), including the range where PIL itself only warns (1x - 2x its limit);
- broken EXIF / XMP never crashes; EXIF orientation 6 of a JPEG and an XMP orientation are applied;
- captions: missing, empty, whitespace-only, non-UTF-8, lists, non-text and over-long captions each follow the
  documented policy (training/datasets_io.py) and are counted and logged once; caption files that are not UTF-8 are
  refused naming file and line, before anything is read.

References are hand-built: the expected pixels come from numpy rotations of the stored pixels, the dropped text of a
long caption from a caption of one-token words counted by hand.
"""
from __future__ import annotations

import io
import json
import logging
import struct
import zlib

import datasets
import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from training.collate import SkippedRow
from training.data_config import DataConfig
from training.datasets_io import ImageCaptionDataset, open_dataset
from training.images import BadImage, load_image, peek_size

BOMB_SIDE = 9500  # 90,250,000 pixels: over PIL's MAX_IMAGE_PIXELS (89,478,485), under twice it (PIL only warns)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int, complete: bool = True) -> bytes:
    """A valid 8-bit greyscale PNG of zeros (``complete``), or its header with one tiny IDAT: a few hundred KB at most
    for what decodes to width * height bytes."""
    z = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    body = b"".join(z.compress(row) for _ in range(height)) if complete else z.compress(row)
    body += z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


@pytest.fixture
def decodes(monkeypatch):
    """A list that records every pixel decode (PIL's ImageFile.load)."""
    calls = []
    real = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


# -------------------------------------------------------------------------------------- 18. decompression bombs


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return png_bomb(BOMB_SIDE, BOMB_SIDE)


def test_decompression_bomb_is_refused_from_its_header_without_decoding(bomb, decodes, recwarn):
    assert len(bomb) < 1_000_000  # < 1 MB on disk, 90 MB of pixels: a bomb
    huge = png_bomb(100_000, 100_000, complete=False)  # 10^10 pixels: beyond PIL's own error threshold
    for data, what in ((bomb, "9500x9500 = 90,250,000 pixels exceeds PIL.Image.MAX_IMAGE_PIXELS"),
                       (huge, "10000000000 pixels")):  # fmt: skip
        for read in (load_image, peek_size):
            with pytest.raises(BadImage, match="bomb") as info:
                read({"bytes": data, "path": "bomb.png"})
            assert info.value.path == "bomb.png" and what in info.value.reason
            assert "not decoded" in str(info.value).lower()
    assert decodes == []  # no pixel buffer was allocated
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]  # an error, not a warning
    small = io.BytesIO()
    Image.new("L", (4, 3)).save(small, "PNG")
    assert load_image(small.getvalue()).size == (4, 3) and decodes and set(decodes) == {(4, 3)}  # the spy works


def test_the_pixel_limit_is_pils_setting(monkeypatch):
    png = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(png, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 399)
    with pytest.raises(BadImage, match="20x20 = 400 pixels exceeds PIL.Image.MAX_IMAGE_PIXELS = 399"):
        load_image(png.getvalue())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # lifted on purpose: decoded
    assert load_image(png.getvalue()).getpixel((0, 0)) == (1, 2, 3)


def test_a_bomb_in_a_dataset_is_skipped_counted_and_logged(tmp_path, bomb, decodes, caplog):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(bomb)
    Image.new("RGB", (8, 8), (0, 0, 255)).save(folder / "ok.png")
    cfg = DataConfig(source=str(folder), resolution=8, caption_column=None, num_workers=0, buckets=True,
                     bucket_multiple=8, bucket_sizes=[[8, 8]], cache_dir=str(tmp_path / "cache"))  # fmt: skip
    caplog.set_level(logging.WARNING, logger="training.datasets_io")
    data = ImageCaptionDataset(open_dataset(cfg), cfg)
    names = [data.hf[i]["image"]["path"].rsplit("/", 1)[-1] for i in range(2)]
    bomb_index = names.index("bomb.png")
    assert data.bucket_ids[bomb_index] is None and data.bucket_ids[1 - bomb_index] == 0  # the header scan refuses it
    row = data[bomb_index]
    assert isinstance(row, SkippedRow) and row.path == str(folder / "bomb.png") and "bomb" in row.reason
    assert data[1 - bomb_index]["pixel_values"].shape == (3, 8, 8)
    assert data.num_bad == 1 and str(folder / "bomb.png") in data.bad
    assert [r for r in caplog.records if "bomb.png" in r.getMessage()]
    assert all(size == (8, 8) for size in decodes)  # only the good image was ever decoded


# ----------------------------------------------------------------------------------------- 16. EXIF and XMP


def pattern(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


XMP_ORIENTATION_6 = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-'
                     b'ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
                     b'</rdf:RDF></x:xmpmeta>')  # fmt: skip


def test_jpeg_exif_orientation_6_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    pattern(6, 4).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    stored = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))  # (4, 6, 3) as stored
    got = load_image(buf.getvalue())
    assert got.size == (4, 6) and peek_size(buf.getvalue()) == (6, 4)  # (h, w) upright
    assert np.array_equal(np.asarray(got), np.rot90(stored, k=-1))  # turned 90 degrees clockwise


def test_xmp_orientation_is_applied():
    buf = io.BytesIO()
    pattern(6, 4).save(buf, "JPEG", xmp=XMP_ORIENTATION_6, quality=95)
    stored = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.array_equal(np.asarray(load_image(buf.getvalue())), np.rot90(stored, k=-1))


def _png_with_xmp(im: Image.Image, xmp: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp)
    buf = io.BytesIO()
    im.save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["png-xmp-garbage", "png-xmp-orientation-9", "png-xmp-orientation-text",
                                  "jpeg-xmp-garbage", "jpeg-exif-truncated", "jpeg-exif-garbage"])  # fmt: skip
def test_broken_exif_or_xmp_does_not_crash_and_keeps_the_pixels(kind):
    im = pattern(5, 3)
    buf = io.BytesIO()
    if kind == "png-xmp-garbage":
        data = _png_with_xmp(im, "\x00\x01<<<not xml at all")
    elif kind == "png-xmp-orientation-9":
        data = _png_with_xmp(im, '<x tiff:Orientation="9"/>')  # no such orientation
    elif kind == "png-xmp-orientation-text":
        data = _png_with_xmp(im, '<x tiff:Orientation="sideways"/>')
    else:
        if kind == "jpeg-xmp-garbage":
            im.save(buf, "JPEG", xmp=b"<<<\xff\xfe not xml", quality=95)
        elif kind == "jpeg-exif-truncated":  # an IFD that announces 5 entries and ends after one tag number
            im.save(buf, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12", quality=95)
        else:
            im.save(buf, "JPEG", exif=b"Exif\x00\x00 this is no TIFF header", quality=95)
        data = buf.getvalue()
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    got = load_image(data)
    assert np.array_equal(np.asarray(got), stored)  # not rotated, not failed
    assert peek_size(data) == (3, 5)


# --------------------------------------------------------------------------------------------- 19. captions


def _dataset(tmp_path, captions: list, feature, train: bool = True) -> ImageCaptionDataset:
    features = datasets.Features({"image": datasets.Image(), "text": feature})
    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(len(captions))]
    ds = datasets.Dataset.from_dict({"image": images, "text": captions}, features=features)
    cfg = DataConfig(source="memory", resolution=8, num_workers=0)
    return ImageCaptionDataset(ds, cfg, train=train)


LONG = " ".join(["cat"] * 80)  # "cat" is one CLIP token: 80 tokens, 5 beyond the 75 a 77-token context holds


def test_string_captions_policy_counts_and_one_log_line_per_case(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="training.datasets_io")
    captions = ["a red circle", None, "", " \t\n ", LONG, None, "  ", "a blue square"]
    data = _dataset(tmp_path, captions, datasets.Value("string"))
    for _ in range(2):  # a second epoch counts nothing twice
        texts = [data[i]["text"] for i in range(len(captions))]
        data.set_epoch(1)
    assert texts == ["a red circle", "", "", "", LONG, "", "", "a blue square"]
    assert data.caption_counts == {"missing": 2, "empty": 1, "whitespace": 2, "truncated": 1}
    assert data.caption_issues["missing"] == {1, 5} and data.caption_issues["truncated"] == {4}
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("caption ")]
    assert len(logged) == 4  # once per case
    (trunc,) = [m for m in logged if m.startswith("caption truncated")]
    assert "memory[row 4]" in trunc and "80 tokens; dropped: 'cat cat cat cat cat'" in trunc
    assert any(m.startswith("caption missing in memory[row 1]") for m in logged)


def test_list_captions_choose_per_epoch_when_training_and_the_first_otherwise(tmp_path):
    captions = [["a fox", "a red fox", "a fox in snow"], [], [None, "only one"], [None]]
    data = _dataset(tmp_path, captions, datasets.Sequence(datasets.Value("string")))
    chosen = set()
    for epoch in range(12):
        data.set_epoch(epoch)
        chosen.add(data[0]["text"])
        assert data[1]["text"] == "" and data[2]["text"] == "only one" and data[3]["text"] == ""
    assert chosen == {"a fox", "a red fox", "a fox in snow"}  # keyed by (seed, epoch, index): every one in turn
    again = _dataset(tmp_path, captions, datasets.Sequence(datasets.Value("string")))
    for epoch in range(12):  # the same choice in another process / run
        data.set_epoch(epoch)
        again.set_epoch(epoch)
        assert data[0]["text"] == again[0]["text"]
    assert data.caption_counts == {"list": 4, "missing": 2}
    evaluation = _dataset(tmp_path, captions, datasets.Sequence(datasets.Value("string")), train=False)
    assert [evaluation[i]["text"] for i in range(4)] == ["a fox", "", "only one", ""]


def test_bytes_and_non_text_captions(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="training.datasets_io")
    data = _dataset(tmp_path, [b"caf\xc3\xa9", b"caf\xe9 au lait", b""], datasets.Value("binary"))
    assert [data[i]["text"] for i in range(3)] == ["café", "caf\ufffd au lait", ""]
    assert data.caption_counts == {"non_utf8": 1, "empty": 1}
    assert any("caption non_utf8 in memory[row 1]" in r.getMessage() for r in caplog.records)
    numbers = _dataset(tmp_path, [3, 7], datasets.Value("int32"))
    assert [numbers[i]["text"] for i in range(2)] == ["3", "7"] and numbers.caption_counts == {"not_text": 2}


def _folder(tmp_path, lines: list[bytes]):
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(len(lines)):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_bytes(b"".join(lines))
    return DataConfig(source=str(folder), resolution=8, num_workers=0, cache_dir=str(tmp_path / "cache"))


def test_a_caption_file_that_is_not_utf8_is_refused_naming_file_and_line(tmp_path, monkeypatch):
    cfg = _folder(tmp_path, [b'{"file_name": "0.png", "text": "fine"}\n',
                             b'{"file_name": "1.png", "text": "caf\xe9 latin-1"}\n'])  # fmt: skip
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the dataset was read"))
    with pytest.raises(ValueError, match=r"metadata.jsonl line 2: not UTF-8 text \(byte 0xe9 at column 36\)"):
        open_dataset(cfg)


def test_a_jsonl_caption_column_of_strings_and_lists_is_an_error_naming_the_source(tmp_path):
    cfg = _folder(tmp_path, [json.dumps({"file_name": "0.png", "text": "one"}).encode() + b"\n",
                             json.dumps({"file_name": "1.png", "text": ["a", "b"]}).encode() + b"\n"])  # fmt: skip
    with pytest.raises(ValueError, match=r"data.source: cannot read '.*/f' \(.*text"):
        open_dataset(cfg)
