"""Safe reading, atomic writing and strict loading of weights."""
import os
import pickle

import pytest
import torch
from torch import nn

from ldm.checkpoint import CheckpointError, load_into, read_metadata, read_state_dict, write_safetensors


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


class Payload:
    """Unpickling this object would run os.system: the classic malicious checkpoint."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_pickle_with_code_payload_is_refused_and_never_runs(tmp_path):
    sentinel = tmp_path / "PWNED"
    ckpt = tmp_path / "evil.ckpt"
    with open(ckpt, "wb") as f:
        pickle.dump({"state_dict": {"w": Payload(sentinel)}}, f)
    with pytest.raises(CheckpointError, match="evil.ckpt: refused to load.*convert the file to safetensors"):
        read_state_dict(ckpt)
    assert not sentinel.exists()


def test_plain_tensor_ckpt_loads_and_unwraps_state_dict(tmp_path):
    ckpt = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "global_step": 3}, ckpt)
    sd = read_state_dict(ckpt)
    assert list(sd) == ["a"] and torch.equal(sd["a"], torch.ones(2))


def test_safetensors_round_trip_with_metadata(tmp_path):
    m = small()
    path = tmp_path / "m.safetensors"
    write_safetensors(m.state_dict(), path, {"format": "ldm"})
    sd = read_state_dict(path)
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    assert read_metadata(path) == {"format": "ldm"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("cut", [0, 5, 40, -3])
def test_truncated_or_garbage_safetensors_names_the_file(tmp_path, cut):
    good = tmp_path / "good.safetensors"
    write_safetensors(small().state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_state_dict(bad)


def test_text_file_named_safetensors(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("this is not a tensor file, just some words that go on for a while\n" * 3)
    with pytest.raises(CheckpointError, match="notes.safetensors: not a valid safetensors"):
        read_state_dict(bad)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown weight format '.onnx'"):
        read_state_dict(tmp_path / "w.onnx")


def test_strict_load_lists_missing_unexpected_and_misshaped_and_leaves_module_unchanged():
    m = small()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sd = {k: torch.randn_like(v) for k, v in m.state_dict().items()}
    del sd["1.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(5, 4)
    with pytest.raises(CheckpointError) as e:
        load_into(m, sd, source="model.safetensors")
    msg = str(e.value)
    assert "model.safetensors" in msg and "1 missing key(s): 1.bias" in msg
    assert "1 unexpected key(s): extra.weight" in msg and "0.weight (expected (3, 4), found (5, 4))" in msg
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_non_strict_load_reports_what_it_skipped():
    m = small()
    sd = {k: torch.full_like(v, 2.0) for k, v in m.state_dict().items()}
    sd["0.weight"] = torch.zeros(5, 4)
    rep = load_into(m, sd, strict=False)
    assert [k for k, _, _ in rep.mismatched] == ["0.weight"] and not rep.ok
    assert torch.equal(m[0].bias, torch.full((3,), 2.0)) and not torch.equal(m[0].weight, torch.zeros(3, 4))


def test_meta_module_gets_weights_in_requested_dtype():
    with torch.device("meta"):
        m = small()
    src = small().state_dict()
    load_into(m, src, dtype=torch.bfloat16, device="cpu")
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in m.parameters())
    assert torch.equal(m[0].weight, src["0.weight"].bfloat16())


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    write_safetensors({"a": torch.ones(3)}, path)
    import safetensors.torch as st

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="No space left"):
        write_safetensors({"a": torch.zeros(3)}, path)
    assert torch.equal(read_state_dict(path)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_written_files_get_the_usual_permissions(tmp_path):
    path = tmp_path / "p.safetensors"
    write_safetensors({"a": torch.ones(1)}, path)
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)
