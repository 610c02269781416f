"""UNetEncoder.fuse_emb_projections (speed.fused_emb) and fuse_context_projections (speed.fused_context_kv): one
matmul for every ResBlock's time-embedding projection, and one for every cross-attention's keys and values, give the
output of the per-layer projections, follow in-place weight changes, and step aside for gradients and LoRA; the
switches' auto rules and round trip."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.conditioning import Cond
from ldm.lora import LoRAConfig, inject_lora
from ldm.speed import SpeedConfig, apply_speed, remove_speed
from ldm.unet import UNet, UNetConfig
from ldm.transformer import CrossAttention
from ldm.unet_blocks import EmbTable, ResBlock


def _unet(**overrides) -> UNet:
    torch.manual_seed(0)
    unet = UNet(UNetConfig.sd15().tiny(**overrides)).eval()
    with torch.no_grad():  # every weight random: the zero-initialised output convolutions would hide the blocks
        for p in unet.parameters():
            p.normal_(0, 0.1)
    return unet


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 20]),
            Cond(context=torch.randn(2, 7, 24, generator=g)))  # fmt: skip


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("scale_shift", [False, True])
def test_fused_matches_per_block_projections(scale_shift):
    unet = _unet(use_scale_shift_norm=scale_shift)
    x, t, cond = _inputs()
    with torch.no_grad():
        want = unet(x, t, cond)
        unet.fuse_emb_projections(True)
        got = unet(x, t, cond)
    blocks = [m for m in unet.modules() if isinstance(m, ResBlock)]
    widths = [b.emb_layers[1].out_features for b in blocks]
    assert unet.emb_fused_weight.shape == (sum(widths), unet.time_embed[2].out_features)
    assert [b.emb_columns[1] - b.emb_columns[0] for b in blocks] == widths
    assert "emb_fused_weight" not in unet.state_dict()
    _close(got, want)


def test_cache_follows_in_place_changes_and_fuse_off():
    unet = _unet()
    x, t, cond = _inputs()
    unet.fuse_emb_projections(True)
    with torch.no_grad():
        unet(x, t, cond)
        block = [m for m in unet.modules() if isinstance(m, ResBlock)][3]
        block.emb_layers[1].weight.normal_(0, 0.5)  # in place: the cache must notice
        got = unet(x, t, cond)
        unet.fuse_emb_projections(False)
        assert unet.emb_fused_weight is None and block.emb_columns is None
        _close(got, unet(x, t, cond))


def test_gradients_and_lora_take_the_per_block_path():
    unet = _unet()
    x, t, cond = _inputs()
    unet.fuse_emb_projections(True)
    assert unet._emb_fusable() is False  # parameters require grad and grad mode is on
    out = unet(x, t, cond)
    out.square().mean().backward()
    block = [m for m in unet.modules() if isinstance(m, ResBlock)][0]
    assert block.emb_layers[1].weight.grad is not None and block.emb_layers[1].weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert unet._emb_fusable()
    inject_lora(unet, LoRAConfig(rank=2, target_modules=("emb_layers.1",)))
    with torch.no_grad():
        assert not unet._emb_fusable()


def test_emb_table_without_columns_is_a_named_error():
    block = ResBlock(8, 16, 8, groups=4)
    with pytest.raises(RuntimeError, match="emb_columns"):
        block(torch.randn(1, 8, 4, 4), EmbTable(torch.randn(4, 8)))


def test_speed_switch():
    assert SpeedConfig().resolve("cuda").fused_emb
    assert not SpeedConfig().resolve("cuda", training=True).fused_emb
    assert not SpeedConfig().resolve("cpu").fused_emb
    with pytest.raises(ValueError, match=r"speed\.fused_emb"):
        SpeedConfig(fused_emb=1)
    unet = _unet()
    x, t, cond = _inputs()
    with torch.no_grad():
        want = unet(x, t, cond)
        apply_speed(unet, SpeedConfig(fused_emb=True))
        assert unet.emb_fused_weight is not None  # built eagerly
        _close(unet(x, t, cond), want)
        remove_speed(unet)
    assert unet.emb_fused is False and unet.emb_fused_weight is None
    assert all(m.emb_columns is None for m in unet.modules() if isinstance(m, ResBlock))
    assert type(unet.time_embed[2]) is nn.Linear


def _fuse_layers(unet: UNet, on: bool = True) -> list[CrossAttention]:
    for m in unet.modules():
        if isinstance(m, CrossAttention):
            m.fuse_projections(on)
    return [m for m in unet.modules() if isinstance(m, CrossAttention) and m.is_cross]


def test_fused_context_kv_matches_per_layer_projections():
    unet = _unet()
    x, t, cond = _inputs()
    with torch.no_grad():
        want = unet(x, t, cond)
        cross = _fuse_layers(unet)
        unet.fuse_context_projections(True)
        assert unet._context_fusable(cond.context)
        got = unet(x, t, cond)
        widths = [a.to_k.out_features + a.to_v.out_features for a in cross]
        assert unet.context_fused_weight.shape == (sum(widths), 24)
        assert [a.kv_columns[1] - a.kv_columns[0] for a in cross] == widths and cross[0].kv_columns[0] == 0
        _close(got, want)
        cross[-1].to_v.weight.normal_(0, 0.5)  # in place: the cache must notice
        got = unet(x, t, cond)
        unet.fuse_context_projections(False)
        assert unet.context_fused_weight is None and all(a.kv_columns is None for a in cross)
        _close(got, unet(x, t, cond))
    assert "context_fused_weight" not in unet.state_dict()


def test_fused_context_kv_needs_the_layers_fused_and_no_gradients():
    unet = _unet()
    x, t, cond = _inputs()
    unet.fuse_context_projections(True)
    with torch.no_grad():
        assert not unet._context_fusable(cond.context)  # the layers' own fuse_projections is off
        _fuse_layers(unet)
        assert unet._context_fusable(cond.context)
    assert not unet._context_fusable(cond.context)  # gradients on
    with torch.no_grad():
        inject_lora(unet, LoRAConfig(rank=2, target_modules=("attn2.to_k",)))
        assert not unet._context_fusable(cond.context)
        unet(x, t, cond)  # the per-layer path runs


def test_context_switch():
    assert SpeedConfig().resolve("cuda").fused_context_kv
    assert not SpeedConfig().resolve("cuda", training=True).fused_context_kv
    assert not SpeedConfig().resolve("cpu").fused_context_kv
    with pytest.raises(ValueError, match=r"speed\.fused_context_kv"):
        SpeedConfig(fused_context_kv="on")
    unet = _unet()
    x, t, cond = _inputs()
    with torch.no_grad():
        want = unet(x, t, cond)
        apply_speed(unet, SpeedConfig(fused_qkv=True, fused_context_kv=True))
        assert unet.context_fused_weight is not None  # built eagerly
        _close(unet(x, t, cond), want)
        remove_speed(unet)
    assert unet.context_fused is False and unet.context_fused_weight is None
