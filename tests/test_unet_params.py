"""Full-size U-Nets on the meta device (no memory, no data): parameter counts, layouts, config and input checks.

Parameter counts of the published U-Nets. The original repositories print them rounded when they build
the model ("DiffusionWrapper has 859.52 M params." in CompVis/stable-diffusion for v1-inference.yaml,
"865.91 M" in Stability-AI/stablediffusion for v2-inference.yaml; "2.6B parameters in the UNet" in the
SDXL paper, Podell et al. 2023); the exact integers are what diffusers' UNet2DConditionModel counts for
the published unet/config.json files (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
stabilityai/stable-diffusion-xl-base-1.0), which the test builds on the meta device and counts too:
  SD 1.5       859,520,964
  SD 2.x       865,910,724
  SDXL base  2,567,463,684
"""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from bench.perf_measure import randomize_
from ldm.conditioning import Cond
from ldm.unet import UNet, UNetConfig
from ldm.unet_keys import diffusers_to_ours

# The published diffusers unet/config.json files (fields that differ from UNet2DConditionModel's defaults).
_SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
)
PUBLISHED = {
    "sd15": (859_520_964, UNetConfig.sd15, dict(_SD_BLOCKS, attention_head_dim=8, cross_attention_dim=768)),
    "sd21": (
        865_910_724,
        UNetConfig.sd21,
        dict(_SD_BLOCKS, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True),
    ),
    "sdxl_base": (
        2_567_463_684,
        UNetConfig.sdxl_base,
        dict(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
    ),
}


def on_meta(build):
    with torch.device("meta"):
        return build()


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_full_size_parameter_counts_and_layout(name):
    expected, preset, diffusers_config = PUBLISHED[name]
    cfg = preset()
    ours = on_meta(lambda: UNet(cfg))
    theirs = on_meta(lambda: UNet2DConditionModel(**diffusers_config))
    assert all(p.is_meta for p in ours.parameters())
    assert count(ours) == expected
    assert count(theirs) == expected
    # Our key map on the full-size layout: same keys, same shapes.
    mine = ours.state_dict()
    mapped = diffusers_to_ours(theirs.state_dict(), cfg)
    assert mapped.keys() == mine.keys()
    assert all(mapped[k].shape == mine[k].shape for k in mine)
    # diffusers' own converter reads our state dict as an original single-file checkpoint.
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in mine.items()}, theirs.config)
    ref = theirs.state_dict()
    assert converted.keys() == ref.keys()
    assert all(converted[k].shape == ref[k].shape for k in ref)


def test_inpainting_adds_five_input_channels():
    """SD 1.5 inpainting: 4 latent + 1 mask + 4 masked-image channels; only conv_in grows (5 * 320 * 9 weights)."""
    ours = on_meta(lambda: UNet(UNetConfig.sd15(in_channels=9)))
    assert count(ours) == 859_520_964 + 5 * 320 * 3 * 3


# From the original repositories' yaml files (the U-Net's `params:` block, verbatim values).
ORIGINAL_PARAMS = {
    "sd15": dict(  # CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml
        image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False,
    ),
    "sd21": dict(  # Stability-AI/stablediffusion configs/stable-diffusion/v2-inference-v.yaml
        use_checkpoint=True, use_fp16=True, image_size=32, in_channels=4, out_channels=4, model_channels=320,
        attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64,
        use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=1, context_dim=1024,
        legacy=False,
    ),
    "sdxl_base": dict(  # Stability-AI/generative-models configs/inference/sd_xl_base.yaml
        adm_in_channels=2816, num_classes="sequential", use_checkpoint=True, in_channels=4, out_channels=4,
        model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
        num_head_channels=64, use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
        spatial_transformer_attn_type="softmax-xformers", legacy=False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ORIGINAL_PARAMS))
def test_presets_are_the_original_yaml_configs(name):
    assert UNetConfig.from_original(ORIGINAL_PARAMS[name]) == getattr(UNetConfig, name)()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attention="flash"), "attention: unknown backend 'flash'"),
        (dict(sdpa_kernel="fast"), "sdpa_kernel: unknown value 'fast'"),
        (dict(model_channels=100), r"model_channels \* channel_mult\[0\] = 100 is not divisible by norm_groups=32"),
        (dict(num_heads=7), "unet.num_heads=7 does not divide"),
        (dict(num_head_channels=48), "unet.num_head_channels=48 does not divide"),
        (dict(transformer_depth=(1, 1)), "unet.transformer_depth: needs one depth >= 0 per level"),
        (dict(channel_mult=()), "unet.channel_mult"),
        (dict(transformer_depth_middle=0), "unet.transformer_depth_middle"),
        (dict(in_channels=0), "unet.in_channels"),
        (dict(dropout=1.0), "unet.dropout"),
    ],
)
def test_bad_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**kwargs)


def test_lists_from_yaml_become_tuples():
    cfg = UNetConfig(channel_mult=[1, 2], transformer_depth=[0, 1])
    assert cfg.channel_mult == (1, 2) and cfg.transformer_depth == (0, 1)


@pytest.fixture(scope="module")
def tiny_xl():
    torch.manual_seed(0)
    cfg = UNetConfig.sdxl_base().tiny(channel_mult=(1, 2), transformer_depth=(0, 1), num_res_blocks=1)
    # random weights: with the zero-initialised output convolutions of a fresh U-Net every output is 0
    return randomize_(UNet(cfg), seed=0).eval()


def test_bad_inputs_are_rejected(tiny_xl):
    net, cfg = tiny_xl, tiny_xl.cfg
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0])
    ctx, vec = torch.randn(2, 3, cfg.context_dim), torch.randn(2, cfg.adm_in_channels)
    cases = [
        ((x[0], t, Cond(ctx, vec)), r"x: expected \(B, C, H, W\)"),
        ((x, t[:1], Cond(ctx, vec)), r"t: expected shape \(2,\)"),
        ((x, t, None), "cond.context: required"),
        ((x, t, Cond(ctx[..., :5], vec)), r"cond.context: expected \(2, T, 24\)"),
        ((x, t, Cond(ctx)), r"cond.vector: required with shape \(2, 40\)"),
        ((x, t, Cond(ctx, vec[:, :3])), "cond.vector: required"),
        ((x, t, Cond(ctx, vec, concat=torch.randn(2, 1, 8, 8))), "unet.in_channels=4"),
        ((x, t, Cond(ctx, vec, control=(x,))), "cond.control: expected 5 residuals"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            net(*args)


def test_vector_without_label_emb_is_rejected():
    net = UNet(UNetConfig.sd15().tiny(channel_mult=(1,), transformer_depth=(1,), num_res_blocks=1))
    with pytest.raises(ValueError, match="cond.vector: this U-Net takes no vector condition"):
        net(torch.randn(1, 4, 4, 4), torch.tensor([1.0]), Cond(torch.randn(1, 2, 24), torch.randn(1, 8)))


def test_scalar_timestep_and_model_dtype(tiny_xl):
    """A scalar t is broadcast; the time embedding is computed in fp32 and cast to the model's dtype."""
    net = tiny_xl
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = Cond(torch.randn(2, 3, 24, generator=g), torch.randn(2, 40, generator=g))
    with torch.no_grad():
        out = net(x, torch.tensor([10.0, 10.0]), cond)
        assert out.abs().max() > 0.1 and torch.equal(net(x, 10.0, cond), out)
        half = UNet(net.cfg).to(torch.bfloat16)
        half.load_state_dict(net.state_dict())
        out = half(x.bfloat16(), torch.tensor([999.0, 3.0]), cond)  # fp32 context/vector are cast to bf16
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 8, 8)
