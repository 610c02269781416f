"""Our ControlNet (+ U-Net) against diffusers' ControlNetModel (+ UNet2DConditionModel) with the same random weights.

The networks are the tiny SD 1.x twins of test_unet_parity.py with a 2-channel hint (any number of hint channels
works). Every weight is randomized, the zero-initialised projections included (zeros would hide whole paths).
Error measure: max |ours - ref| / max |ref| per tensor (fp32, CPU). Weights reach ours three ways: diffusers'
state dict through our key map, an original-layout (``control_model.*``) safetensors file, and a diffusers
safetensors file; the original names are checked by hand and by diffusers' own single-file converter.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from diffusers import ControlNetModel, MultiControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError
from ldm.conditioning import Cond
from ldm.controlnet import ControlNet, ControlNetConfig, combine_residuals, control_active
from ldm.controlnet_keys import config_from_diffusers, diffusers_to_ours, ours_to_original, read_controlnet
from tests.test_unet_parity import CONFIGS, DIFFUSERS_CONFIGS, make_inputs, make_pair, randomize_, ref_forward, rel_err

TOL = 1e-5
HINT_CHANNELS = 2


def make_controlnet(seed: int, hint_channels: int = HINT_CHANNELS, global_pool: bool = False, name: str = "sd1"):
    # diffusers' ControlNetModel takes the U-Net's encoder fields (no up blocks, no out_channels).
    fields = {k: v for k, v in DIFFUSERS_CONFIGS[name].items() if k != "up_block_types"}
    ref = ControlNetModel(**fields, conditioning_channels=hint_channels, global_pool_conditions=global_pool)
    randomize_(ref.eval(), seed=seed)
    cfg = ControlNetConfig.from_unet(CONFIGS[name], hint_channels=hint_channels, global_pool=global_pool)
    ours = ControlNet(cfg).eval()
    ours.load_state_dict(diffusers_to_ours(ref.state_dict(), cfg), strict=True)
    return cfg, ours, ref


def make_hint(x: torch.Tensor, channels: int = HINT_CHANNELS, seed: int = 7) -> torch.Tensor:
    B, _, H, W = x.shape
    return torch.rand(B, channels, 8 * H, 8 * W, generator=torch.Generator().manual_seed(seed))  # image in [0, 1]


def ref_residuals(ref, x, t, cond, hint, scale, ref_kwargs=None):
    with torch.no_grad():
        down, mid = ref(x, t, encoder_hidden_states=cond.context, controlnet_cond=hint, conditioning_scale=scale,
                        return_dict=False, **(ref_kwargs or {}))  # fmt: skip
    return (*down, mid)


def assert_residuals_close(ours, theirs) -> float:
    assert len(ours) == len(theirs)
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, i
        assert b.abs().max() > 1e-3, i  # randomized zero convs: every residual is non-trivial
        worst = max(worst, rel_err(a, b))
        assert rel_err(a, b) < TOL, (i, rel_err(a, b))
    return worst


@pytest.mark.parametrize("name, global_pool", [("sd1", False), ("sd1", True), ("sdxl", False)])
def test_residuals_and_controlled_unet_match_diffusers(name, global_pool):
    """sdxl: no attention on level 0, the vector (pooled text + size embeddings) through label_emb."""
    unet_cfg, unet, ref_unet = make_pair(name)
    x, t, cond, ref_kwargs = make_inputs(name, unet_cfg, ref_unet)
    cfg, net, ref = make_controlnet(seed=11, global_pool=global_pool, name=name)
    hint = make_hint(x)
    expected = ref_residuals(ref, x, t, cond, hint, scale=0.7, ref_kwargs=ref_kwargs)
    with torch.no_grad():
        control = net(x, hint, t, cond, scale=0.7)
    assert [tuple(r.shape[:2]) for r in control] == [s[:2] for s in unet.block_shapes(2, 8, 8)]
    assert_residuals_close(control, expected)

    want = ref_forward(ref_unet, x, t, cond, ref_kwargs, down_block_additional_residuals=expected[:-1],
                       mid_block_additional_residual=expected[-1])  # fmt: skip
    with torch.no_grad():
        out = unet(x, t, replace(cond, control=control))
        plain = unet(x, t, cond)
    assert rel_err(out, want) < TOL, rel_err(out, want)
    assert rel_err(plain, want) > 1e-2  # the residuals did change the output


def test_weights_from_original_and_diffusers_safetensors_files(tmp_path):
    cfg, ours, ref = make_controlnet(seed=12)
    theirs = ref.state_dict()
    original = ours_to_original(diffusers_to_ours(theirs, cfg))

    # The original names, by hand (cldm/cldm.py: input_hint_block convs at 0, 2, ..., 14; zero_convs.{i}.0 ...).
    by_hand = {
        "control_model.input_hint_block.0.weight": "controlnet_cond_embedding.conv_in.weight",
        "control_model.input_hint_block.2.weight": "controlnet_cond_embedding.blocks.0.weight",
        "control_model.input_hint_block.4.bias": "controlnet_cond_embedding.blocks.1.bias",
        "control_model.input_hint_block.12.weight": "controlnet_cond_embedding.blocks.5.weight",
        "control_model.input_hint_block.14.weight": "controlnet_cond_embedding.conv_out.weight",
        "control_model.zero_convs.0.0.weight": "controlnet_down_blocks.0.weight",
        "control_model.zero_convs.11.0.bias": "controlnet_down_blocks.11.bias",
        "control_model.middle_block_out.0.weight": "controlnet_mid_block.weight",
        "control_model.time_embed.2.weight": "time_embedding.linear_2.weight",
        "control_model.input_blocks.0.0.weight": "conv_in.weight",
        "control_model.input_blocks.1.0.in_layers.0.weight": "down_blocks.0.resnets.0.norm1.weight",
        "control_model.input_blocks.1.1.proj_in.weight": "down_blocks.0.attentions.0.proj_in.weight",
        "control_model.input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        "control_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight":
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "control_model.middle_block.2.out_layers.3.weight": "mid_block.resnets.1.conv2.weight",
    }  # fmt: skip
    for orig, diff in by_hand.items():
        assert torch.equal(original[orig], theirs[diff]), orig
    # ... and every key by diffusers' own converter of original ControlNet files (independent of our map).
    back = convert_controlnet_checkpoint(original, ref.config)
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)

    unet_cfg, _, ref_unet = make_pair("sd1")
    x, t, cond, _ = make_inputs("sd1", unet_cfg, ref_unet)
    hint = make_hint(x)
    expected = ref_residuals(ref, x, t, cond, hint, scale=1.0)

    files = {"original": tmp_path / "control_sd15_tiny.safetensors"}
    save_file({k: v.contiguous() for k, v in original.items()}, files["original"])
    ref.save_pretrained(tmp_path / "diffusers", safe_serialization=True)
    files["diffusers"] = tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors"
    config = json.loads((tmp_path / "diffusers" / "config.json").read_text())
    assert ControlNetConfig(**config_from_diffusers(config)) == cfg

    for layout, path in files.items():
        net = ControlNet(cfg).eval()
        net.load_state_dict(read_controlnet(path, cfg), strict=True)
        with torch.no_grad():
            assert_residuals_close(net(x, hint, t, cond), expected)

    pickle = tmp_path / "control_sd15_tiny.pth"
    pickle.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"control_sd15_tiny.pth: .*\.safetensors files only"):
        read_controlnet(pickle, cfg)
    with pytest.raises(ValueError, match="sd: keys of the U-Net's up half are no part of a ControlNet"):
        diffusers_to_ours({**theirs, "up_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, cfg)


def test_from_unet_copies_the_encoder_and_adds_nothing():
    unet_cfg, unet, ref_unet = make_pair("sd1")
    x, t, cond, _ = make_inputs("sd1", unet_cfg, ref_unet)
    net = ControlNet.from_unet(unet, hint_channels=HINT_CHANNELS).eval()
    mine = net.state_dict()
    for k, v in unet.state_dict().items():
        if k.startswith(("time_embed.", "input_blocks.", "middle_block.")):
            assert torch.equal(mine[k], v), k
    with torch.no_grad():
        control = net(x, make_hint(x), t, cond)
        assert all(torch.count_nonzero(r) == 0 for r in control)  # zero convs: the paper's no-harm start
        assert torch.equal(unet(x, t, Cond(context=cond.context, control=control)), unet(x, t, cond))


def test_several_controlnets_sum_like_diffusers_multicontrolnet():
    unet_cfg, unet, ref_unet = make_pair("sd1")
    x, t, cond, ref_kwargs = make_inputs("sd1", unet_cfg, ref_unet)
    (_, net1, ref1), (_, net2, ref2) = make_controlnet(seed=13), make_controlnet(seed=14, hint_channels=3)
    h1, h2 = make_hint(x, seed=1), make_hint(x, channels=3, seed=2)
    scales = [0.5, 1.3]
    with torch.no_grad():
        down, mid = MultiControlNetModel([ref1, ref2])(
            x, t, encoder_hidden_states=cond.context, controlnet_cond=[h1, h2], conditioning_scale=scales,
            return_dict=False,
        )  # fmt: skip
        by_scale = combine_residuals([net1(x, h1, t, cond, scale=scales[0]), net2(x, h2, t, cond, scale=scales[1])])
        by_weight = combine_residuals([net1(x, h1, t, cond), net2(x, h2, t, cond)], weights=scales)
    assert_residuals_close(by_scale, (*down, mid))
    assert_residuals_close(by_weight, (*down, mid))
    want = ref_forward(ref_unet, x, t, cond, ref_kwargs, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid)  # fmt: skip
    with torch.no_grad():
        out = unet(x, t, Cond(context=cond.context, control=by_scale))
    assert rel_err(out, want) < TOL, rel_err(out, want)
    with pytest.raises(ValueError, match=r"weights: expected one per residual set \(2\), got 1"):
        combine_residuals([by_scale, by_weight], weights=[1.0])
    with pytest.raises(ValueError, match=r"residual_sets\[1\]: shapes"):
        combine_residuals([by_scale, by_scale[:-1]])


def test_bad_hint_is_refused_before_computation():
    unet_cfg, _, ref_unet = make_pair("sd1")
    x, t, cond, _ = make_inputs("sd1", unet_cfg, ref_unet)  # latent (2, 4, 8, 8): the image is 64 x 64
    _, net, _ = make_controlnet(seed=15)
    calls = []
    net.time_embed.register_forward_pre_hook(lambda m, a: calls.append(1))
    bad = {
        "latent-sized": torch.zeros(2, HINT_CHANNELS, 8, 8),
        "wrong channels": torch.zeros(2, 3, 64, 64),
        "wrong batch": torch.zeros(1, HINT_CHANNELS, 64, 64),
    }
    message = r"hint: expected shape \(2, 2, 64, 64\) = \(batch, controlnet.hint_channels"
    for hint in bad.values():
        with pytest.raises(ValueError, match=message):
            net(x, hint, t, cond)
    assert not calls
    with torch.no_grad():
        net(x, make_hint(x), t, cond)
    assert calls  # the hook does see a forward that computes


def test_unet_refuses_misshapen_control_residuals():
    unet_cfg, unet, ref_unet = make_pair("sd1")
    x, t, cond, _ = make_inputs("sd1", unet_cfg, ref_unet)
    control = [torch.zeros(s) for s in unet.block_shapes(2, 8, 8)]
    control[4] = torch.zeros(2, 64, 8, 8)  # input block 4 is at 4 x 4
    with pytest.raises(ValueError, match=r"cond.control\[4\]: expected shape \(2, 64, 4, 4\)"):
        unet(x, t, Cond(context=cond.context, control=tuple(control)))


def test_control_active_follows_diffusers_start_end_rule():
    n = 10
    # diffusers' pipelines: keep_i = 1 - float(i / n < start or (i + 1) / n > end)
    for start, end in [(0.0, 1.0), (0.2, 0.8), (0.0, 0.5), (0.35, 1.0), (0.05, 0.95)]:
        theirs = [1.0 - float(i / n < start or (i + 1) / n > end) == 1.0 for i in range(n)]
        assert [control_active(i, n, start, end) for i in range(n)] == theirs
    assert [i for i in range(n) if control_active(i, n, 0.2, 0.8)] == [2, 3, 4, 5, 6, 7]  # by hand
    assert [i for i in range(n) if control_active(i, n, 0.0, 0.5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="start, end: need 0 <= start < end <= 1"):
        control_active(0, n, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"step: must be in \[0, 10\)"):
        control_active(10, n)


def test_config_from_original_cldm_yaml():
    # control_stage_config.params of lllyasviel's models/cldm_v15.yaml and cldm_v21.yaml
    v15 = dict(image_size=32, in_channels=4, hint_channels=3, model_channels=320, attention_resolutions=[4, 2, 1],
               num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
               transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)  # fmt: skip
    v21 = dict(v15, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024)
    del v21["num_heads"]
    assert ControlNetConfig.from_original(v15) == ControlNetConfig.sd15()
    assert ControlNetConfig.from_original(v21) == ControlNetConfig.sd21()
    assert ControlNetConfig.from_original(dict(v15, hint_channels=1)).hint_channels == 1
