"""GEGLU's activation, ``a * gelu(gate)`` with ``[a, gate] = h.chunk(2, -1)``, with a one-pass backward on CUDA.

The forward is the plain formula (Inductor or eager fuse it into one pass). The backward is where the time went:
compiled, Inductor writes the gradient of ``h`` as one kernel over the concatenated output, so every element
of ``[grad_a, grad_gate]`` recomputes the erf (and, for ``grad_gate``, the exponential) of its gate on its own.
At SD 1.5's 512 px training shapes that kernel took ~1.2 ms per call where its bytes need ~0.35 ms
(bench/results/profile_train512_compiled.txt: 11 ms of a 230 ms step). The Triton kernel here (``_bwd_kernel``)
computes each (a, gate) pair once: one erf, one exp, both gradients written from the same registers; 0.48 ms per
call, 4.8 ms per step (bench/geglu_kernel.py, BENCHMARKS.md).

    gelu(x)  = x Phi(x),                 Phi(x) = (1 + erf(x / sqrt 2)) / 2
    gelu'(x) = Phi(x) + x phi(x),        phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    grad_a    = g gelu(gate)
    grad_gate = g a gelu'(gate)

All arithmetic in fp32, results rounded to the input's dtype (as Inductor's fused kernels do). Used where it can
run: ``h`` fp16 / bf16 / fp32 on CUDA with a gradient wanted and Triton importable; everywhere else (the CPU,
inference, fp64) the plain formula and PyTorch's autograd, so those paths are bit for bit what they were.
"""
from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import Tensor

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp32 math inside: not for fp64
_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


TRITON = importlib.util.find_spec("triton") is not None  # looked up once, not imported until the kernel is built


def launchable(kernel):
    """``torch.library.wrap_triton(kernel)``, for launching inside a ``triton_op``; the kernel itself where this
    torch's wrap_triton refuses it: TRITON_INTERPRET's interpreted kernels on torch 2.11, which only the CPU
    interpreter tests launch."""
    from torch.library import wrap_triton

    try:
        return wrap_triton(kernel)
    except RuntimeError:
        return kernel


def geglu_plain(h: Tensor) -> Tensor:
    """h (..., 2 I) -> (..., I): a * gelu(gate), exact (erf) GELU, PyTorch's ops and autograd."""
    a, gate = h.chunk(2, dim=-1)
    return a * F.gelu(gate)


def geglu(h: Tensor) -> Tensor:
    """``geglu_plain`` with the one-pass Triton backward where it can run (CUDA, a gradient wanted, Triton)."""
    if h.is_cuda and h.requires_grad and torch.is_grad_enabled() and TRITON and h.dtype in _KERNEL_DTYPES:
        return _GEGLU.apply(h)
    return geglu_plain(h)


def geglu_backward_reference(h: Tensor, g: Tensor) -> Tensor:
    """The backward's formula in PyTorch ops (fp32 math, or fp64 for fp64; rounded to h's dtype): h (..., 2 I),
    g (..., I) -> grad_h (..., 2 I). What the Triton kernel computes; the tests hold it to autograd of the forward."""
    math_dtype = torch.promote_types(h.dtype, torch.float32)
    a, gate = h.to(math_dtype).chunk(2, dim=-1)
    g = g.to(math_dtype)
    cdf = 0.5 * (1.0 + torch.erf(gate * _SQRT1_2))
    pdf = torch.exp(-0.5 * gate * gate) * _INV_SQRT_2PI
    return torch.cat([g * gate * cdf, g * a * (cdf + gate * pdf)], dim=-1).to(h.dtype)


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        return geglu_plain(h)  # (..., I)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        return geglu_backward(h, g)


@torch.library.triton_op("ldm::geglu_backward", mutates_args=())
def geglu_backward(h: Tensor, g: Tensor) -> Tensor:
    """h (..., 2 I), g (..., I) -> grad_h (..., 2 I), contiguous, h's dtype; one Triton kernel."""
    import triton

    two_i = h.shape[-1]
    i = two_i // 2
    h2 = h.reshape(-1, two_i)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    g2 = g.reshape(-1, i)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    rows = h2.shape[0]
    out = torch.empty((rows, two_i), dtype=h.dtype, device=h.device)
    grid = (triton.cdiv(rows, _BLOCK_R), triton.cdiv(i, _BLOCK_C))  # tiles of (rows, columns of a / gate)
    launchable(_bwd_kernel())[grid](h2, g2, out, rows, i, h2.stride(0), g2.stride(0), out.stride(0),
                                     BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C)  # fmt: skip
    return out.view(h.shape)


_BLOCK_R, _BLOCK_C = 4, 256  # SD's GEGLU widths (1280, 2560, 5120) are multiples of 256


@functools.cache
def _bwd_kernel():
    """The Triton kernel, defined on first use (importing this module does not import Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def triton_geglu_bwd(h_ptr, g_ptr, out_ptr, R, I, h_row, g_row, out_row,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]  # (BLOCK_R, 1)
        cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]  # (1, BLOCK_C)
        mask = (rows < R) & (cols < I)
        a = tl.load(h_ptr + rows * h_row + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(h_ptr + rows * h_row + I + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows * g_row + cols, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))  # Phi(gate)
        pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327  # phi(gate)
        grad_a = g * gate * cdf
        grad_gate = g * a * (cdf + gate * pdf)
        tl.store(out_ptr + rows * out_row + cols, grad_a.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + rows * out_row + I + cols, grad_gate.to(out_ptr.dtype.element_ty), mask=mask)

    return triton_geglu_bwd  # named "triton..." so bench/profile_train.py counts it with the Triton kernels
