"""Low-precision norms: GroupNorm and LayerNorm that stay in the autocast dtype instead of going up to fp32.

Under ``torch.autocast`` PyTorch runs ``group_norm`` and ``layer_norm`` in fp32 (the AMP "autocast to float32"
list): a bf16 activation is cast up, normalised, and the fp32 result feeds SiLU (ResBlock) or the q/k/v
projections (transformer block), which cast it down again. In a U-Net trained with bf16 autocast that doubles the
bytes of every norm's output, of the SiLU after it and of the tensors saved for the backward, and adds a cast
kernel on each side. These norms take the autocast-dtype input as it is: PyTorch's CUDA and CPU kernels read bf16 /
fp16, accumulate the mean and variance in fp32 and write the input's dtype, with the affine weights cast to it.
The result is the fp32 norm rounded to the low dtype (which the next matmul or convolution would round it to
anyway), so only the SiLU / residual in between sees one rounding more.

Outside autocast, or for an input not in the autocast dtype, they are exactly ``nn.GroupNorm`` / ``nn.LayerNorm``
(same ``forward``): fp32 and bf16-weight inference are untouched. ``set_low_precision_norms(module, on)`` switches a
model's norms in place by class (parameter names and the state dict do not change); ldm/speed.py calls it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _low(x: Tensor) -> bool:
    """True where autocast would lift ``x`` to fp32 for a norm: autocast on for its device, x in its dtype."""
    dev = x.device.type
    return torch.is_autocast_enabled(dev) and x.dtype == torch.get_autocast_dtype(dev)


def _cast(p: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if p is None else p.to(dtype)


class LowPrecisionGroupNorm(nn.GroupNorm):
    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, *)
        if not _low(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype), self.eps)


class LowPrecisionLayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        # x: (*, normalized_shape)
        if not _low(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            w, b = _cast(self.weight, x.dtype), _cast(self.bias, x.dtype)
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


_LOW = {nn.GroupNorm: LowPrecisionGroupNorm, nn.LayerNorm: LowPrecisionLayerNorm}
_PLAIN = {v: k for k, v in _LOW.items()}


def set_low_precision_norms(module: nn.Module, on: bool = True) -> int:
    """Switch every plain nn.GroupNorm / nn.LayerNorm in ``module`` to its low-precision class (``on``) or back;
    subclasses of them are left alone. Returns how many were switched."""
    table = _LOW if on else _PLAIN
    n = 0
    for m in module.modules():
        cls = table.get(type(m))
        if cls is not None:
            m.__class__ = cls
            n += 1
    return n
