"""ldm/conv_grad.py: ChannelsLastGradConv2d computes what nn.Conv2d computes, forward and backward, eager and
compiled, fp32 and under bf16 autocast; the switch swaps exactly the plain zero-padded convolutions."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bench.perf_measure import randomize_
from ldm.conditioning import Cond
from ldm.conv_grad import ChannelsLastGradConv2d, conv2d_backward, set_channels_last_grads
from ldm.lora import LoRAConfig, inject_lora
from ldm.speed import SpeedConfig, apply_speed, remove_speed
from ldm.unet import UNet, UNetConfig

GEOMETRIES = [  # (c_in, c_out, kernel, stride, padding, groups, bias)
    (8, 16, 3, 1, 1, 1, True),  # ResBlock / Upsample
    (16, 8, 3, 2, 1, 1, True),  # Downsample: in > out, strided
    (8, 12, 1, 1, 0, 1, False),  # a skip connection / proj_in without bias
    (8, 8, 3, 1, 1, 4, True),  # grouped
]


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """Relative to the tensor's largest entry as well as per element: gradients are sums whose order depends on
    the memory layout, so an entry that nearly cancels carries the sum's fp32 rounding, not its own."""
    got, want = got.detach(), want.detach()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def _grads(conv: nn.Module, x: torch.Tensor, autocast: bool = False, fn=None):
    conv.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = (fn or conv)(x)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)  # a fixed, non-uniform output gradient
    y.float().backward(g)
    return [y.float(), x.grad] + [p.grad for p in conv.parameters()]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_nn_conv2d_fp32(geometry, channels_last):
    c_in, c_out, k, s, p, groups, bias = geometry
    torch.manual_seed(0)
    ref = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, groups=groups, bias=bias)
    ours = copy.deepcopy(ref)
    assert set_channels_last_grads(ours) == 1 and type(ours) is ChannelsLastGradConv2d
    x = torch.randn(2, c_in, 9, 10, requires_grad=True)
    if channels_last:
        for m in (ref, ours):
            m.to(memory_format=torch.channels_last)
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    for a, b in zip(_grads(ref, x), _grads(ours, x)):
        # ours hands the backward NHWC tensors; the CPU kernel for that layout sums in another order (fp32 ~1e-6)
        _close(b, a)


def test_matches_nn_conv2d_under_bf16_autocast():
    """The autocast casts ours does by hand are autocast's: bf16 output and the fp32 parameters' gradients agree
    with nn.Conv2d under autocast (same bf16 operands; the NHWC backward may sum in another order)."""
    torch.manual_seed(1)
    ref = nn.Conv2d(8, 16, 3, padding=1).to(memory_format=torch.channels_last)
    ours = copy.deepcopy(ref)
    set_channels_last_grads(ours)
    x = torch.randn(2, 8, 12, 12).to(memory_format=torch.channels_last).requires_grad_()
    a, b = _grads(ref, x, autocast=True), _grads(ours, x, autocast=True)
    torch.testing.assert_close(b[0], a[0], rtol=0, atol=0)  # the same bf16 forward
    for u, v in zip(a[1:], b[1:]):
        assert v.dtype == u.dtype
        # bf16 gradients (x.grad) round at 2^-8 relative; parameter gradients are fp32 sums of bf16 products
        _close(v.float(), u.float(), rtol=8e-3)


def test_input_without_grad_and_no_grad_mode():
    """conv_in's input (the noisy latents) wants no gradient: only the weight's and bias's are computed.
    Without gradients the module is nn.Conv2d's forward itself."""
    torch.manual_seed(2)
    ref = nn.Conv2d(4, 8, 3, padding=1)
    ours = copy.deepcopy(ref)
    set_channels_last_grads(ours)
    x = torch.randn(2, 4, 8, 8)
    a, b = _grads(ref, x), _grads(ours, x)
    assert a[1] is None and b[1] is None
    for u, v in zip(a[2:], b[2:]):
        _close(v, u)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_compiled_matches_eager_reference():
    """Through torch.compile (Inductor on the CPU) the custom op and its layout request lower and give
    nn.Conv2d's eager numbers (fp32; Inductor's fused GroupNorm / SiLU kernels reorder sums: ~1e-6)."""
    torch.manual_seed(3)
    ref = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
                        nn.Conv2d(16, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 1, bias=False))
    ref.to(memory_format=torch.channels_last)
    ours = copy.deepcopy(ref)
    assert set_channels_last_grads(ours) == 3
    x = torch.randn(2, 8, 12, 12).to(memory_format=torch.channels_last).requires_grad_()
    compiled = torch.compile(ours, dynamic=False)
    for a, b in zip(_grads(ref, x), _grads(ours, x, fn=compiled)):
        _close(b, a)


def test_custom_op_registration():
    """torch.library's own checks of the op: schema, fake (meta) implementation against the real one, and that
    compiled graphs can call it; with every mask combination the conv_in case needs."""
    torch.manual_seed(4)
    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    w = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    g = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    for mask in ([True, True, True], [False, True, True], [False, True, False]):
        torch.library.opcheck(conv2d_backward, (g, x, w, [1, 1], [1, 1], [1, 1], 1, mask),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        gx, gw, gb = conv2d_backward(g, x, w, [1, 1], [1, 1], [1, 1], 1, mask)
        ref = torch.ops.aten.convolution_backward(g, x, w, [8], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)
        for got, want, wanted in zip((gx, gw, gb), ref, mask):
            if wanted:
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            else:
                assert want is None and got.numel() == 0


def test_switch_swaps_only_plain_zero_padded_convs():
    m = nn.ModuleDict({
        "plain": nn.Conv2d(4, 4, 3, padding=1),
        "reflect": nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        "same": nn.Conv2d(4, 4, 3, padding="same"),
        "inner": nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1)),
    })
    inject_lora(m, LoRAConfig(rank=2, target_modules=["inner.1"]))
    keys = list(m.state_dict())
    assert set_channels_last_grads(m) == 3  # "plain" and the adapter's own lora_down / lora_up
    assert type(m["plain"]) is ChannelsLastGradConv2d
    assert type(m["reflect"]) is nn.Conv2d and type(m["same"]) is nn.Conv2d
    assert type(m["inner"][1]).__name__ == "LoRAConv2d"  # a subclass: left alone
    assert list(m.state_dict()) == keys
    assert set_channels_last_grads(m, False) == 3 and type(m["plain"]) is nn.Conv2d


def test_speed_switch():
    """channels_last_grads: auto on for compiled CUDA channels-last training only; apply_speed switches every U-Net conv,
    remove_speed switches them back; the config key is validated by name."""
    assert SpeedConfig(compile="default").resolve("cuda", training=True).channels_last_grads
    assert not SpeedConfig().resolve("cuda", training=True).channels_last_grads  # not compiled: NCHW
    assert not SpeedConfig(channels_last=True).resolve("cuda", training=True).channels_last_grads  # eager: unmeasured
    assert not SpeedConfig(compile="default").resolve("cuda", training=False).channels_last_grads
    assert not SpeedConfig(compile="default").resolve("cpu", training=True).channels_last_grads
    with pytest.raises(ValueError, match=r"speed\.channels_last_grads"):
        SpeedConfig(channels_last_grads="yes")
    torch.manual_seed(5)
    # random weights: a fresh U-Net's zero-initialised output convolutions would make both outputs 0
    unet = randomize_(UNet(UNetConfig.sd15().tiny()), seed=5)
    n_conv = sum(type(m) is nn.Conv2d for m in unet.modules())
    x, t, cond = torch.randn(1, 4, 16, 16), torch.tensor([500]), Cond(context=torch.randn(1, 7, 24))
    before = unet(x, t, cond)
    assert before.abs().max() > 0.1  # the switched convolutions shape the output
    apply_speed(unet, SpeedConfig(channels_last_grads=True), training=True)
    assert sum(type(m) is ChannelsLastGradConv2d for m in unet.modules()) == n_conv > 0
    torch.testing.assert_close(unet(x, t, cond), before, rtol=0, atol=0)
    remove_speed(unet)
    assert sum(type(m) is nn.Conv2d for m in unet.modules()) == n_conv
