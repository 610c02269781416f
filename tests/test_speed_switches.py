"""ldm/speed.py: each speed switch computes what the eager U-Net computes (fp32, CPU, tiny random U-Nets), the
defaults leave the CPU path bit for bit as it was, the state dict never changes, and bad settings name their key.

torch.compile and CUDA graphs are not run here (minutes of compilation on 2 cores; CUDA): bench/perf.py checks
them on the GPU against the eager fp32 output in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from inference import generate_cli
from ldm.conditioning import Cond
from ldm.config import ConfigError
from ldm.group_norm_triton import TRITON
from ldm.speed import (ATTENTION_KERNELS, COMPILE_MODES, CUDAGraphForward, SpeedConfig, _flatten, _unflatten,
                       apply_speed, remove_speed)  # fmt: skip
from ldm.transformer import CrossAttention
from ldm.unet import UNet, UNetConfig
from tests.test_unet_parity import randomize_

TOL = 1e-5


def tiny(name: str = "sd15", seed: int = 1):
    cfg = {"sd15": UNetConfig.sd15, "sd21": UNetConfig.sd21, "sdxl": UNetConfig.sdxl_base}[name]().tiny()
    torch.manual_seed(0)
    net = UNet(cfg).eval()
    randomize_(net, seed=seed)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([3.0, 731.0])
    vec = torch.randn(2, cfg.adm_in_channels, generator=g) if cfg.adm_in_channels else None
    cond = Cond(context=torch.randn(2, 7, cfg.context_dim, generator=g), vector=vec)
    return net, x, t, cond


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_defaults_on_cpu_are_bitwise_the_eager_path(name):
    net, x, t, cond = tiny(name)
    keys = list(net.state_dict())
    with torch.no_grad():
        ref = net(x, t, cond)
        applied = apply_speed(net, SpeedConfig())
        assert net.speed == applied and not (applied.fused_qkv or applied.channels_last or applied.cuda_graphs)
        assert applied.attention_kernel is None and applied.compile == "none"
        assert torch.equal(net(x, t, cond), ref)
    assert list(net.state_dict()) == keys


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
@pytest.mark.parametrize("switches", [dict(fused_qkv=True), dict(channels_last=True),
                                      dict(fused_qkv=True, channels_last=True, attention_kernel="math"),
                                      dict(attention_kernel="fastest")])  # fmt: skip
def test_each_switch_matches_eager(name, switches):
    net, x, t, cond = tiny(name)
    keys = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        ref = net(x, t, cond)
        apply_speed(net, SpeedConfig(**switches))
        assert rel(net(x, t, cond), ref) < TOL
        if switches.get("fused_qkv"):
            assert all(m.fused_weight is not None for m in net.modules() if isinstance(m, CrossAttention))
        sd = net.state_dict()
        assert list(sd) == list(keys) and all(torch.equal(sd[k], v) for k, v in keys.items())  # no key, no value moved
        remove_speed(net)
        assert torch.equal(net(x, t, cond), ref)  # back to the eager path, bit for bit


def test_fused_weights_follow_in_place_changes():
    net, x, t, cond = tiny("sd15", seed=1)
    other, *_ = tiny("sd15", seed=5)
    apply_speed(net, SpeedConfig(fused_qkv=True))
    with torch.no_grad():
        net(x, t, cond)  # caches the concatenated weights
        net.load_state_dict(other.state_dict())  # in place: version counters move
        assert rel(net(x, t, cond), other(x, t, cond)) < TOL


def test_fused_path_steps_aside_for_training():
    net, x, t, cond = tiny("sd15")
    apply_speed(net, SpeedConfig(fused_qkv=True))
    net(x, t, cond).square().mean().backward()  # gradients on: the separate projections run
    attn = next(m for m in net.modules() if isinstance(m, CrossAttention))
    assert attn.to_q.weight.grad is not None and attn.to_k.weight.grad is not None


def test_cuda_graph_runner_falls_back_off_cuda_and_round_trips_inputs():
    net, x, t, cond = tiny("sdxl")
    calls = []
    runner = CUDAGraphForward(lambda *a: calls.append(a) or net(*a[:3]))
    with torch.no_grad():
        assert torch.equal(runner(x, t, cond), net(x, t, cond)) and len(calls) == 1 and not runner.graphs
    c = Cond(context=cond.context, vector=cond.vector, control=(x, x), extra={"b": t, "a": x})
    tensors, spec = _flatten((x, t, c))
    x2, t2, c2 = _unflatten(tensors, spec)
    assert x2 is x and t2 is t and c2.context is c.context and c2.control == (x, x) and c2.extra == {"a": x, "b": t}
    assert c2.concat is None


@pytest.mark.parametrize("kwargs, key", [
    (dict(compile="fast"), "speed.compile"),
    (dict(attention_kernel="cudnnn"), "speed.attention_kernel"),
    (dict(channels_last="yes"), "speed.channels_last"),
    (dict(cuda_graphs=True, compile="reduce-overhead"), "speed.cuda_graphs"),
])  # fmt: skip
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        SpeedConfig(**kwargs)


def test_device_and_training_errors_name_the_key():
    with pytest.raises(ValueError, match=r"speed\.cuda_graphs: needs a CUDA device"):
        SpeedConfig(cuda_graphs=True).resolve("cpu")
    with pytest.raises(ValueError, match=r"speed\.cuda_graphs: CUDA graphs are for inference"):
        SpeedConfig(cuda_graphs=True).resolve("cuda", training=True)
    r = SpeedConfig().resolve("cuda")  # what a CUDA pipeline gets by default: NHWC with the Triton GroupNorm
    assert (r.attention_kernel, r.fused_qkv, r.cuda_graphs) == ("fastest", True, True)
    assert r.channels_last == r.triton_group_norm == TRITON
    assert not SpeedConfig(triton_group_norm=False).resolve("cuda").channels_last  # eager NHWC needs the norms
    r = SpeedConfig(compile="default").resolve("cuda")  # compiled: Inductor's own norms, NHWC
    assert (r.channels_last, r.triton_group_norm) == (True, False)
    r = SpeedConfig(compile="default").resolve("cuda", training=True)
    assert (r.fused_qkv, r.cuda_graphs, r.channels_last, r.triton_group_norm) == (False, False, True, False)
    assert not SpeedConfig().resolve("cuda", training=True).channels_last


def test_pipeline_load_checks_the_speed_switches_before_loading(monkeypatch):
    import inference.pipeline as P

    loaded = []
    monkeypatch.setattr(P, "load_bundle", lambda *a, **k: loaded.append(a) or pytest.fail("loaded first"))
    with pytest.raises(ValueError, match=r"speed\.cuda_graphs: needs a CUDA device"):
        P.Pipeline.load("any/model", device="cpu", speed=SpeedConfig(cuda_graphs=True))
    assert loaded == []


def test_train_config_speed_section():
    from training.config import load_train_config

    assert load_train_config(None, ["speed.compile=default"]).speed.compile == "default"
    with pytest.raises(ConfigError, match=r"speed\.compile"):
        load_train_config(None, ["speed.compile=fastest"])


INFERENCE_ONLY = {"cuda_graphs", "fused_qkv", "fused_emb", "fused_context_kv", "shared_latent", "triton_group_norm"}
SWITCHES = [f.name for f in dataclasses.fields(SpeedConfig) if f.type == "Optional[bool]"]


@pytest.mark.parametrize("key", SWITCHES)
def test_train_config_on_off_auto_switches(key):
    """Every auto / on / off switch in the training config: null (auto) by default, false accepted, true accepted
    or, for an inference-only one, an error that says so; anything else an error naming the key."""
    from training.config import load_train_config

    assert load_train_config(None, []).speed.__dict__[key] is None
    assert load_train_config(None, [f"speed.{key}=false"]).speed.__dict__[key] is False
    if key in INFERENCE_ONLY:
        with pytest.raises((ConfigError, ValueError), match=rf"speed\.{key}: inference only"):
            load_train_config(None, [f"speed.{key}=true"])
    else:
        assert load_train_config(None, [f"speed.{key}=true"]).speed.__dict__[key] is True
    with pytest.raises((ConfigError, ValueError), match=rf"speed\.{key}"):
        load_train_config(None, [f"speed.{key}=maybe"])


def test_cli_flags_build_the_speed_config():
    assert generate_cli.COMPILE_MODES == COMPILE_MODES and generate_cli.ATTENTION_KERNELS == ATTENTION_KERNELS
    p = argparse.ArgumentParser()
    generate_cli.add_speed_arguments(p)
    assert generate_cli.speed_config(p.parse_args([])) == SpeedConfig()
    got = generate_cli.speed_config(p.parse_args(["--compile", "--channels-last", "on", "--cuda-graphs", "off",
                                                  "--attention-kernel", "flash"]))  # fmt: skip
    assert got == SpeedConfig(compile="default", channels_last=True, cuda_graphs=False, attention_kernel="flash")
    got = generate_cli.speed_config(p.parse_args(["--fused-emb", "off", "--fused-context-kv", "off"]))
    assert got == SpeedConfig(fused_emb=False, fused_context_kv=False)
    got = generate_cli.speed_config(p.parse_args(["--compile-mode", "max-autotune"]))
    assert got.compile == "max-autotune"
    for argv, flag in ((["--compile-mode", "fast"], "--compile-mode"), (["--fused-qkv", "yes"], "--fused-qkv"),
                       (["--fused-emb", "1"], "--fused-emb"),
                       (["--compile-mode", "reduce-overhead", "--cuda-graphs", "on"], "--cuda-graphs")):  # fmt: skip
        with pytest.raises(ValueError, match=flag):
            generate_cli.speed_config(p.parse_args(argv))
