"""ldm/norms.py: GroupNorm / LayerNorm kept in the autocast dtype, against a float64 norm of the same input.

Under CPU bf16 autocast the low-precision norms return bf16, within bf16 rounding of the float64 norm, and they
call the functional norm with autocast off and bf16 affine weights: what keeps CUDA's autocast from lifting it to
fp32 (CPU autocast does not lift norms, so there the output dtype alone cannot show the switch; the switch is on by
default only with CUDA). Outside autocast they are nn.GroupNorm / nn.LayerNorm bit for bit; gradients reach the fp32
affine parameters; the switch keeps the state dict and undoes itself.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.norms import LowPrecisionGroupNorm, LowPrecisionLayerNorm, set_low_precision_norms
from ldm.speed import SpeedConfig, apply_speed, remove_speed
from tests.test_speed_switches import rel, tiny

BF16 = torch.bfloat16
# bf16 has an 8-bit significand: the affine weights and the output are each rounded once (2^-9 relative each), and
# the fp32 statistics differ from float64 in the last fp32 bits; 2^-7 of the largest value bounds that with room.
BF16_TOL = 2.0**-7


def ref_group_norm(x, groups, w, b, eps):  # float64, from the definition: per sample and group, over C/G * H * W
    B, C = x.shape[:2]
    xg = x.double().reshape(B, groups, -1)
    y = (xg - xg.mean(-1, keepdim=True)) / (xg.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    shape = (1, C) + (1,) * (x.ndim - 2)
    return y.reshape(x.shape) * w.double().reshape(shape) + b.double().reshape(shape)


def ref_layer_norm(x, w, b, eps):
    xd = x.double()
    y = (xd - xd.mean(-1, keepdim=True)) / (xd.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    return y * w.double() + b.double()


def make(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "group":
        m = nn.GroupNorm(4, 32, eps=1e-5)
        x = torch.randn(3, 32, 6, 5, generator=g) * 3 + 1
        ref = lambda x: ref_group_norm(x, 4, m.weight, m.bias, m.eps)  # noqa: E731
    else:
        m = nn.LayerNorm(24)
        x = torch.randn(3, 10, 24, generator=g) * 3 + 1
        ref = lambda x: ref_layer_norm(x, m.weight, m.bias, m.eps)  # noqa: E731
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return m, x, ref


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_low_precision_norm_stays_bf16_within_rounding_of_float64(kind):
    m, x, ref = make(kind)
    plain = {"group": nn.GroupNorm, "layer": nn.LayerNorm}[kind]
    xb = x.to(BF16)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        set_low_precision_norms(m, True)
        assert type(m) is {"group": LowPrecisionGroupNorm, "layer": LowPrecisionLayerNorm}[kind]
        out = m(xb)
        assert out.dtype == BF16
        expected = ref(xb)  # the norm of the bf16 input the module was given
        assert rel(out.double(), expected) < BF16_TOL
        assert m(x).dtype == torch.float32  # an fp32 input inside autocast: the plain norm, fp32 out
        assert torch.equal(m(x), plain.forward(m, x))
    with torch.no_grad():
        assert torch.equal(m(x), plain.forward(m, x))  # outside autocast: the plain module bit for bit
        assert rel(m(x).double(), ref(x)) < 1e-5
    set_low_precision_norms(m, False)
    assert type(m) is plain


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_the_norm_runs_with_autocast_off_and_low_precision_weights(kind, monkeypatch):
    m, x, _ = make(kind)
    set_low_precision_norms(m, True)
    name = "group_norm" if kind == "group" else "layer_norm"
    real, seen = getattr(F, name), []

    def spy(inp, *args, **kwargs):  # (autocast on?, input dtype, dtypes of the tensor arguments: weight, bias)
        seen.append((torch.is_autocast_enabled("cpu"), inp.dtype, [a.dtype for a in args if torch.is_tensor(a)]))
        return real(inp, *args, **kwargs)

    monkeypatch.setattr(F, name, spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        m(x.to(BF16))
    assert seen == [(False, BF16, [BF16, BF16])]


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_gradients_reach_the_fp32_parameters(kind):
    m, x, ref = make(kind)
    set_low_precision_norms(m, True)
    xb = x.to(BF16).requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    up = torch.randn(x.shape, generator=g)  # an upstream gradient
    with torch.autocast("cpu", dtype=BF16):
        out = m(xb)
    (out.float() * up).sum().backward()
    assert m.weight.grad.dtype == torch.float32 and xb.grad.dtype == BF16
    w, b = m.weight.detach().double().requires_grad_(True), m.bias.detach().double().requires_grad_(True)
    x64 = xb.detach().double().requires_grad_(True)
    r = ref_group_norm(x64, 4, w, b, m.eps) if kind == "group" else ref_layer_norm(x64, w, b, m.eps)
    (r * up.double()).sum().backward()
    # bf16 activations and weights in the backward (the point of the switch): a few bf16 roundings per element
    for got, want in ((m.weight.grad, w.grad), (m.bias.grad, b.grad), (xb.grad, x64.grad)):
        assert rel(got.double(), want) < 4 * BF16_TOL


def test_switch_keeps_the_state_dict_and_undoes_itself():
    net, x, t, cond = tiny("sd15")
    n_norms = sum(type(m) in (nn.GroupNorm, nn.LayerNorm) for m in net.modules())
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        ref32 = net(x, t, cond)
        applied = apply_speed(net, SpeedConfig(low_precision_norms=True))
        assert applied.low_precision_norms
        assert sum(type(m) in (LowPrecisionGroupNorm, LowPrecisionLayerNorm) for m in net.modules()) == n_norms > 0
        assert torch.equal(net(x, t, cond), ref32)  # no autocast: nothing changes
        with torch.autocast("cpu", dtype=BF16):
            low = net(x, t, cond)
        remove_speed(net)
        with torch.autocast("cpu", dtype=BF16):
            plain = net(x, t, cond)
    after = net.state_dict()
    assert list(after) == list(sd) and all(torch.equal(after[k], v) for k, v in sd.items())
    assert sum(type(m) in (nn.GroupNorm, nn.LayerNorm) for m in net.modules()) == n_norms
    # a whole tiny U-Net under bf16 autocast: as close to fp32 as autocast's own fp32 norms (bf16 through ~10 layers)
    assert rel(low.float(), ref32) < 3e-2 and rel(plain.float(), ref32) < 3e-2


def test_auto_is_on_with_cuda_only():
    assert SpeedConfig().resolve("cuda", training=True).low_precision_norms
    assert not SpeedConfig().resolve("cpu", training=True).low_precision_norms
    with pytest.raises(ValueError, match=r"speed\.low_precision_norms"):
        SpeedConfig(low_precision_norms="yes")


def test_training_config_key():
    from ldm.config import ConfigError
    from training.config import load_train_config

    assert load_train_config(None, ["speed.low_precision_norms=false"]).speed.low_precision_norms is False
    assert load_train_config(None, []).speed.low_precision_norms is None  # auto
    with pytest.raises((ConfigError, ValueError), match=r"speed\.low_precision_norms"):
        load_train_config(None, ["speed.low_precision_norms=maybe"])
