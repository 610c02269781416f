"""Scaled dot-product attention (Vaswani et al. 2017) with interchangeable backends.

``attention(q, k, v, backend, kernel)`` takes and returns tensors laid out as (B, heads, L, d):

- ``sdpa`` (default): ``torch.nn.functional.scaled_dot_product_attention``. ``kernel`` pins PyTorch's
  implementation through ``torch.nn.attention.sdpa_kernel``: ``auto`` (PyTorch chooses), ``cudnn``,
  ``flash`` (Dao et al. 2022), ``efficient`` (Rabe & Staats 2021, memory-efficient) or ``math``; ``fastest``: all
  four in the order cuDNN > flash > efficient > math, each used where the ones before it cannot run (cuDNN was
  measured 1.3-1.8x faster than flash on the H200 for the U-Net's shapes; it has no fp32 kernel, so fp32 falls
  through to flash or efficient). ldm/speed.py makes ``fastest`` the default on CUDA. ``fa4``: FlashAttention-4
  (the optional ``flash-attn-4`` package, ldm/attention_fa4.py) where it was measured faster than cuDNN (long
  self-attention; inference and training), ``fastest`` for every other call; an error names the package if it is missing.
- ``xformers``: ``xformers.ops.memory_efficient_attention`` if xformers is installed AND works on the
  tensors' device. It is probed once per device with a tiny call; a build for another torch or CUDA
  fails there, and then this module warns once with the reason and uses ``sdpa`` from then on.
- ``math``: the formula itself, ``softmax(Q K^T / sqrt(d)) V``, computed in fp32 (scores, softmax and
  the weighted sum) and cast back to the input dtype. The slow, plain reference.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention_fa4 import fa4_applies, fa4_attention, require_fa4

BACKENDS = ("sdpa", "xformers", "math")
_FASTEST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH]  # in this order of preference
SDPA_KERNELS = {
    "auto": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "fastest": _FASTEST,
    "fa4": _FASTEST,  # for the calls that FA4 does not take (ldm/attention_fa4.py)
}
_fa4_on = False  # inside sdpa_context("fa4"): the layers' "auto" calls may go to FA4


def check_backend(backend: str, kernel: str = "auto") -> None:
    """Raise a ValueError naming the argument if ``backend`` or ``kernel`` is not one we know."""
    if backend not in BACKENDS:
        raise ValueError(f"attention: unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if kernel not in SDPA_KERNELS:
        raise ValueError(f"sdpa_kernel: unknown value {kernel!r}; allowed: {', '.join(SDPA_KERNELS)}")


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa", kernel: str = "auto") -> Tensor:
    """q (B, heads, Lq, d), k and v (B, heads, Lk, d) -> (B, heads, Lq, d); no mask, no dropout."""
    if backend == "sdpa":
        return _sdpa(q, k, v, kernel)
    if backend == "math":
        return math_attention(q, k, v)
    if backend == "xformers":
        xops = _xformers_ops(q.device)
        if xops is None:  # not installed or not usable here: warned once, fall back
            return _sdpa(q, k, v, kernel)
        # xformers wants (B, L, heads, d); the transposes are views, the output comes back as one.
        return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    check_backend(backend, kernel)
    raise AssertionError("unreachable")


def _sdpa(q: Tensor, k: Tensor, v: Tensor, kernel: str) -> Tensor:
    if kernel != "auto":  # pinned here for this call (the U-Net pins its kernel once around its forward instead)
        with sdpa_context(kernel):
            return _sdpa(q, k, v, "auto")
    if _fa4_on and fa4_applies(q, k, v):
        return fa4_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_context(kernel: str):
    """A context pinning SDPA's kernel (a no-op for 'auto'). Entering one costs tens of microseconds, so a
    network with many attention layers enters it once around its forward (ldm/unet.py), not per call."""
    if kernel not in SDPA_KERNELS:
        check_backend("sdpa", kernel)
    choice = SDPA_KERNELS[kernel]
    if kernel == "fa4":
        require_fa4()
        return _fa4_context(choice)
    if isinstance(choice, list):  # an order of preference, not only a set
        return sdpa_kernel(choice, set_priority=True)
    return contextlib.nullcontext() if choice is None else sdpa_kernel(choice)


@contextlib.contextmanager
def _fa4_context(fallback: list):
    global _fa4_on
    before, _fa4_on = _fa4_on, True
    try:
        with sdpa_kernel(fallback, set_priority=True):
            yield
    finally:
        _fa4_on = before


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The reference: softmax(Q K^T / sqrt(d)) V, all in fp32. Shapes as in ``attention``."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, heads, Lq, Lk)
    weights = scores.softmax(dim=-1)
    return (weights @ v.float()).to(q.dtype)  # (B, heads, Lq, d)


# ---- xformers: import and probe once per device --------------------------------------------------

_xformers_probe: dict[str, object] = {}  # device string -> xformers.ops module, or None if unusable
_xformers_warned = False


def _xformers_ops(device: torch.device):
    key = str(device)
    if key not in _xformers_probe:
        ops, reason = _probe_xformers(device)
        _xformers_probe[key] = ops
        if ops is None:
            global _xformers_warned
            if not _xformers_warned:
                _xformers_warned = True
                warnings.warn(
                    f"attention backend 'xformers' is not usable ({reason}); using 'sdpa' instead",
                    RuntimeWarning,
                    stacklevel=4,
                )
    return _xformers_probe[key]


def _probe_xformers(device: torch.device):
    """(xformers.ops, None) if a tiny attention call works on ``device``, else (None, reason)."""
    try:
        import xformers.ops as xops
    except Exception as e:  # ImportError, or a broken build raising at import
        return None, f"import failed: {type(e).__name__}: {e}"
    try:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        x = torch.zeros(1, 2, 1, 8, device=device, dtype=dtype)  # (B, L, heads, d)
        xops.memory_efficient_attention(x, x, x)
    except Exception as e:  # e.g. "no operator found", a build for another torch/CUDA
        return None, f"probe on {device} failed: {type(e).__name__}: {e}"
    return xops, None


def xformers_available(device: torch.device | str = "cuda") -> bool:
    """Whether the 'xformers' backend will really run xformers on ``device`` (probes once)."""
    return _xformers_ops(torch.device(device)) is not None
