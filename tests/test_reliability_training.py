"""Reliability of a training run (issue 9, rows 5 and 12; docs/reliability.md lists every row and its test).

- A real training process (``python -m training.train`` on a tiny config) killed with SIGKILL in the middle of
  writing a checkpoint: the kill is made to land between two files by the test hook of training/checkpointing.py
  (LDM_TEST_CHECKPOINT_PAUSE), so the partial ``.tmp-`` folder is there to see. The previous checkpoint still loads,
  ``latest`` names it, and ``--resume latest`` continues from it to the very weights of an uninterrupted run.
- ``resume=latest`` with no checkpoint is an error (``auto`` would start afresh).
- fp16 gradient-scaler skips: the trainer counts them (``skipped_scaler`` in the train state and metrics), does not
  update the EMA for them, and they are not non-finite skips. fp16 needs CUDA in the trainer, so the scaler's decision
  is injected here; that Accelerate reports a step the scaler skipped (weights untouched, scale halved) is shown
  with a CPU GradScaler behind Accelerate's optimizer wrapper. The real fp16 run is GPU-only (docs/reliability.md).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import training.train as train_mod
from ldm.checkpoint import read_state_dict
from ldm.config import to_yaml
from tests.test_train_smoke import tiny_config
from training.checkpointing import find_latest, list_checkpoints, load_rng, read_optimizer_state, read_train_state
from training.train import train

ROOT = Path(__file__).resolve().parents[1]


def _run_config(out):
    return tiny_config(out, "max_steps=3", "checkpoint_every=1", "ema.decay=0.9", "grad_accum=2")


def _trainer(config: Path, env: dict, log) -> subprocess.Popen:
    """``python -m training.train CONFIG`` in a process of its own, stderr to ``log`` (an open file)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}  # one thread, as in-process
    return subprocess.Popen([sys.executable, "-m", "training.train", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip


def test_sigkill_while_writing_a_checkpoint_loses_nothing_and_resume_latest_continues(tmp_path, caplog):
    out = tmp_path / "run"
    cfg = _run_config(out)
    config = tmp_path / "train.yaml"
    config.write_text(to_yaml(cfg))
    ready, log = tmp_path / "writing-step-2", tmp_path / "trainer.log"
    with open(log, "w") as stderr:
        proc = _trainer(config, {"LDM_TEST_CHECKPOINT_PAUSE": f"2:{ready}"}, stderr)
        deadline = time.monotonic() + 80
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"the trainer ended (exit {proc.returncode}) before checkpoint 2:\n{log.read_text()}")
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"the trainer did not reach checkpoint 2:\n{log.read_text()}")
            time.sleep(0.05)
        assert int(ready.read_text()) == proc.pid  # the hook ran in the trainer: it is inside save_checkpoint now
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL

    root = out / "checkpoints"
    partial = root / ".tmp-step-00000002"
    assert (partial / "model.safetensors").is_file() and not (partial / "state.json").exists()  # killed mid-write
    assert not (root / "step-00000002").exists()
    assert (root / "latest").read_text().strip() == "step-00000001"
    first = root / "step-00000001"
    assert find_latest(root) == first and list_checkpoints(root) == [first]
    # the previous checkpoint loads, every file of it
    assert read_train_state(first).step == 1
    names = sorted(read_state_dict(first / "model.safetensors"))
    assert names and read_optimizer_state(first, names)["state"]
    assert int(read_state_dict(first / "ema.safetensors")["num_updates"]) == 1
    load_rng(first / "rng" / "rank-0")

    caplog.set_level(logging.INFO, logger="ldm.train")
    assert train_mod.main([str(config), "--resume", "latest"]) == 0  # `ldm train CONFIG --resume latest`
    assert f"resumed from {first} at step 1" in caplog.text
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001", "step-00000002", "step-00000003"]
    assert not partial.exists()  # the stale temp folder was replaced by the complete step 2

    # the same weights, EMA and counters as a run that was never interrupted (one thread, as the killed process)
    full = train(_run_config(tmp_path / "full"))
    assert read_train_state(root / "step-00000003") == full["state"]
    for stem in ("model", "ema", "optimizer"):
        a = read_state_dict(tmp_path / "full" / "checkpoints" / "step-00000003" / f"{stem}.safetensors")
        b = read_state_dict(root / "step-00000003" / f"{stem}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stem


def test_resume_latest_without_a_checkpoint_is_an_error(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(to_yaml(tiny_config(tmp_path / "fresh", "max_steps=1")))
    assert train_mod.main([str(config), "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "resume: 'latest'" in err and "no complete checkpoint" in err
    assert not (tmp_path / "fresh" / "checkpoints").exists()


# ------------------------------------------------------------------------------------ 12. fp16 scaler skips


def test_scaler_skips_are_counted_reported_and_do_not_update_the_ema(tmp_path, monkeypatch):
    from accelerate import Accelerator

    calls = []

    def skipped(self) -> bool:  # the scaler found inf/NaN gradients at the second optimizer step
        calls.append(1)
        return len(calls) == 2

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(skipped))
    result = train(tiny_config(tmp_path, "max_steps=3", "checkpoint_every=1", "ema.decay=0.9"))
    state = result["state"]
    assert (state.skipped_scaler, state.skipped_nonfinite, state.step) == (1, 0, 3)
    ck = tmp_path / "checkpoints"
    updates = [int(read_state_dict(ck / f"step-0000000{s}" / "ema.safetensors")["num_updates"]) for s in (1, 2, 3)]
    assert updates == [1, 1, 2]  # no EMA update for the skipped step
    assert [json.loads((ck / f"step-0000000{s}" / "state.json").read_text())["skipped_scaler"] for s in (1, 2, 3)] \
        == [0, 1, 1]  # fmt: skip
    logged = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_scaler"] for r in logged] == [0, 1, 1] and [r["skipped_nonfinite"] for r in logged] == [0, 0, 0]


def test_accelerate_reports_a_step_the_gradient_scaler_skipped():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    Accelerator(cpu=True)  # the wrapper reads the process-wide Accelerate state
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        opt = AcceleratedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), scaler=scaler)
        before = model.weight.detach().clone()
        scaler.scale(model(torch.ones(1, 2)).sum() * float("inf")).backward()  # an fp16 overflow
        opt.step()
        opt.zero_grad()
        assert opt.step_was_skipped and torch.equal(model.weight, before) and scaler.get_scale() == 2.0**15
        scaler.scale(model(torch.ones(1, 2)).sum()).backward()
        opt.step()
        assert not opt.step_was_skipped and not torch.equal(model.weight, before)
    finally:
        AcceleratorState._reset_state()
