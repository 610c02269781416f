"""training/config.py and the command lines: validation before any heavy work, errors naming keys; ``ldm train``;
``accelerate launch -m training.train`` with 2 processes against 1 process with the same global batch."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import read_state_dict
from ldm.config import ConfigError, load_config, to_yaml
from tests.test_train_smoke import tiny_config
from training.config import LRScheduleConfig, TrainConfig, load_train_config
from training.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny.yaml"
LDM = Path(sys.executable).parent / "ldm"


def test_shipped_tiny_config_is_valid_and_round_trips():
    cfg = load_train_config(TINY)
    assert cfg.model.from_scratch and cfg.data.source == "shapes" and cfg.ema is not None
    assert load_config(TrainConfig, cfg) == cfg
    again = load_train_config(__import__("yaml").safe_load(to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["optim.lrr=1"], "optim.lrr"),  # unknown key (with a suggestion)
        (["batch_size=many"], "batch_size"),  # wrong type
        (["batch_size=0"], "batch_size"),
        (["optim.lr=-1"], "optim.lr"),
        (["optim.betas=[0.9]"], "optim.betas"),
        (["mixed_precision=fp8"], "mixed_precision"),
        (["lr_schedule.name=step"], "lr_schedule.name"),
        (["ema.decay=1.5"], "ema.decay"),  # turns the null section on, then fails on its value
        (["lora.rank=0"], "lora.rank"),
        (["lora.rank=4", "train_text_encoder=true"], "train_text_encoder"),
        (["cache.text=true", "train_text_encoder=true"], "cache.text"),
        (["cache.latents=true", "data.random_flip=0.5"], "cache.latents"),
        (["data.resolution=-3"], "data.resolution"),
        (["data.streaming=true"], "data.streaming"),
        (["data.source=/no/such/folder"], "data.source"),
        (["shapes.image_size=4"], "shapes.image_size"),
        (["shapes.colour=red"], "shapes.colour"),
        (["model.source=/no/such/model.safetensors"], "model.source"),
        (["model.overrides=[unet.channels=3]"], "model.overrides"),
        (["validation.sampler.steps=0"], "validation.sampler.steps"),
        (["validation.sampler.name=nope"], "validation.sampler.name"),
        (["validation.sampler.seed=null"], "validation.sampler.seed"),
        (["cond_dropout.text=2"], "cond_dropout.text"),
        (["grad_clip=0"], "grad_clip"),
        (["resume=/no/such/checkpoint"], "resume"),
    ],
)
def test_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_train_config(TINY, overrides)
    assert key in str(e.value), str(e.value)


def test_optional_sections_turn_on_from_an_override():
    cfg = load_train_config(TINY, ["ema=null", "lora.rank=8", "train_text_encoder=false", "ema.decay=0.99"])
    assert cfg.lora.rank == 8 and cfg.lora.alpha == 4.0 and cfg.ema.decay == 0.99
    assert load_train_config(TINY, ["ema=null"]).ema is None


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_8bit_adam_without_bitsandbytes_is_a_clear_error():
    with pytest.raises(ConfigError, match="optim.name.*bitsandbytes"):
        load_train_config(TINY, ["optim.name=adamw8bit"])


def test_lr_schedule_closed_forms():
    warm = LRScheduleConfig(name="constant", warmup_steps=4)
    assert [warm.factor(s, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = LRScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert cos.factor(10, 110) == pytest.approx(1.0)
    assert cos.factor(60, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert cos.factor(110, 110) == pytest.approx(0.1)
    lin = LRScheduleConfig(name="linear")
    assert [lin.factor(s, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert all(math.isfinite(cos.factor(s, 5)) for s in range(20))


def _run(*args, timeout=120):
    return subprocess.run([str(LDM), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_ldm_train_help():
    r = _run("train", "--help")
    assert r.returncode == 0, r.stderr
    assert "CONFIG" in r.stdout and "KEY=VALUE" in r.stdout and "accelerate launch" in r.stdout
    r = subprocess.run([sys.executable, "-m", "training.train", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0 and "resume" in r.stdout


def test_ldm_train_reports_config_errors_before_any_work(tmp_path):
    start = time.perf_counter()
    r = _run("train", str(TINY), "optim.lr=fast", f"output_dir={tmp_path / 'out'}")
    assert r.returncode == 2
    assert "optim.lr" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    r = _run("train", "--print-config", str(TINY), "max_steps=7")
    assert r.returncode == 0 and "max_steps: 7" in r.stdout
    assert time.perf_counter() - start < 110


def test_ldm_train_refuses_an_override_in_place_of_the_config(tmp_path):
    # without a CONFIG the recipe runs; a lone KEY=VALUE used to be looked up as a preset name ("unknown preset")
    r = subprocess.run([str(LDM), "train", "max_steps=5"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "'max_steps=5' is an override" in r.stderr and "ldm train configs/train/shapes.yaml max_steps=5" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "runs").exists()  # refused before the recipe started


def test_speed_errors_for_the_device_come_before_the_data(tmp_path, monkeypatch):
    import training.train as T

    """A device-dependent speed error (e.g. speed.attention_kernel=fa4 on CUDA without flash-attn-4) stops the run
    before the data and the models load; the CPU has no such error, so a stand-in raises it."""
    from ldm.speed import SpeedConfig

    def refuse(self, device, training=False):
        raise ValueError(f"speed: refused for {device}")

    monkeypatch.setattr(SpeedConfig, "resolve", refuse)
    monkeypatch.setattr(T, "open_train_dataset", lambda cfg: pytest.fail("the data was opened first"))
    with pytest.raises(ValueError, match="speed: refused for cpu"):
        train(tiny_config(tmp_path))


def test_deepspeed_is_refused_with_a_reason():  # FSDP runs: tests/test_train_distributed.py
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from training.train import _check_distribution

    _check_distribution(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))
    with pytest.raises(ValueError, match="ddp.yaml"):
        _check_distribution(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))


# ------------------------------------------------- accelerate launch -m training.train: two processes


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """2 CPU processes x batch 2 (DDP over gloo) against 1 process x batch 2 x grad_accum 2: the same samples and
    per-sample draws make up each step (training/conditions.py), so the loss curves and weights agree up to the
    float32 summation order of the gradient all-reduce versus accumulation (measured: losses equal to the last
    digit, weights within 8e-7)."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from ldm.config import save_config

    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("the accelerate launcher is not installed next to this Python")
    common = ("shapes.rows=8", "max_steps=3", "ema.decay=0.9", "cond_dropout.text=0.3")
    two = tiny_config(tmp_path / "two", *common, "grad_accum=1")
    save_config(two, tmp_path / "two.yaml")
    # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (multi-CPU needs mpirun);
    # the torchrun launcher (--multi_gpu) with ACCELERATE_USE_CPU gives 2 CPU processes over gloo.
    env = {**os.environ, "HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    env.pop("ACCELERATE_CONFIG_FILE", None)
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.train", str(tmp_path / "two.yaml")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the 2-process run took over 100 s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log[-3000:]
    assert "on 2 process(es)" in log

    train(tiny_config(tmp_path / "one", *common, "grad_accum=2"))
    curves = [[json.loads(x) for x in (tmp_path / d / "logs" / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "two")]  # fmt: skip
    assert [r["step"] for r in curves[0]] == [r["step"] for r in curves[1]] == [1, 2, 3]
    for a, b in zip(*curves):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["world_size"] == 2 and state["images_seen"] == 12
    wa, wb = (read_state_dict(tmp_path / d / "checkpoints" / "step-00000003" / "model.safetensors") for d in ("one", "two"))
    # measured: equal losses, weights within 8e-7. Adam moves each weight by ~lr = 1e-3 a step, so a run that saw
    # other samples or draws is off by ~1e-3; float32 reduction order alone stays far below 1e-5
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5)
    shutil.rmtree(tmp_path / "home", ignore_errors=True)


def test_yaml_boolean_words_mean_the_choice_they_spell():
    """``mixed_precision=no`` (override or unquoted YAML) is read by YAML 1.1 as False; it means the choice "no"."""
    from training.config import load_train_config

    assert load_train_config(None, ["mixed_precision=no"]).mixed_precision == "no"
    assert load_train_config({"mixed_precision": False}).mixed_precision == "no"
    with pytest.raises(ValueError, match="mixed_precision: 'True' is not an allowed value"):
        load_train_config(None, ["mixed_precision=yes"])  # no choice spells true
