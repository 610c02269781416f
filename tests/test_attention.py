"""Attention backends against the closed form softmax(Q K^T / sqrt(d)) V computed in float64.

Error measure: max |out - ref| / max |ref|.
"""
from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

import ldm.attention as A
from ldm.attention import attention

TOL = 1e-5


def qkv(B=2, heads=3, Lq=5, Lk=7, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, heads, L, d, generator=g).to(dtype) for L in (Lq, Lk, Lk))


def reference(q, k, v):
    q, k, v = q.double(), k.double(), v.double()
    w = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return w @ v  # (B, heads, Lq, d)


def rel_err(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def cpu_kernels():
    """The sdpa kernels that run on this CPU build (flash and math do; efficient/cudnn are CUDA-only)."""
    q, k, v = qkv()
    usable = []
    for kernel in A.SDPA_KERNELS:
        try:
            attention(q, k, v, "sdpa", kernel)
            usable.append(kernel)
        except RuntimeError:
            pass
    return usable


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_backends_match_the_formula(backend):
    q, k, v = qkv()
    out = attention(q, k, v, backend)
    assert out.shape == (2, 3, 5, 8) and out.dtype == torch.float32
    assert rel_err(out, reference(q, k, v)) < TOL


def test_sdpa_kernels_match_the_formula():
    kernels = cpu_kernels()
    assert {"auto", "math"} <= set(kernels)
    q, k, v = qkv(Lq=9, Lk=9)
    for kernel in kernels:
        assert rel_err(attention(q, k, v, "sdpa", kernel), reference(q, k, v)) < TOL, kernel


def test_sdpa_accepts_transposed_views():
    """The U-Net hands in (B, L, heads, d).transpose(1, 2) views; no copy is needed first."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, L, 3, 8, generator=g).transpose(1, 2) for L in (5, 7, 7))
    assert not q.is_contiguous()
    assert rel_err(attention(q, k, v), reference(q, k, v)) < TOL


def test_math_backend_softmax_in_fp32_for_half_inputs():
    q, k, v = qkv(dtype=torch.bfloat16, Lk=64)
    out = attention(q, k, v, "math")
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 bits: one rounding of the output (2^-8 relative), inputs exact in the reference.
    assert rel_err(out, reference(q, k, v)) < 2**-7


def test_unknown_names_are_rejected():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="attention: unknown backend 'flash'.*allowed: sdpa, xformers, math"):
        attention(q, k, v, "flash")
    with pytest.raises(ValueError, match="sdpa_kernel: unknown value 'fast'"):
        attention(q, k, v, "sdpa", "fast")


# ---- xformers: simulated, since it is not installed here ----------------------------------------


@pytest.fixture
def fresh_probe(monkeypatch):
    """Forget earlier probes, so each test sees the first use of the 'xformers' backend."""
    monkeypatch.setattr(A, "_xformers_probe", {})
    monkeypatch.setattr(A, "_xformers_warned", False)


def fake_xformers(monkeypatch, memory_efficient_attention):
    pkg = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def test_unusable_xformers_warns_once_and_falls_back_to_sdpa(monkeypatch, fresh_probe):
    calls = []

    def broken(q, k, v):
        calls.append(q.shape)
        raise RuntimeError("xformers was built for torch 2.99")

    fake_xformers(monkeypatch, broken)
    q, k, v = qkv()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [attention(q, k, v, "xformers") for _ in range(3)]
    relevant = [w for w in caught if "xformers" in str(w.message)]
    assert len(relevant) == 1
    assert "built for torch 2.99" in str(relevant[0].message) and "'sdpa'" in str(relevant[0].message)
    assert len(calls) == 1  # probed once, then never called again
    expected = attention(q, k, v, "sdpa")
    assert all(torch.equal(o, expected) for o in outs)


def test_missing_xformers_warns_once_and_falls_back(monkeypatch, fresh_probe):
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` raise ImportError
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    q, k, v = qkv()
    with pytest.warns(RuntimeWarning, match="import failed") as caught:
        out = attention(q, k, v, "xformers")
        attention(q, k, v, "xformers")
    assert len([w for w in caught if "xformers" in str(w.message)]) == 1
    assert torch.equal(out, attention(q, k, v, "sdpa"))


def test_usable_xformers_gets_its_bmhk_layout(monkeypatch, fresh_probe):
    """xformers takes (B, L, heads, d): the backend must transpose in and out."""
    seen = []

    def bmhk_attention(q, k, v):  # a faithful stand-in in xformers' layout
        seen.append(tuple(q.shape))
        return reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).to(q.dtype)

    fake_xformers(monkeypatch, bmhk_attention)
    q, k, v = qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # usable: no warning
        out = attention(q, k, v, "xformers")
    assert seen[-1] == (2, 5, 3, 8)  # (B, Lq, heads, d)
    assert out.shape == (2, 3, 5, 8)
    assert rel_err(out, reference(q, k, v)) < TOL
