"""Our T2I-Adapter (+ U-Net) vs diffusers' T2IAdapter("full_adapter") (+ UNet2DConditionModel), same random weights.

The adapter's widths are the tiny SD 1.x U-Net's levels (test_unet_parity.py's twins). The U-Net side is checked
for diffusers' ``down_intrablock_additional_residuals`` semantics on SD 1.x (every level but the last attends)
and SDXL (level 0 has no attention but a Downsample; the fourth feature goes after the middle block), the latter
with random features of the right shapes. Error measure: max |ours - ref| / max |ref| (fp32, CPU).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import MultiAdapter
from diffusers import T2IAdapter as RefAdapter

from ldm.controlnet import combine_residuals
from ldm.t2i_adapter import T2IAdapter, T2IAdapterConfig
from ldm.t2i_adapter_keys import config_from_diffusers, diffusers_to_ours, ours_to_diffusers
from tests.test_unet_parity import make_inputs, make_pair, randomize_, ref_forward, rel_err

TOL = 1e-5
CFG = T2IAdapterConfig(in_channels=3, channels=(32, 64, 64, 64), num_res_blocks=2, downscale_factor=8)


def make_adapter(seed: int, in_channels: int = 3):
    cfg = T2IAdapterConfig(**{**CFG.__dict__, "in_channels": in_channels})
    ref = RefAdapter(in_channels=in_channels, channels=list(cfg.channels), num_res_blocks=cfg.num_res_blocks,
                     downscale_factor=cfg.downscale_factor, adapter_type="full_adapter")  # fmt: skip
    randomize_(ref.eval(), seed=seed)
    ours = T2IAdapter(cfg).eval()
    ours.load_state_dict(diffusers_to_ours(ref.state_dict(), cfg), strict=True)
    return cfg, ours, ref


def make_hint(B: int, channels: int = 3, size: int = 64, seed: int = 7) -> torch.Tensor:
    return torch.rand(B, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_features_and_adapted_unet_match_diffusers():
    cfg, adapter, ref = make_adapter(seed=21)
    unet_cfg, unet, ref_unet = make_pair("sd1")
    x, t, cond, ref_kwargs = make_inputs("sd1", unet_cfg, ref_unet)  # latent 8 x 8: image 64 x 64
    hint = make_hint(2)
    scale = 0.8
    with torch.no_grad():
        expected = [f * scale for f in ref(hint)]  # diffusers' pipelines: features * adapter_conditioning_scale
        features = adapter(hint, scale=scale, latent_size=(8, 8))
    assert len(features) == len(expected) == 4
    for a, b in zip(features, expected):
        assert a.shape == b.shape
        assert rel_err(a, b) < TOL, rel_err(a, b)

    # diffusers pops (and adds in place) from the list it is given: hand it copies.
    copies = [f.clone() for f in expected]
    want = ref_forward(ref_unet, x, t, cond, ref_kwargs, down_intrablock_additional_residuals=copies)
    with torch.no_grad():
        out = unet(x, t, cond, adapter=features)
        plain = unet(x, t, cond)
    assert rel_err(out, want) < TOL, rel_err(out, want)
    assert rel_err(plain, want) > 1e-2  # the features did change the output


def test_sdxl_injection_points_match_diffusers():
    """Level 0 of SDXL has no attention: diffusers adds its feature after the Downsample (in place, so the skip
    sees it too); a fourth feature goes after the middle block (T2I-Adapter-XL)."""
    unet_cfg, unet, ref_unet = make_pair("sdxl")
    x, t, cond, ref_kwargs = make_inputs("sdxl", unet_cfg, ref_unet)
    shapes = unet.block_shapes(2, 8, 8)
    slots = unet.adapter_slots()
    assert slots == [3, 5, 8, 9]  # by hand: n = 2 blocks a level; 3 = level 0's Downsample, 9 = the middle block
    g = torch.Generator().manual_seed(5)
    features = [torch.randn(shapes[s], generator=g) for s in slots]
    assert [tuple(f.shape) for f in features] == [(2, 32, 4, 4), (2, 64, 4, 4), (2, 64, 2, 2), (2, 64, 2, 2)]
    copies = [f.clone() for f in features]
    want = ref_forward(ref_unet, x, t, cond, ref_kwargs, down_intrablock_additional_residuals=copies)
    with torch.no_grad():
        out = unet(x, t, cond, adapter=features)
        three = unet(x, t, cond, adapter=features[:3])
    assert rel_err(out, want) < TOL, rel_err(out, want)
    assert rel_err(three, want) > 1e-3  # the middle block's feature counts


def test_key_map_is_the_original_layout_and_round_trips():
    cfg, ours, ref = make_adapter(seed=22)
    theirs = ref.state_dict()
    mine = diffusers_to_ours(theirs, cfg)
    # TencentARC's Adapter (num_res_blocks = 2): body[l * 2 + j]; in_conv on a level's first block where widths change
    by_hand = {
        "conv_in.weight": "adapter.conv_in.weight",
        "body.0.block1.weight": "adapter.body.0.resnets.0.block1.weight",
        "body.1.block2.bias": "adapter.body.0.resnets.1.block2.bias",
        "body.2.in_conv.weight": "adapter.body.1.in_conv.weight",
        "body.3.block2.weight": "adapter.body.1.resnets.1.block2.weight",
        "body.7.block1.bias": "adapter.body.3.resnets.1.block1.bias",
    }
    for k, d in by_hand.items():
        assert torch.equal(mine[k], theirs[d]), k
    assert "body.4.in_conv.weight" not in mine  # 64 -> 64: no in_conv
    assert mine.keys() == ours.state_dict().keys()
    back = ours_to_diffusers(mine, cfg)
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)
    assert T2IAdapterConfig(**config_from_diffusers(ref.config)) == cfg
    with pytest.raises(ValueError, match="sd: keys not in the diffusers T2I-Adapter layout"):
        diffusers_to_ours({**theirs, "adapter.body.9.resnets.0.block1.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="adapter_type='full_adapter_xl'"):
        config_from_diffusers({**ref.config, "adapter_type": "full_adapter_xl"})


def test_several_adapters_sum_like_diffusers_multiadapter():
    (_, a1, r1), (_, a2, r2) = make_adapter(seed=23), make_adapter(seed=24, in_channels=1)
    h1, h2 = make_hint(2, seed=1), make_hint(2, channels=1, seed=2)
    weights = [0.6, 1.5]
    with torch.no_grad():
        expected = MultiAdapter([r1, r2])([h1, h2], adapter_weights=weights)  # one hint per adapter
        ours = combine_residuals([a1(h1), a2(h2)], weights=weights)
    for a, b in zip(ours, expected):
        assert rel_err(a, b) < TOL, rel_err(a, b)


def test_bad_hint_and_features_are_refused():
    _, adapter, _ = make_adapter(seed=25)
    with pytest.raises(ValueError, match=r"hint: expected \(B, 3, H, W\) \(t2i_adapter.in_channels\)"):
        adapter(make_hint(2, channels=1))
    with pytest.raises(ValueError, match=r"hint: expected \(B, 3, 64, 64\) = 8 x the latent's 8 x 8"):
        adapter(make_hint(2, size=32), latent_size=(8, 8))
    with pytest.raises(ValueError, match="multiples of t2i_adapter.downscale_factor=8"):
        adapter(make_hint(2, size=60))
    unet_cfg, unet, ref_unet = make_pair("sd1")
    x, t, cond, _ = make_inputs("sd1", unet_cfg, ref_unet)
    with torch.no_grad():
        features = list(adapter(make_hint(2, size=128)))  # features for a 16 x 16 latent
    with pytest.raises(ValueError, match=r"adapter\[0\]: expected shape \(2, 32, 8, 8\) \(the output of input block 2"):
        unet(x, t, cond, adapter=features)
    with pytest.raises(ValueError, match="adapter: expected 1 to 5 features"):
        unet(x, t, cond, adapter=[])
