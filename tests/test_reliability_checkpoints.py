"""Reliability of weights and checkpoints on disk (issue 9, rows 1, 2, 6 and 10; docs/reliability.md lists every row).

- A ``.ckpt`` whose pickle carries a code payload is refused through every public loading path (load_bundle,
  Pipeline.load, ``ldm convert``, ``ldm train`` with model.source), in the old pickle format and torch's zip format;
  the payload never runs. Each payload is first proved live: unpickled without protection it creates its sentinel.
- A truncated safetensors file, cut anywhere, is an error naming the file, and the module it was meant for is
  unchanged.
- Disk full (ENOSPC) in the middle of a checkpoint: an OSError with errno ENOSPC whose message names the
  checkpoint; no older checkpoint is removed, ``latest`` stays, and a rerun resumes from the last complete one.
- A training run writes no pickle anywhere: every file of its checkpoints and bundles is safetensors, JSON or YAML
  (``yaml.safe_load``), and the stored config is YAML text that rebuilds the same TrainConfig.
"""
from __future__ import annotations

import errno
import json
import pickle

import pytest
import safetensors.torch
import torch
import yaml
from torch import nn

import training.train as train_mod
from inference.pipeline import Pipeline
from ldm.bundle import Bundle, load_bundle, save_bundle
from ldm.checkpoint import CheckpointError, load_into, read_state_dict, write_safetensors
from ldm.cli import main as ldm_main
from ldm.config import to_yaml
from tests.test_train_resume import _save, _small
from tests.test_train_smoke import tiny_config
from training.checkpointing import find_latest, list_checkpoints, read_train_state
from training.config import load_train_config
from training.train import train

# ------------------------------------------------------------------------------------ 1. pickles with code


class Payload:
    """Unpickling this object runs code that creates ``sentinel``: the classic malicious checkpoint."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (exec, (f"open({self.sentinel!r}, 'w').close()",))


def evil_checkpoint(tmp_path, fmt: str):
    """(path, sentinel) of a .ckpt whose unpickling would create the sentinel; proved live before it is returned."""
    sentinel = tmp_path / f"PWNED-{fmt}"
    path = tmp_path / f"evil-{fmt}.ckpt"
    obj = Payload(sentinel)
    if fmt != "bare":
        obj = {"state_dict": {"model.diffusion_model.out.2.weight": obj}}
    if fmt == "zip":  # torch.save's format since torch 1.6: a zip holding data.pkl
        torch.save(obj, path)
        torch.load(path, weights_only=False)  # what an unprotected loader does
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
        pickle.loads(path.read_bytes())
    assert sentinel.exists(), "the payload is not live: the test would prove nothing"
    sentinel.unlink()
    return path, sentinel


def _via_load_bundle(path, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="refused to load") as e:
        load_bundle(path)
    return str(e.value)


def _via_pipeline(path, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="refused to load") as e:
        Pipeline.load(path)
    return str(e.value)


def _via_convert(path, tmp_path, capsys):
    out = tmp_path / "converted"
    assert ldm_main(["convert", str(path), str(out), "--to", "ldm", "-q"]) == 2
    assert not out.exists()
    return capsys.readouterr().err


def _via_train(path, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", f"model.source={path}", "model.overrides=[]")
    config = tmp_path / "train.yaml"
    config.write_text(to_yaml(cfg))
    assert train_mod.main([str(config)]) == 2  # `ldm train` / `python -m training.train`: one line, exit 2
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "model").exists()
    return capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["pickle", "zip", "bare"])
@pytest.mark.parametrize("path_", [_via_load_bundle, _via_pipeline, _via_convert, _via_train],
                         ids=["load_bundle", "Pipeline.load", "ldm-convert", "ldm-train"])  # fmt: skip
def test_pickle_with_a_code_payload_is_refused_and_never_runs(tmp_path, capsys, fmt, path_):
    path, sentinel = evil_checkpoint(tmp_path, fmt)
    message = path_(path, tmp_path, capsys)
    assert str(path) in message and "refused to load" in message
    assert not sentinel.exists()


# ------------------------------------------------------------------------------------ 2. truncated files


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def test_truncated_safetensors_names_the_file_and_leaves_the_model_unchanged(tmp_path):
    source = small()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    good = tmp_path / "good.safetensors"
    write_safetensors(source.state_dict(), good)
    data = good.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    target = small()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    cuts = sorted({0, 1, 7, 8, header_end // 2, header_end - 1, header_end, header_end + 1,
                   (header_end + len(data)) // 2, len(data) - 1})  # fmt: skip
    for cut in cuts:
        bad = tmp_path / f"cut-{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            load_into(target, read_state_dict(bad))
        assert str(bad) in str(e.value), cut
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items()), cut
    load_into(target, read_state_dict(good))  # the whole file does load: the cuts were the only problem
    assert torch.equal(target[0].weight, source[0].weight)


def test_truncated_weights_of_a_model_folder_name_the_file(tmp_path):
    save_bundle(Bundle(tiny_config(tmp_path / "run").model.model_config()), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    for load in (load_bundle, Pipeline.load):
        with pytest.raises(CheckpointError, match="truncated") as e:
            load(tmp_path / "m")
        assert str(weights) in str(e.value)


# ------------------------------------------------------------------------------------ 6. disk full


def disk_full_at(monkeypatch, where: str, what: str):
    """safetensors' save_file writes a partial file and fails with ENOSPC when its path contains both strings."""
    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if where in str(filename) and what in str(filename):
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_disk_full_in_the_middle_of_a_checkpoint_is_a_clear_error_and_removes_nothing(tmp_path, monkeypatch):
    model, opt = _small()
    for step in (1, 2):
        _save(tmp_path, step, model, opt, keep_last=2)
    files_before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    disk_full_at(monkeypatch, ".tmp-step-00000003", "optimizer")
    with pytest.raises(OSError) as e:
        _save(tmp_path, 3, model, opt, keep_last=2)  # with keep_last=2 a success would have deleted step 1
    assert e.value.errno == errno.ENOSPC
    assert "could not write checkpoint" in str(e.value) and "step-00000003" in str(e.value)
    assert "No space left on device" in str(e.value) and "unchanged" in str(e.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == files_before  # nothing removed, no debris
    assert find_latest(tmp_path) == tmp_path / "step-00000002"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    for step in (1, 2):
        assert read_train_state(tmp_path / f"step-0000000{step}").step == step
        assert read_state_dict(tmp_path / f"step-0000000{step}" / "optimizer.safetensors")


def test_disk_full_while_moving_latest_keeps_the_older_checkpoints(tmp_path, monkeypatch):
    import training.checkpointing as ckpt_mod

    model, opt = _small()
    for step in (1, 2):
        _save(tmp_path, step, model, opt, keep_last=1)
    real = ckpt_mod.atomic_write

    def atomic_write(path, write):
        if path.name == "latest":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write)

    monkeypatch.setattr(ckpt_mod, "atomic_write", atomic_write)
    with pytest.raises(OSError, match="step-00000003 is complete, but .*latest could not be updated") as e:
        _save(tmp_path, 3, model, opt, keep_last=1)
    assert e.value.errno == errno.ENOSPC
    assert (tmp_path / "latest").read_text().strip() == "step-00000002"  # not pruned: latest still names it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]


def test_training_stops_on_a_full_disk_and_a_rerun_resumes(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "checkpoint_every=1", "keep_last=1", "max_steps=3")
    disk_full_at(monkeypatch, ".tmp-step-00000003", "model.safetensors")
    with pytest.raises(OSError, match="could not write checkpoint .*step-00000003") as e:
        train(cfg)
    assert e.value.errno == errno.ENOSPC
    root = tmp_path / "checkpoints"
    assert find_latest(root) == root / "step-00000002" and [p.name for p in list_checkpoints(root)] == ["step-00000002"]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert not (tmp_path / "model").exists()  # the run did not pretend to finish
    monkeypatch.undo()  # space freed
    result = train(cfg)
    assert result["state"].step == 3 and list(result["losses"]) == [3]  # only step 3 ran: resumed from step 2
    assert [p.name for p in list_checkpoints(root)] == ["step-00000003"]


# ------------------------------------------------------------------------------------ 10. no pickles


def test_a_run_writes_no_pickle_only_safetensors_json_and_yaml(tmp_path):
    cfg = tiny_config(tmp_path, "max_steps=2", "checkpoint_every=1", "ema.decay=0.9", "grad_accum=2")
    train(cfg)
    checked = 0
    for folder in ("checkpoints", "model", "model-ema"):
        for path in sorted((tmp_path / folder).rglob("*")):
            if path.is_dir():
                continue
            data = path.read_bytes()
            assert not data.startswith((b"\x80", b"PK\x03\x04")), f"{path}: a pickle / torch.save zip"
            if path.suffix == ".safetensors":
                assert read_state_dict(path) is not None  # our reader refuses anything but safetensors here
                safetensors.torch.load(data)
            elif path.suffix == ".json":
                json.loads(data.decode("utf-8"))
            elif path.suffix == ".yaml":
                text = data.decode("utf-8")
                assert "!!python" not in text and isinstance(yaml.safe_load(text), dict)
            else:
                assert path.name == "latest" and data.decode("utf-8").strip() == "step-00000002", path
            checked += 1
    assert checked >= 2 * 9 + 4  # per step: state, config, model, optimizer x2, ema x2, rng x2; bundles: 2 x 2
    stored = (tmp_path / "checkpoints" / "step-00000002" / "config.yaml").read_text()
    assert to_yaml(load_train_config(yaml.safe_load(stored))) == to_yaml(cfg)  # the config, as YAML text
    ema = read_state_dict(tmp_path / "checkpoints" / "step-00000002" / "ema.safetensors")
    assert int(ema["num_updates"]) == 2  # the EMA counter is a tensor in safetensors, not a pickled int
