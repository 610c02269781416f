"""Checkpoints and resume (training/checkpointing.py, training/train.py).

- A run interrupted mid-epoch (third epoch, gradient accumulation, EMA, U-Net dropout drawing from the global
  RNG) and resumed from its latest checkpoint ends bit-identical to an uninterrupted run: weights, optimizer
  state, EMA shadows and counter, train state, logged losses.
- An exception in the middle of a checkpoint write leaves the previous checkpoint intact and ``latest`` on it;
  pruning to keep_last happens only once the new checkpoint is complete.
- A corrupt RNG file is a loud error naming the file, not a silent fresh seed.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import training.checkpointing as ckpt_mod
import training.train as train_mod
from ldm.checkpoint import CheckpointError, read_state_dict
from ldm.loss import DiffusionLoss
from tests.test_train_smoke import tiny_config
from training.checkpointing import (
    TrainState, find_latest, join_state, list_checkpoints, load_rng, read_optimizer_state, save_checkpoint, split_state,
)
from training.train import train


class Interrupted(Exception):
    pass


class CrashAt(DiffusionLoss):
    """Raises on the ``at``-th call (one call per micro-batch), like a preemption in the middle of a step."""

    at = 0
    calls = 0

    def compute(self, *args, **kwargs):  # one call per micro-batch
        type(self).calls += 1
        if type(self).calls == type(self).at:
            raise Interrupted(f"simulated crash in micro-batch {type(self).at}")
        return super().compute(*args, **kwargs)


def resume_config(out):
    # 10 rows / batch 2 = 5 micro-batches an epoch, 2 per step: steps straddle epoch boundaries (step 3, step 8)
    return tiny_config(out, "shapes.rows=10", "grad_accum=2", "max_steps=8", "checkpoint_every=6", "ema.decay=0.9",
                       "data.crop=random", "data.random_flip=0.5", "shapes.image_size=20", "cond_dropout.text=0.3",
                       model_overrides=("unet.dropout=0.1",))  # fmt: skip


def _same_files(a, b, stem):
    ta, tb = read_state_dict(a / f"{stem}.safetensors"), read_state_dict(b / f"{stem}.safetensors")
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{stem}: {k} differs"


def test_resume_mid_epoch_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    full = train(resume_config(tmp_path / "full"))

    CrashAt.at, CrashAt.calls = 13, 0  # step 7, first micro-batch (epoch 2, 0-based)
    monkeypatch.setattr(train_mod, "DiffusionLoss", CrashAt)
    with pytest.raises(Interrupted):
        train(resume_config(tmp_path / "cut"))
    monkeypatch.undo()
    root = tmp_path / "cut" / "checkpoints"
    assert find_latest(root) == root / "step-00000006" and (root / "latest").read_text().strip() == "step-00000006"
    saved = json.loads((root / "step-00000006" / "state.json").read_text())
    assert (saved["epoch"], saved["batch_in_epoch"]) == (2, 2)  # mid-epoch, in the third epoch

    resumed = train(resume_config(tmp_path / "cut"))
    assert resumed["state"] == full["state"]
    a, b = tmp_path / "full" / "checkpoints" / "step-00000008", root / "step-00000008"
    for stem in ("model", "optimizer", "ema"):
        _same_files(a, b, stem)
    assert int(read_state_dict(b / "ema.safetensors")["num_updates"]) == 8
    assert json.loads((a / "optimizer.json").read_text()) == json.loads((b / "optimizer.json").read_text())
    assert (a / "state.json").read_text() == (b / "state.json").read_text()
    # the logged loss curve: the crashed run's steps 1-6 plus the resumed 7-8 equal the uninterrupted run's
    logs = [[json.loads(x)["loss"] for x in (tmp_path / d / "logs" / "metrics.jsonl").read_text().splitlines()]
            for d in ("full", "cut")]  # fmt: skip
    assert len(logs[0]) == 8 and logs[0] == logs[1]
    # and the final bundles
    ma, mb = (read_state_dict(tmp_path / d / "model" / "model.safetensors") for d in ("full", "cut"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_corrupt_rng_file_is_a_loud_error_on_resume(tmp_path):
    train(tiny_config(tmp_path, "max_steps=1"))
    rng = tmp_path / "checkpoints" / "step-00000001" / "rng" / "rank-0.json"
    rng.write_text('{"torch": {"__tensor__": "torch"}, "python": [3, [1, 2', encoding="utf-8")
    with pytest.raises(CheckpointError, match="rank-0.json"):
        train(tiny_config(tmp_path, "max_steps=2"))


# ------------------------------------------------------------------------------- checkpointing unit tests


def _small():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(root, step, model, opt, keep_last=0):
    names = [n for n, _ in model.named_parameters()]
    return save_checkpoint(root, TrainState(step=step, epoch=1, batch_in_epoch=step), model_state=model.state_dict(),
                           optimizer_state=opt.state_dict(), param_names=names, ema_state=None, generator=None,
                           config_yaml="x: 1\n", keep_last=keep_last)  # fmt: skip


def test_exception_mid_write_keeps_the_previous_checkpoint_and_latest(tmp_path, monkeypatch):
    model, opt = _small()
    first = _save(tmp_path, 1, model, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = ckpt_mod.write_safetensors

    def failing(tensors, path, *a, **k):
        if "optimizer" in str(path):
            raise OSError("disk full (simulated)")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt_mod, "write_safetensors", failing)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, model, opt)
    assert find_latest(tmp_path) == first
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"
    assert not (tmp_path / "step-00000002").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    saved = read_state_dict(first / "model.safetensors")
    assert all(torch.equal(saved[k], before[k]) for k in before)


def test_failure_while_marking_complete_and_pruning_only_after_success(tmp_path, monkeypatch):
    model, opt = _small()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, opt, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    real = ckpt_mod.write_json

    def failing(path, data):
        if path.name == "state.json":
            raise RuntimeError("killed while marking the checkpoint complete")
        return real(path, data)

    monkeypatch.setattr(ckpt_mod, "write_json", failing)
    with pytest.raises(RuntimeError, match="killed"):
        _save(tmp_path, 4, model, opt, keep_last=2)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]  # nothing pruned
    assert find_latest(tmp_path) == tmp_path / "step-00000003"
    # a stray incomplete folder under a final name (e.g. copied by hand) is never chosen
    (tmp_path / "step-00000009").mkdir()
    (tmp_path / "latest").write_text("step-00000009\n")
    assert find_latest(tmp_path) == tmp_path / "step-00000003"
    _save(tmp_path, 5, model, opt, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000005"]


def test_optimizer_state_round_trip_and_parameter_check(tmp_path):
    model, opt = _small()
    path = _save(tmp_path, 1, model, opt)
    names = [n for n, _ in model.named_parameters()]
    sd = read_optimizer_state(path, names)
    ref = opt.state_dict()
    assert sd["param_groups"] == ref["param_groups"]
    assert sd["state"].keys() == ref["state"].keys()
    for i in ref["state"]:
        for k, v in ref["state"][i].items():
            assert torch.equal(sd["state"][i][k], v)
    with pytest.raises(CheckpointError, match="other parameters"):
        read_optimizer_state(path, ["bias", "weight"])
    skeleton, tensors = split_state({1: (torch.ones(2), "a"), "x": [None, 2.5]})
    back = join_state(json.loads(json.dumps(skeleton)), tensors)
    assert back.keys() == {1, "x"} and isinstance(back[1], tuple) and torch.equal(back[1][0], torch.ones(2))


def test_rng_round_trip_and_damaged_files(tmp_path):
    model, opt = _small()
    path = _save(tmp_path, 1, model, opt)
    expected = torch.rand(3)  # what follows the saved state
    torch.rand(5)
    load_rng(path / "rng" / "rank-0")
    assert torch.equal(torch.rand(3), expected)
    # a well-formed file with a state of the wrong size
    from ldm.checkpoint import write_safetensors

    tensors = read_state_dict(path / "rng" / "rank-0.safetensors")
    write_safetensors({**tensors, "torch": tensors["torch"][:100]}, path / "rng" / "rank-0.safetensors")
    with pytest.raises(CheckpointError, match="corrupt random-number state"):
        load_rng(path / "rng" / "rank-0")
    (path / "rng" / "rank-0.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="rank-0.safetensors"):
        load_rng(path / "rng" / "rank-0")


def test_resume_of_a_conditioned_run_is_bit_identical(tmp_path, monkeypatch):
    """A ControlNet (mask column, random crops and flips applied to the map too) and a class label, each dropped
    on its own: crash at step 7, resume, and the run ends where the uninterrupted one did, conditions included."""
    extra = ("shapes.control_maps=[mask]",
             "conditions=[{type: controlnet, name: mask, column: mask, drop: 0.3, args: {hint_channels: 1}},"
             " {type: class_label, name: count, column: n_objects, drop: 0.2, args: {num_classes: 3}}]")  # fmt: skip
    full = train(tiny_config(tmp_path / "full", *_resume_overrides(), *extra))
    CrashAt.at, CrashAt.calls = 13, 0
    monkeypatch.setattr(train_mod, "DiffusionLoss", CrashAt)
    with pytest.raises(Interrupted):
        train(tiny_config(tmp_path / "cut", *_resume_overrides(), *extra))
    monkeypatch.undo()
    resumed = train(tiny_config(tmp_path / "cut", *_resume_overrides(), *extra))
    assert resumed["state"] == full["state"]
    a, b = (tmp_path / d / "checkpoints" / "step-00000008" for d in ("full", "cut"))
    for stem in ("model", "optimizer", "ema"):
        _same_files(a, b, stem)
    assert any(k.startswith("conditions.conds.mask.net.") for k in read_state_dict(a / "model.safetensors"))
    ma, mb = (read_state_dict(tmp_path / d / "model" / "model.safetensors") for d in ("full", "cut"))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def _resume_overrides() -> tuple[str, ...]:
    return ("shapes.rows=10", "grad_accum=2", "max_steps=8", "checkpoint_every=6", "ema.decay=0.9", "data.crop=random",
            "data.random_flip=0.5", "shapes.image_size=20", "cond_dropout.text=0.3")
