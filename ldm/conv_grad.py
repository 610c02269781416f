"""Channels-last gradients for compiled training: a Conv2d whose backward hands cuDNN NHWC tensors it needs no copy of.

Compiled (torch 2.11), the SD 1.5 training step at 512 px spent 13.6 ms of ~225 in 96 copy kernels launched by
``aten::convolution_backward`` itself (bench/results/profile_train512_compiled_copies.txt): cuDNN's bf16 kernels
run NHWC, but the output gradient (and the input where the partitioner recomputes it) arrives from Inductor's
fused kernels in NCHW. Inductor keeps its channels-last layout pass off for the U-Net (some convolutions have
fewer output than input channels), and it gives a single-use buffer feeding ``convolution_backward`` the default
contiguous layout, so ATen copies it into NHWC first.

``ChannelsLastGradConv2d`` computes the same forward (``F.conv2d``) and the same backward
(``aten.convolution_backward``), only through a custom op, ``ldm::conv2d_backward``, whose inputs are asked for
in channels-last order (``grad.contiguous(memory_format=channels_last)`` before the call, and the op's fixed
stride order): Inductor can then write those tensors NHWC from the kernels that produce them, and the copies go.
The bias gradient is a sum outside the op, which Inductor fuses (as its decomposition of ``convolution_backward``
does). The numbers are the same kernels' on the same values. ``set_channels_last_grads(module, on)`` switches a
model's plain ``nn.Conv2d`` (zero padding, 2-D) in place by class, as ldm/norms.py does; parameter names and the
state dict do not change. Under autocast the weight, bias and input are cast to the autocast dtype first, as
autocast would cast them for ``conv2d``, so mixed-precision training sees the same values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_TAGS = (torch.Tag.needs_fixed_stride_order,)


def _convolution_backward(grad: Tensor, x: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                          dilation: list[int], groups: int, mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """``aten.convolution_backward`` of a 2-D convolution: (grad_x, grad_weight, grad_bias); an empty tensor
    where ``mask`` (x, weight, bias) says the gradient is not wanted. The op's body and, on fake tensors, its
    fake implementation (ATen's meta kernel gives the shapes and strides)."""
    bias_sizes = [weight.shape[0]] if mask[2] else None
    outs = torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation, False,
                                               [0, 0], groups, mask)
    return tuple(o if o is not None else grad.new_empty(0) for o in outs)  # type: ignore[return-value]


conv2d_backward = torch.library.custom_op("ldm::conv2d_backward", _convolution_backward, mutates_args=(),
                                          tags=_TAGS)
conv2d_backward.register_fake(_convolution_backward)


class _Conv2dCL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geometry = (list(stride), list(padding), list(dilation), groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # (B, C_out, H', W')

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        cl = torch.channels_last
        grad = grad.contiguous(memory_format=cl)  # (B, C_out, H', W'), NHWC
        gx, gw, _ = conv2d_backward(grad, x.contiguous(memory_format=cl), weight, stride, padding, dilation, groups,
                                    [want_x, want_w, False])
        # The bias gradient outside the op, as Inductor's own convolution_backward decomposition does: compiled, the
        # sum fuses into the kernel that writes grad (ATen's NHWC bf16 sum inside the op took 4.7 ms per step).
        gb = grad.sum(dim=(0, 2, 3)) if want_b else None  # (C_out,)
        return gx if want_x else None, gw if want_w else None, gb, None, None, None, None


class ChannelsLastGradConv2d(nn.Conv2d):
    """nn.Conv2d with ``ldm::conv2d_backward`` as its backward where gradients flow; otherwise nn.Conv2d itself."""

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C_in, H, W)
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # what autocast does to conv2d's arguments, done before the Function
            if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                return super().forward(x)  # autocast leaves fp64 alone; so does this class
            dt = torch.get_autocast_dtype(dev)
            x, weight = x.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
        with torch.autocast(dev, enabled=False):
            return _Conv2dCL.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def set_channels_last_grads(module: nn.Module, on: bool = True) -> int:
    """Switch every plain 2-D, zero-padded nn.Conv2d in ``module`` to ChannelsLastGradConv2d (``on``) or back;
    subclasses (LoRA's) are left alone. Returns how many were switched."""
    n = 0
    for m in module.modules():
        if on and type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple):
            m.__class__ = ChannelsLastGradConv2d
            n += 1
        elif not on and type(m) is ChannelsLastGradConv2d:
            m.__class__ = nn.Conv2d
            n += 1
    return n
