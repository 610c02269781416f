"""GEGLU's one-pass Triton backward (ldm/geglu.py) against PyTorch's autograd of the plain formula, and the speed
switch that routes the U-Net's GEGLUs to it.

The Triton kernel runs on the CPU in Triton's interpreter (TRITON_INTERPRET=1, set before the kernel is defined,
so in a subprocess); its speed and its bf16 error at SD 1.5's shapes on a GPU are bench/geglu_kernel.py's.
"""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

import ldm.geglu as G
import ldm.transformer as T
from ldm.conditioning import Cond
from ldm.speed import SpeedConfig, apply_speed
from ldm.unet import UNet, UNetConfig

from .fakes import run_interpreted


def plain_grad(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    h = h.detach().double().requires_grad_()
    a, gate = h.chunk(2, dim=-1)
    (grad,) = torch.autograd.grad(a * F.gelu(gate), h, g.double())
    return grad


def test_reference_backward_is_autograds():
    """The pair formula (Phi, phi) equals autograd of a * gelu(gate) (float64, to rounding)."""
    g0 = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 2 * 33, generator=g0, dtype=torch.float64) * 3
    g = torch.randn(3, 7, 33, generator=g0, dtype=torch.float64)
    torch.testing.assert_close(G.geglu_backward_reference(h, g), plain_grad(h, g), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not G.TRITON, reason="Triton is not installed")
def test_triton_kernel_and_autograd_function_in_the_interpreter():
    """The kernel (odd widths and row counts: the masks; a strided gradient) and the autograd.Function around it
    give autograd's gradient of the plain formula: fp32 to 1e-5, bf16 to bf16 rounding."""
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        import ldm.geglu as G
        g0 = torch.Generator().manual_seed(0)
        for rows, width in ((5, 300), (9, 256), (1, 7)):
            h = torch.randn(rows, 2 * width, generator=g0) * 3
            g_full = torch.randn(rows, 2 * width, generator=g0)
            g = g_full[:, ::2]  # strided: the kernel must not assume a contiguous gradient
            hh = h.double().requires_grad_()
            a, gate = hh.chunk(2, -1)
            (want,) = torch.autograd.grad(a * F.gelu(gate), hh, g.double())
            torch.testing.assert_close(G.geglu_backward(h, g).double(), want, rtol=1e-5, atol=1e-5)
            got = G.geglu_backward(h.bfloat16(), g.bfloat16()).double()
            ref = G.geglu_backward_reference(h.bfloat16(), g.bfloat16()).double()
            torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=1e-2)  # both round fp32 to bf16 once
            x = h.clone().requires_grad_()
            out = G._GEGLU.apply(x)
            torch.testing.assert_close(out, x[:, :width] * F.gelu(x[:, width:]), rtol=0, atol=0)
            out.backward(g)
            torch.testing.assert_close(x.grad.double(), want, rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    run_interpreted(script, timeout=300)


def test_cpu_and_inference_keep_the_plain_formula():
    """geglu() is a * gelu(gate) with PyTorch's autograd off CUDA or without gradients: bit for bit the plain path."""
    h = torch.randn(2, 5, 16, requires_grad=True)
    out = G.geglu(h)
    assert out.grad_fn is not None and "GEGLU" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, h[..., :8] * F.gelu(h[..., 8:]), rtol=0, atol=0)


def test_speed_switch_routes_the_unets_geglus(monkeypatch):
    """triton_geglu: auto is on with CUDA, off on the CPU; applied, every GEGLU calls ldm.geglu.geglu; removed, none."""
    assert SpeedConfig().resolve("cuda", training=True).triton_geglu
    assert not SpeedConfig().resolve("cpu", training=True).triton_geglu
    with pytest.raises(ValueError, match=r"speed\.triton_geglu"):
        SpeedConfig(triton_geglu="yes")
    calls = []

    def spy(h):
        calls.append(h.shape)
        a, gate = h.chunk(2, dim=-1)
        return a * F.gelu(gate)

    monkeypatch.setattr(T, "geglu", spy)
    unet = UNet(UNetConfig.sd15().tiny())
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    cond = Cond(context=torch.randn(1, 7, 24))
    unet(x, t, cond)
    assert calls == []
    apply_speed(unet, SpeedConfig(triton_geglu=True), training=True)
    unet(x, t, cond)
    n_geglu = sum(isinstance(m, T.GEGLU) for m in unet.modules())
    assert n_geglu > 0 and len(calls) == n_geglu
    apply_speed(unet, SpeedConfig(triton_geglu=False), training=True)
    calls.clear()
    unet(x, t, cond)
    assert calls == []


def test_training_config_key():
    from ldm.config import ConfigError
    from training.config import load_train_config

    assert load_train_config(None, ["speed.triton_geglu=false"]).speed.triton_geglu is False
    assert load_train_config(None, []).speed.triton_geglu is None  # auto
    with pytest.raises((ConfigError, ValueError), match=r"speed\.triton_geglu"):
        load_train_config(None, ["speed.triton_geglu=maybe"])
