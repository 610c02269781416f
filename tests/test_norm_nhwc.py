"""ldm/norm_nhwc.py: the channels-last GroupNorm computes F.group_norm's normalisation (checked against fp64),
forward and backward, eager and compiled, with autocast behaving as the class it replaced; the switch swaps exactly
nn.GroupNorm / LowPrecisionGroupNorm and back."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.perf_measure import randomize_
from ldm.conditioning import Cond
from ldm.norm_nhwc import ChannelsLastGroupNorm, group_norm_nhwc, set_nhwc_group_norm
from ldm.norms import LowPrecisionGroupNorm
from ldm.speed import SpeedConfig, apply_speed, remove_speed
from ldm.unet import UNet, UNetConfig

SHAPES = [  # (B, C, H, W), groups
    ((2, 64, 8, 8), 32),  # 2 channels per group
    ((3, 96, 5, 7), 8),  # odd spatial sizes, 12 channels per group
    ((1, 32, 4, 4), 32),  # one channel per group (var of channel means is 0)
    ((2, 48, 6, 6), 1),  # one group: LayerNorm over (C, H, W)
]


def _input(shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    # per-channel offsets and scales so the group statistics mix channels that differ (the total-variance term)
    x = torch.randn(shape, generator=g) * torch.linspace(0.5, 3.0, c).view(1, c, 1, 1) + torch.linspace(-2, 4, c).view(1, c, 1, 1)
    return x.contiguous(memory_format=torch.channels_last)


def _affine(c: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, generator=g), torch.randn(c, generator=g)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """Relative per element and to the tensor's largest entry (a normalised entry near 0 carries its neighbours'
    rounding)."""
    got, want = got.detach().to(want.dtype), want.detach()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize("shape,groups", SHAPES)
def test_forward_matches_fp64_group_norm(shape, groups):
    x = _input(shape)
    w, b = _affine(shape[1])
    want = F.group_norm(x.double(), groups, w.double(), b.double(), 1e-5)
    y = group_norm_nhwc(x, groups, w, b, 1e-5)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    _close(y, want)
    _close(group_norm_nhwc(x, groups, None, None, 1e-6), F.group_norm(x.double(), groups, None, None, 1e-6))


@pytest.mark.parametrize("shape,groups", SHAPES[:2])
def test_gradients_match_fp64_group_norm(shape, groups):
    x = _input(shape)
    w, b = _affine(shape[1])
    go = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    group_norm_nhwc(leaves[0], groups, leaves[1], leaves[2], 1e-5).backward(go)
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    F.group_norm(ref[0], groups, ref[1], ref[2], 1e-5).backward(go.double())
    for got, want in zip(leaves, ref):
        _close(got.grad, want.grad)


def test_bf16_autocast_gradients_as_accurate_as_pytorchs():
    """Training runs the norm under bf16 autocast (LowPrecisionGroupNorm's contract: bf16 in and out, fp32 weights).
    Its gradients there, against fp64 F.group_norm on the same bf16 values, are no less accurate than PyTorch's own
    bf16 GroupNorm's (the class it replaces). Measured: dx 2.5e-3 vs 3.1e-3, dweight 1.6e-3 vs 2.4-2.6e-3, dbias
    equal (relative Frobenius error; bf16's unit roundoff is 3.9e-3). Offsets of 0 and 30 standard deviations:
    the affine map's backward subtracts mean * sum(g * w) from sum(g * x * w), which a large mean would expose."""
    (b, c, h, w_), groups = (2, 64, 16, 16), 16
    g = torch.Generator().manual_seed(5)
    for offset in (0.0, 30.0):
        x = (torch.randn(b, c, h, w_, generator=g) + offset * torch.randn(1, c, 1, 1, generator=g)).bfloat16()
        x = x.contiguous(memory_format=torch.channels_last)
        go = torch.randn(b, c, h, w_, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
        weight, bias = 1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)
        ref = [t.double().requires_grad_() for t in (x, weight, bias)]
        F.group_norm(ref[0], groups, ref[1], ref[2], 1e-5).backward(go.double())
        errs = {}
        for name, on in (("pytorch", False), ("nhwc", True)):
            m = LowPrecisionGroupNorm(groups, c)
            with torch.no_grad():
                m.weight.copy_(weight), m.bias.copy_(bias)
            set_nhwc_group_norm(m, on)
            xi = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = m(xi)
            assert y.dtype == torch.bfloat16
            y.backward(go)
            got = (xi.grad, m.weight.grad, m.bias.grad)
            errs[name] = [float((a.double() - r.grad).norm() / r.grad.norm()) for a, r in zip(got, ref)]
        assert all(e < 4e-3 for e in errs["nhwc"]), errs
        assert all(n <= 1.05 * p for n, p in zip(errs["nhwc"], errs["pytorch"])), errs


def test_compiled_matches():
    shape, groups = SHAPES[1]
    x = _input(shape)
    w, b = _affine(shape[1])
    want = F.group_norm(x.double(), groups, w.double(), b.double(), 1e-5)
    _close(torch.compile(group_norm_nhwc, dynamic=False)(x, groups, w, b, 1e-5), want)


def test_module_falls_through_for_nchw_and_bf16():
    torch.manual_seed(0)
    plain = nn.GroupNorm(8, 32)
    nn.init.normal_(plain.weight)
    nn.init.normal_(plain.bias)
    m = nn.GroupNorm(8, 32)
    m.load_state_dict(plain.state_dict())
    assert set_nhwc_group_norm(m) == 1 and type(m) is ChannelsLastGroupNorm
    x = _input((2, 32, 6, 6))
    torch.testing.assert_close(m(x.contiguous()), plain(x.contiguous()), rtol=0, atol=0)  # NCHW: nn.GroupNorm itself
    torch.testing.assert_close(m(x.flatten(2)), plain(x.flatten(2)), rtol=0, atol=0)  # 3-D: nn.GroupNorm itself
    _close(m(x), F.group_norm(x.double(), 8, plain.weight.double(), plain.bias.double(), 1e-5))
    xb, mb = x.bfloat16(), m.bfloat16()  # bf16 weights (inference): bf16 out, fp32 statistics, one rounding
    want = F.group_norm(xb.double(), 8, mb.weight.double(), mb.bias.double(), 1e-5)
    y = mb(xb)
    assert y.dtype == torch.bfloat16
    _close(y, want, rtol=2 ** -8)  # bf16: one rounding of the result, 2^-8 relative


@pytest.mark.parametrize("plain_cls", [nn.GroupNorm, LowPrecisionGroupNorm])
def test_autocast_keeps_the_replaced_class_behaviour(plain_cls):
    """Under bf16 autocast the switched module gives the dtype of the class it replaced (LowPrecisionGroupNorm:
    bf16; nn.GroupNorm: whatever autocast's rule for group_norm is on the device) and, within one bf16 rounding,
    the same values."""
    torch.manual_seed(0)
    ref = plain_cls(8, 32)
    nn.init.normal_(ref.weight)
    m = plain_cls(8, 32)
    m.load_state_dict(ref.state_dict())
    set_nhwc_group_norm(m)
    assert m._plain is plain_cls
    x = _input((2, 32, 6, 6)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = ref(x), m(x)
    assert got.dtype == want.dtype
    # fp32 out: both normalise the same bf16 input in fp32 (1e-5); bf16 out: one rounding each (2^-8)
    _close(got, want, rtol=2 ** -8 if got.dtype == torch.bfloat16 else 1e-5)


def test_switch_swaps_and_restores_classes():
    m = nn.ModuleDict({"a": nn.GroupNorm(4, 8), "b": LowPrecisionGroupNorm(4, 8), "ln": nn.LayerNorm(8),
                       "sub": type("MyNorm", (nn.GroupNorm,), {})(4, 8)})  # fmt: skip
    keys = list(m.state_dict())
    assert set_nhwc_group_norm(m) == 2
    assert type(m["a"]) is ChannelsLastGroupNorm and type(m["b"]) is ChannelsLastGroupNorm
    assert type(m["ln"]) is nn.LayerNorm and type(m["sub"]).__name__ == "MyNorm"
    assert list(m.state_dict()) == keys
    assert set_nhwc_group_norm(m, False) == 2
    assert type(m["a"]) is nn.GroupNorm and type(m["b"]) is LowPrecisionGroupNorm


def test_speed_switch_on_the_unet():
    """nhwc_group_norm: auto on for compiled CUDA inference and training (measured faster on the compiled CFG step
    and training steps; eager the Triton kernels take the norms at inference); on a channels-last U-Net it gives the
    fp32 output of the plain one; apply_speed / remove_speed swap every GroupNorm and back; the key is validated."""
    assert SpeedConfig(compile="default").resolve("cuda").nhwc_group_norm
    assert SpeedConfig(compile="default").resolve("cuda", training=True).nhwc_group_norm
    assert not SpeedConfig().resolve("cuda", training=True).nhwc_group_norm
    assert not SpeedConfig().resolve("cuda").nhwc_group_norm
    assert not SpeedConfig(compile="default", triton_group_norm=True).resolve("cuda").nhwc_group_norm
    assert not SpeedConfig(compile="default").resolve("cpu").nhwc_group_norm
    assert SpeedConfig(compile="default", nhwc_group_norm=True).resolve("cuda").nhwc_group_norm
    with pytest.raises(ValueError, match=r"speed\.nhwc_group_norm"):
        SpeedConfig(nhwc_group_norm="yes")
    unet = randomize_(UNet(UNetConfig.sd15().tiny()), seed=5)  # random everywhere: the zero-init convs would hide it
    n_gn = sum(type(m) is nn.GroupNorm for m in unet.modules())
    x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([500, 20]), Cond(context=torch.randn(2, 7, 24))
    apply_speed(unet, SpeedConfig(channels_last=True))
    before = unet(x, t, cond)
    apply_speed(unet, SpeedConfig(channels_last=True, nhwc_group_norm=True))
    assert sum(type(m) is ChannelsLastGroupNorm for m in unet.modules()) == n_gn > 0
    _close(unet(x, t, cond), before)
    remove_speed(unet)
    assert sum(type(m) is nn.GroupNorm for m in unet.modules()) == n_gn


def test_training_gradients_of_the_unet_match():
    """Compiled CUDA training turns the switch on by auto: a channels-last tiny U-Net with it gives the plain one's
    parameter gradients (fp32, eager; the norm's own gradients are checked against fp64 above)."""
    unet = randomize_(UNet(UNetConfig.sd15().tiny()), seed=6)  # random everywhere: the zero-init convs would hide it
    x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([500, 20]), Cond(context=torch.randn(2, 7, 24))
    grads = []
    for on in (False, True):
        apply_speed(unet, SpeedConfig(channels_last=True, nhwc_group_norm=on), training=True)
        assert unet.speed.nhwc_group_norm is on
        unet.zero_grad(set_to_none=True)
        unet(x, t, cond).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None})
    remove_speed(unet)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        _close(grads[1][name], g, rtol=2e-5)  # fp32: two summation orders through ~20 layers


def test_the_cli_builds_it():
    import argparse

    from inference import speed_cli

    p = argparse.ArgumentParser()
    speed_cli.add_speed_arguments(p)
    assert speed_cli.speed_config(p.parse_args([])).nhwc_group_norm is None  # auto
    cfg = speed_cli.speed_config(p.parse_args(["--compile", "--nhwc-group-norm", "off"]))
    assert cfg.nhwc_group_norm is False and not cfg.resolve("cuda").nhwc_group_norm
    with pytest.raises(ValueError, match="--nhwc-group-norm"):
        speed_cli.speed_config(p.parse_args(["--nhwc-group-norm", "yes"]))
