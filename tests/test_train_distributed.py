"""Several training processes (training/distributed.py): FSDP against one process with the same global batch,
checkpoints moving between one process and FSDP or DDP (EMA and optimizer states included), validation and the
final bundle on rank 0 under FSDP, and a failing or hanging process ending the run with an error instead of a hang.

Two CPU processes over gloo, started as ``accelerate launch --multi_gpu`` with ACCELERATE_USE_CPU (the torchrun
launcher); accelerate offers no FSDP on CPUs, so ``LDM_TEST_FSDP_ON_CPU=1`` sends them through the trainer's own
FSDP2 path, the code that runs on GPUs (``fully_shard`` over a CPU device mesh).

The reference for "the same run" is independent of the sharding code: one process with batch b and grad_accum 2
takes, step for step, the samples and per-sample draws of 2 processes with batch b (training/draws.py), with plain
tensors, a plain optimizer and a plain EMA. Tolerance: all fp32; what differs is only the order of the gradient
sums (a reduce-scatter of two per-process gradients against accumulating two micro-batches). Measured after 4
steps: losses equal to the last digit, gradient norms within 1e-7 relative, weights within 8.4e-7, EMA 7.8e-7,
AdamW moments 1.5e-8. Adam moves each weight by ~lr = 1e-3 a step, so a run that saw other samples, another draw,
or lost an optimizer or EMA state would be off by ~1e-4..1e-3; rtol 1e-5 on losses and atol 1e-5 on weights sit
between the two.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import read_state_dict
from ldm.config import save_config
from tests.test_train_smoke import tiny_config
from training.train import train

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
COMMON = ("shapes.rows=8", "ema.decay=0.9", "cond_dropout.text=0.3", "max_steps=4")
WEIGHT_ATOL = 1e-5

pytestmark = pytest.mark.skipif(not ACCELERATE.exists(), reason="the accelerate launcher is not installed here")


def launch(tmp_path: Path, name: str, *overrides: str, env: dict | None = None, timeout: float = 120):
    """``accelerate launch`` 2 CPU processes on tiny_config(tmp_path / name, *overrides): (returncode, log, seconds)."""
    cfg = tiny_config(tmp_path / name, *overrides)
    save_config(cfg, tmp_path / f"{name}.yaml")
    full_env = {**os.environ, "HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
                "PYTHONUNBUFFERED": "1", **(env or {})}  # fmt: skip
    full_env.pop("ACCELERATE_CONFIG_FILE", None)
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.train", str(tmp_path / f"{name}.yaml")]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=ROOT)  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the 2-process run {name} took over {timeout} s (a hang?):\n{log[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, log, time.perf_counter() - start


FSDP = {"LDM_TEST_FSDP_ON_CPU": "1"}


def curve(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a: Path, b: Path, atol: float = WEIGHT_ATOL) -> None:
    """Two checkpoint folders hold the same weights, AdamW moments and EMA (up to fp32 summation order)."""
    for stem in ("model", "optimizer", "ema"):
        ta, tb = read_state_dict(a / f"{stem}.safetensors"), read_state_dict(b / f"{stem}.safetensors")
        assert ta.keys() == tb.keys(), stem
        for k in ta:
            torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=atol, msg=lambda m: f"{stem} {k}: {m}")
    ja, jb = (json.loads((p / "optimizer.json").read_text()) for p in (a, b))
    assert ja["param_names"] == jb["param_names"]


def test_fsdp_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """FSDP (2 processes x batch 1 x grad_accum 2: gradients kept unsharded over the first micro-batch) against
    1 process x batch 1 x grad_accum 4: same loss curve and gradient norms, same weights, AdamW states and EMA in
    the checkpoints, which rank 0 wrote in the one-process format; the validation grid and the final bundles (raw
    and EMA) made on rank 0 from the gathered weights."""
    extra = ("checkpoint_every=2", "validation.prompts=[a red circle]", "validation.sampler.steps=2", "batch_size=1")
    rc, log, _ = launch(tmp_path, "fsdp", *COMMON, *extra, "grad_accum=2", env=FSDP)
    assert rc == 0, log[-3000:]
    assert "FSDP2: U-Net sharded over 2 processes" in log and "on 2 process(es)" in log
    train(tiny_config(tmp_path / "one", *COMMON, *extra, "grad_accum=4"))

    one, fsdp = curve(tmp_path / "one"), curve(tmp_path / "fsdp")
    assert [r["step"] for r in one] == [r["step"] for r in fsdp] == [1, 2, 3, 4]
    for a, b in zip(one, fsdp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for step in ("step-00000002", "step-00000004"):
        assert_same_state(tmp_path / "one" / "checkpoints" / step, tmp_path / "fsdp" / "checkpoints" / step)
    state = json.loads((tmp_path / "fsdp" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["world_size"] == 2 and state["images_seen"] == 16
    assert sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints" / "step-00000004" / "rng").iterdir()) == [
        "rank-0.json", "rank-0.safetensors", "rank-1.json", "rank-1.safetensors"]

    # the final bundles: raw weights = the last checkpoint's, EMA weights = its EMA shadows
    ck = tmp_path / "fsdp" / "checkpoints" / "step-00000004"
    weights, ema = read_state_dict(ck / "model.safetensors"), read_state_dict(ck / "ema.safetensors")
    raw = read_state_dict(tmp_path / "fsdp" / "model" / "model.safetensors")
    averaged = read_state_dict(tmp_path / "fsdp" / "model-ema" / "model.safetensors")
    shadow = {k.removeprefix("shadow.params.").replace("/", "."): v for k, v in ema.items() if k != "num_updates"}
    assert shadow.keys() == weights.keys()
    for name, w in weights.items():
        assert torch.equal(raw[name], w), name
        assert torch.equal(averaged[name], shadow[name]), name
    assert sum(not torch.equal(shadow[n], w) for n, w in weights.items()) > len(weights) // 2  # EMA != raw
    assert (tmp_path / "fsdp" / "validation" / "step-00000004.png").is_file()
    shutil.rmtree(tmp_path / "home", ignore_errors=True)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_checkpoints_move_between_one_process_and_two(tmp_path, strategy):
    """A one-process checkpoint resumes on 2 processes (FSDP: sharded; DDP), and theirs on one process; both end
    where the uninterrupted one-process run ends (weights, AdamW states and EMA)."""
    common = (*COMMON, "checkpoint_every=1")
    train(tiny_config(tmp_path / "one", *common, "grad_accum=2"))
    ref = tmp_path / "one" / "checkpoints"

    # 1 process -> 2: resume the one-process step 2 on 2 processes, run to step 4
    rc, log, _ = launch(tmp_path, "to_two", *common, "grad_accum=1", f"resume={ref / 'step-00000002'}",
                        env=FSDP if strategy == "fsdp" else {})  # fmt: skip
    assert rc == 0, log[-3000:]
    assert "resumed from" in log and "at step 2" in log
    assert ("FSDP2: U-Net sharded" in log) == (strategy == "fsdp")
    for step in ("step-00000003", "step-00000004"):
        assert_same_state(ref / step, tmp_path / "to_two" / "checkpoints" / step)
    losses = {r["step"]: r["loss"] for r in curve(tmp_path / "to_two")}
    for r in curve(tmp_path / "one"):
        if r["step"] > 2:
            assert losses[r["step"]] == pytest.approx(r["loss"], rel=1e-5, abs=1e-7)

    # 2 -> 1 process: resume their step 3 on one process
    two_ck = tmp_path / "to_two" / "checkpoints" / "step-00000003"
    train(tiny_config(tmp_path / "to_one", *common, "grad_accum=2", f"resume={two_ck}"))
    assert_same_state(ref / "step-00000004", tmp_path / "to_one" / "checkpoints" / "step-00000004")
    shutil.rmtree(tmp_path / "home", ignore_errors=True)


def test_a_failing_process_ends_the_fsdp_run_with_its_error(tmp_path):
    """Rank 1 raises at step 2 (test hook): the launcher exits non-zero within seconds, naming rank 1's error."""
    env = {**FSDP, "LDM_TEST_FAIL_AT_STEP": "2", "LDM_TEST_FAIL_RANK": "1"}
    rc, log, seconds = launch(tmp_path, "fail", *COMMON, "max_steps=6", env=env, timeout=90)
    assert rc != 0
    assert "ldm train: rank 1 failed: RuntimeError: LDM_TEST_FAIL_AT_STEP: process 1 fails at step 2" in log
    assert seconds < 60, seconds
    assert not (tmp_path / "fail" / "model").exists()
    shutil.rmtree(tmp_path / "home", ignore_errors=True)


def test_a_hanging_process_ends_the_run_after_dist_timeout_s(tmp_path):
    """Rank 1 stops answering at step 2 (test hook: it sleeps): rank 0's next collective times out after
    dist_timeout_s, rank 0 reports it and leaves, and the launcher stops rank 1 and exits non-zero."""
    env = {"LDM_TEST_FAIL_AT_STEP": "2", "LDM_TEST_FAIL_RANK": "1", "LDM_TEST_FAIL_HOW": "hang"}
    rc, log, seconds = launch(tmp_path, "hang", *COMMON, "max_steps=6", "dist_timeout_s=5", env=env, timeout=90)
    assert rc != 0
    assert "ldm train: rank 0 failed:" in log and "waited longer than dist_timeout_s=5" in log
    assert seconds < 60, seconds
    shutil.rmtree(tmp_path / "home", ignore_errors=True)


def test_deepspeed_and_unsupported_fsdp_settings_are_refused_with_a_reason(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from training.train import _check_distribution

    _check_distribution(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))
    _check_distribution(SimpleNamespace(distributed_type=DistributedType.FSDP), tiny_config("unused"))
    with pytest.raises(ValueError, match="ddp.yaml"):
        _check_distribution(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    for overrides, key in ((["train_text_encoder=true"], "train_text_encoder"), (["lora.rank=4"], "lora"),
                           (["mixed_precision=fp16"], "mixed_precision"),
                           (["lora.rank=4", "train_unet=false"], "train_unet")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{key}: not supported under FSDP"):
            _check_distribution(fsdp, tiny_config("unused", *overrides))
