"""Gradients of SDPA's kernels against an fp64 reference, at the attention shapes of the CIFAR-10 / OpenMoji models
(docs/results.md): is cuDNN's bf16 backward right there?

    python bench/sdpa_grad_check.py          # prints one line per (shape, kernel): relative errors of out, dq, dk, dv
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [  # (name, B, heads, Lq, Lk, d, causal)
    ("cross 8x8 <- 77 tokens", 64, 8, 64, 77, 32, False),
    ("cross 4x4 <- 77 tokens", 64, 8, 16, 77, 32, False),
    ("cross 16x16 <- 77 tokens", 64, 4, 256, 77, 32, False),
    ("self 8x8", 64, 8, 64, 64, 32, False),
    ("text causal 77", 64, 4, 77, 77, 64, True),
]
KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def rel(a, b) -> float:
    return float((a.double() - b).norm() / b.norm())


if __name__ == "__main__":
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    for name, b, h, lq, lk, d, causal in SHAPES:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g) for n in (lq, lk, lk))
        go = torch.randn(b, h, lq, d, device="cuda", generator=g)
        ref = [t.double().requires_grad_() for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*ref, is_causal=causal)
        out.backward(go.double())
        want = [out.detach()] + [t.grad for t in ref]
        for kname, kernel in KERNELS.items():
            xs = [t.bfloat16().requires_grad_() for t in (q, k, v)]
            try:
                with sdpa_kernel(kernel):
                    o = F.scaled_dot_product_attention(*xs, is_causal=causal)
                    o.backward(go.bfloat16())
            except RuntimeError as e:
                print(f"{name:26s} {kname:9s} not available ({str(e).splitlines()[0][:60]})")
                continue
            errs = [rel(o.detach(), want[0])] + [rel(x.grad, w) for x, w in zip(xs, want[1:])]
            print(f"{name:26s} {kname:9s} out {errs[0]:.2e}  dq {errs[1]:.2e}  dk {errs[2]:.2e}  dv {errs[3]:.2e}")
