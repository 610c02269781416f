"""FlashAttention-4 (the CuTe-DSL kernels of the optional ``flash-attn-4`` package; Hopper and Blackwell) as torch
custom ops, forward and backward, used by ldm/attention.py's ``fa4`` kernel where it was measured to beat cuDNN.

Where it runs (``fa4_applies``), from bench/fa4_attention.py on one H200 (torch 2.11, flash-attn-4 4.0.0b36, bf16,
BENCHMARKS.md):

- self-attention over long sequences (keys >= 2048): SD 1.5's 4096-token, head-dim-40 layers run 1.085 ms instead
  of cuDNN's 1.291 ms at batch 16 (forward). At 1,024 tokens and below, and for the 77-token cross-attention, cuDNN
  was faster, so those calls stay with SDPA;
- with gradients too (training): forward and backward are FA4's, through ``ldm::fa4_forward_lse`` and
  ``ldm::fa4_backward``. FA4's SM90 backward gave wrong gradients for head dims that are not a multiple of 32
  (40, 80: max error 0.48-2.5 against the fp32 formula, cuDNN 0.001-0.02); on q, k, v zero-padded to the next
  multiple of 32 (the scale stays 1/sqrt(d), the output is sliced back) they were right (0.0012-0.0019) and
  forward + backward took 7.99-8.05 ms against cuDNN's 8.77-8.82 ms (4096 tokens, d 40, batch 32); SDXL's d 64
  needs no padding (9.78 vs 11.22 ms). Running the forward unpadded (FA4's forward is right at d 40) and padding
  only for the backward measured slower: 8.31 ms, and the 512 px training step 227.6 instead of 224.6 ms;
- CUDA devices of compute capability 9.x or 10.x, fp16/bf16, head dim a multiple of 8 up to 256.

The ops are opaque to torch.compile (fake implementations give the outputs' shapes), so compiled graphs and CUDA
graphs call each as one kernel launch. FA4 compiles its kernels on first use (a few seconds per head dim).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_KEYS = 2048  # below this cuDNN was faster (see above)
GRAD_HEAD_MULTIPLE = 32  # with gradients, head dims are zero-padded to a multiple of this (FA4's SM90 backward)
_device_ok: dict[int, bool] = {}  # CUDA device index -> compute capability 9.x or 10.x (filled by require_fa4)


@functools.cache
def fa4_import_error() -> str | None:
    """None if ``flash_attn.cute`` (the flash-attn-4 package) imports, else why not (once per process)."""
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as e:  # not installed, or its CUDA libraries (nvidia-cutlass-dsl) do not load
        return f"{type(e).__name__}: {e}"
    return None


def require_fa4() -> None:
    """Raise a RuntimeError that names the package if the ``fa4`` attention kernel cannot run in this process; called
    eagerly (ldm/attention.py's sdpa_context) before ``fa4_applies`` is asked."""
    error = fa4_import_error()
    if error is None and not _device_ok and torch.cuda.is_available():  # eagerly, so that traced code only reads
        _device_ok.update({i: torch.cuda.get_device_capability(i)[0] in (9, 10)
                           for i in range(torch.cuda.device_count())})  # fmt: skip
    if error is not None:
        raise RuntimeError(f"attention kernel 'fa4': the flash-attn-4 package does not import ({error}); "
                           "pip install flash-attn-4, or choose another speed.attention_kernel")  # fmt: skip


def fa4_applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether FA4 takes this call; q (B, heads, Lq, d), k and v (B, heads, Lk, d)."""
    if q.dtype not in (torch.float16, torch.bfloat16) or k.shape[-2] < MIN_KEYS:
        return False
    d = q.shape[-1]
    if d % 8 or d > 256 or v.shape[-1] != d:
        return False
    return _on_capable_gpu(q)


def _on_capable_gpu(q: Tensor) -> bool:
    """q is on a CUDA device of compute capability 9.x / 10.x and the package imports (both known from require_fa4)."""
    if not q.is_cuda:
        return False
    return _device_ok.get(q.device.index if q.device.index is not None else torch.cuda.current_device(), False)


def fa4_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(Q K^T / sqrt(d)) V by FA4: q (B, heads, Lq, d), k and v (B, heads, Lk, d) -> (B, heads, Lq, d).
    Differentiable: with gradients wanted, FA4's forward (which also returns the logsumexp) and backward run on
    head dims zero-padded to a multiple of 32."""
    # FA4 takes (B, L, heads, d): the transposes are views of the projections' (B, L, heads * d) layout.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _fa4_forward(qt, kt, vt).transpose(1, 2)
    d = q.shape[-1]
    pad = -d % GRAD_HEAD_MULTIPLE
    if pad:  # zero columns: q.k and the softmax are unchanged (the scale is passed), out gets zero columns
        qt, kt, vt = (F.pad(t, (0, pad)) for t in (qt, kt, vt))  # (B, L, heads, d + pad), contiguous
    out, _ = _fa4_forward_lse(qt, kt, vt, d**-0.5)  # (B, Lq, heads, d + pad), lse (B, heads, Lq)
    return out[..., :d].transpose(1, 2)


@torch.library.custom_op("ldm::fa4_forward", mutates_args=())
def _fa4_forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # q (B, Lq, heads, d), k and v (B, Lk, heads, d) -> (B, Lq, heads, d), contiguous
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v)
    return (out[0] if isinstance(out, tuple) else out).contiguous()


@_fa4_forward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return q.new_empty(q.shape)  # (B, Lq, heads, d), contiguous


@torch.library.custom_op("ldm::fa4_forward_lse", mutates_args=())
def _fa4_forward_lse(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    # q (B, Lq, heads, d), k and v (B, Lk, heads, d) -> out (B, Lq, heads, d), logsumexp (B, heads, Lq) fp32
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _flash_attn_fwd(q, k, v, softmax_scale=scale, return_lse=True)[:2]
    return out.contiguous(), lse.contiguous()


@_fa4_forward_lse.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    B, Lq, H, _ = q.shape
    return q.new_empty((B, Lq, H, v.shape[-1])), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("ldm::fa4_backward", mutates_args=())
def _fa4_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, scale: float
                  ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    # layouts as in _fa4_forward_lse, dout like out -> dq, dk, dv like q, k, v
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, softmax_scale=scale)[:3]
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_fa4_backward.register_fake
def _(q, k, v, out, dout, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fa4_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _fa4_grad(ctx, dout: Tensor, dlse):  # the logsumexp output is not used downstream (dlse: None or zeros)
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _fa4_backward(q, k, v, out, dout, lse, ctx.scale)
    return dq, dk, dv, None


_fa4_forward_lse.register_autograd(_fa4_grad, setup_context=_fa4_setup_context)
