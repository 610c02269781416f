"""ldm/unet_blocks.cat_channels, the up path's skip concatenation: torch.cat's values whatever the layout, written
channels-last when both inputs are (so Inductor cannot lay the result out NCHW), torch.cat itself otherwise."""
from __future__ import annotations

import pytest
import torch

from ldm.unet_blocks import cat_channels

CL = torch.channels_last


def inputs(h_layout, skip_layout):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 6, 5, 7, generator=g)  # (B, C, H, W): C differs from the skip's, H != W
    skip = torch.randn(2, 4, 5, 7, generator=g)
    return h.contiguous(memory_format=h_layout), skip.contiguous(memory_format=skip_layout)


def test_channels_last_inputs_give_torch_cat_values_channels_last():
    h, skip = inputs(CL, CL)
    out = cat_channels(h, skip)
    assert torch.equal(out, torch.cat([h, skip], dim=1))
    assert out.shape == (2, 10, 5, 7) and out.is_contiguous(memory_format=CL)
    assert torch.equal(out[:, :6], h) and torch.equal(out[:, 6:], skip)  # h first, then the skip


@pytest.mark.parametrize("layouts", [(torch.contiguous_format,) * 2, (CL, torch.contiguous_format),
                                     (torch.contiguous_format, CL)])  # fmt: skip
def test_other_layouts_are_torch_cat(layouts):
    h, skip = inputs(*layouts)
    out, ref = cat_channels(h, skip), torch.cat([h, skip], dim=1)
    assert torch.equal(out, ref) and out.stride() == ref.stride()


def test_compiled_matches_eager():
    h, skip = inputs(CL, CL)
    f = torch.compile(lambda a, b: torch.nn.functional.silu(cat_channels(a * 2, b + 1)), backend="inductor")
    ref = torch.nn.functional.silu(torch.cat([h * 2, skip + 1], dim=1))
    torch.testing.assert_close(f(h, skip), ref, rtol=1e-6, atol=1e-6)  # fp32; Inductor may fuse the silu differently
