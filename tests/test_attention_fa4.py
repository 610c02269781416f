"""The ``fa4`` attention kernel (ldm/attention_fa4.py): which calls it takes, that the U-Net's calls reach it, that
torch.compile sees one opaque op, and the errors without the package. FA4 itself needs a Hopper/Blackwell GPU and
the flash-attn-4 package: its numbers against the fp32 formula are bench/fa4_attention.py's and bench/perf.py's
(BENCHMARKS.md); here a stand-in computes the formula where FA4 would run."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import ldm.attention as A
import ldm.attention_fa4 as F4
from ldm.conditioning import Cond
from ldm.speed import SpeedConfig, apply_speed
from ldm.unet import UNet, UNetConfig
from tests.test_unet_parity import randomize_

try:
    import flash_attn.cute  # noqa: F401

    HAVE_FA4 = True
except Exception:  # noqa: BLE001 - absent (the CI), or its CUDA libraries do not load
    HAVE_FA4 = False


def qkv(lq=4096, lk=4096, d=40, dtype=torch.bfloat16, grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, lq, d, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, lk, d, generator=g).to(dtype) for _ in range(2))
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


@pytest.fixture
def capable_gpu(monkeypatch):
    """Pretend the tensors are on a GPU that FA4 supports and the package imports."""
    monkeypatch.setattr(F4, "_on_capable_gpu", lambda q: True)
    monkeypatch.setattr(A, "require_fa4", lambda: None)


def test_fa4_takes_only_long_low_precision_calls(capable_gpu):
    assert F4.fa4_applies(*qkv())  # SD 1.5's 4096-token, head-dim-40 self-attention
    assert F4.fa4_applies(*qkv(d=64, dtype=torch.float16))
    assert not F4.fa4_applies(*qkv(lk=77))  # cross-attention: cuDNN was faster
    assert not F4.fa4_applies(*qkv(lq=1024, lk=F4.MIN_KEYS - 1))  # shorter sequences: cuDNN was faster
    assert not F4.fa4_applies(*qkv(dtype=torch.float32))  # no fp32 kernel
    assert not F4.fa4_applies(*qkv(d=36))  # head dim not a multiple of 8
    assert not F4.fa4_applies(*qkv(d=264))  # beyond FA4's 256
    assert F4.fa4_applies(*qkv(grad=True))  # training too (head dims padded there, see below)


def test_fa4_needs_a_capable_gpu():
    assert not F4.fa4_applies(*qkv())  # CPU tensors: never


def test_unet_calls_reach_fa4_only_where_it_applies(capable_gpu, monkeypatch):
    """Inside the U-Net's sdpa_context("fa4"), its layers' self-attention calls over >= MIN_KEYS keys go to FA4 and
    give the formula's result, with and without gradients; cross-attention calls go to SDPA."""
    calls = []

    def stand_in(q, k, v):
        calls.append((q.shape[-2], k.shape[-2]))
        return A.math_attention(q, k, v)

    monkeypatch.setattr(A, "fa4_attention", stand_in)
    monkeypatch.setattr(F4, "MIN_KEYS", 64)  # the tiny U-Net's first level: 16x16 = 256 tokens
    unet = UNet(UNetConfig.sd15().tiny())
    randomize_(unet)
    unet = unet.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)  # seeded: the bf16 margin below is a property of these inputs
    x = torch.randn(1, 4, 16, 16, generator=g).to(torch.bfloat16)
    cond = Cond(context=torch.randn(1, 7, 24, generator=g).to(torch.bfloat16))
    t = torch.tensor([500])
    with torch.no_grad():
        ref = unet(x, t, cond)
        unet.set_attention_backend("sdpa", "fa4")
        out = unet(x, t, cond)
    assert calls and all(lk == lq and lk >= 64 for lq, lk in calls)  # self-attention of the long levels only
    # bf16 through the whole U-Net, fp32 formula against SDPA's bf16 kernel: 1.3-2.3% over 12 input seeds (1.5% for
    # this one); a stand-in 10% off in v gave 4.4-7.7%, so 3.5e-2 separates the two (fp32 checks: tests below)
    assert (out.float() - ref.float()).abs().max() / ref.float().abs().max() < 3.5e-2
    n_inference = len(calls)
    calls.clear()
    unet(x, t, cond).float().sum().backward()  # training: the same calls, gradients through them
    assert len(calls) == n_inference and all(lk == lq and lk >= 64 for lq, lk in calls)


@pytest.fixture
def fa4_formula(monkeypatch):
    """flash_attn.cute.interface's forward and backward as the float64 formula; records the head dims they get."""
    seen = []

    def scores(q, k, scale):  # (B, L, heads, d) -> (B, heads, Lq, Lk)
        return torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) * scale

    def fwd(q, k, v, softmax_scale, return_lse):
        seen.append(("fwd", q.shape[-1]))
        s = scores(q, k, softmax_scale)
        out = torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v.double())
        return out.to(q.dtype), s.logsumexp(-1).float(), None, None, None

    def bwd(q, k, v, out, dout, lse, softmax_scale):  # the textbook backward (custom ops run below autograd)
        seen.append(("bwd", q.shape[-1]))
        p = scores(q, k, softmax_scale).softmax(-1)  # (B, heads, Lq, Lk)
        do = dout.double()
        dv = torch.einsum("bhlm,blhd->bmhd", p, do)
        dp = torch.einsum("blhd,bmhd->bhlm", do, v.double())
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * softmax_scale
        dq = torch.einsum("bhlm,bmhd->blhd", ds, k.double())
        dk = torch.einsum("bhlm,blhd->bmhd", ds, q.double())
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = fwd, bwd
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)
    return seen


@pytest.mark.parametrize("d, padded", [(40, 64), (64, 64), (80, 96)])
def test_fa4_training_pads_the_head_dim_and_gives_the_formulas_gradients(fa4_formula, d, padded):
    """With gradients, FA4's forward and backward get q, k, v zero-padded to a multiple of 32 with the scale of the
    real head dim; the sliced output and the gradients are the formula's (fp32, against ldm's math attention)."""
    q, k, v = qkv(lq=48, lk=40, d=d, dtype=torch.float32, grad=True)
    out = F4.fa4_attention(q, k, v)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    assert fa4_formula == [("fwd", padded), ("bwd", padded)]
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    ref = A.math_attention(q2, k2, v2)
    ref_grads = torch.autograd.grad(ref, (q2, k2, v2), g)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fa4_training_ops_trace_with_their_shapes():
    """Forward and backward are two opaque ops (ldm::fa4_forward_lse, ldm::fa4_backward) whose fake
    implementations give the gradients' shapes (what torch.compile plans the step with)."""
    q, k, v = qkv(lq=256, lk=256, grad=True)
    gm = make_fx(lambda q, k, v: torch.autograd.grad(F4.fa4_attention(q, k, v).sum(), (q, k, v)),
                 tracing_mode="fake")(q, k, v)  # fmt: skip
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.ldm.fa4_forward_lse.default in targets and torch.ops.ldm.fa4_backward.default in targets
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    assert [tuple(o.meta["val"].shape) for o in out] == [(1, 2, 256, 40)] * 3


def test_fa4_is_one_opaque_op_for_tracing():
    """torch.compile sees ldm::fa4_forward as one node whose fake implementation gives the output shape."""
    q, k, v = qkv(lq=256, lk=256)
    gm = make_fx(F4.fa4_attention, tracing_mode="fake")(q, k, v)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.ldm.fa4_forward.default in targets
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert tuple(out.meta["val"].shape) == (1, 2, 256, 40)


@pytest.mark.skipif(HAVE_FA4, reason="flash-attn-4 is installed here")
def test_missing_package_is_named():
    q, k, v = qkv(lq=8, lk=8, d=8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="flash-attn-4"):
        A.attention(q, k, v, "sdpa", "fa4")
    with pytest.raises(RuntimeError, match="flash-attn-4"):
        A.sdpa_context("fa4")


@pytest.mark.skipif(HAVE_FA4, reason="flash-attn-4 is installed here")
def test_speed_config_for_cuda_names_the_missing_package():
    with pytest.raises(RuntimeError, match="flash-attn-4"):
        SpeedConfig(attention_kernel="fa4").resolve("cuda")  # no GPU needed: the package check comes first


def test_fa4_is_a_no_op_on_the_cpu():
    """SpeedConfig(attention_kernel="fa4") on a CPU U-Net keeps its kernel (as 'fastest' does): no error, no change."""
    unet = UNet(UNetConfig.sd15().tiny())
    applied = apply_speed(unet, SpeedConfig(attention_kernel="fa4"))
    assert applied.attention_kernel is None and unet.sdpa_kernel == "auto"
