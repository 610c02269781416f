"""Our U-Net against diffusers' UNet2DConditionModel (an independent implementation) with the same random weights.

Each case is a tiny network with the shape features of a published one; its diffusers config is written
out by hand below, with diffusers' quirks (see DIFFUSERS_CONFIGS). Every weight is randomized (diffusers'
and the original's zero-inits would hide whole paths). Error measure everywhere:
max |ours - ref| / max |ref| (fp32, CPU).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from ldm.attention import xformers_available
from ldm.conditioning import Cond
from ldm.unet import UNet, UNetConfig
from ldm.unet_keys import diffusers_to_ours, ours_to_diffusers

TOL = 1e-5

# Our tiny configs (UNetConfig.<preset>().tiny(): 32 base channels, multipliers and depths capped at 2,
# 8 norm groups, 24-wide context, 2 heads (SD1) or 16-wide heads (SD2, XL), 40-wide vector (XL)).
CONFIGS = {
    "sd1": UNetConfig.sd15().tiny(),
    "sd1_inpaint_scaleshift": UNetConfig.sd15(in_channels=9, use_scale_shift_norm=True).tiny(),
    "sd2": UNetConfig.sd21().tiny(),
    "sdxl": UNetConfig.sdxl_base().tiny(),
}

_COMMON = dict(
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=24,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
DIFFUSERS_CONFIGS = {
    # SD1 quirk: diffusers' `attention_head_dim` is really the number of heads (8 in SD 1.x, 2 here).
    "sd1": dict(_COMMON, attention_head_dim=2),
    "sd1_inpaint_scaleshift": dict(_COMMON, attention_head_dim=2, in_channels=9, resnet_time_scale_shift="scale_shift"),
    # SD2: heads per level (channels / 16-wide heads: 32/16, 64/16, ...; the last entry is the mid block's).
    "sd2": dict(_COMMON, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True),
    # SDXL: no attention on level 0; transformer_layers_per_block per level (the mid block takes the last);
    # the vector is [text_embeds (16), sinusoidal embeddings of 6 size/crop ids (6 x 4)] = 40 wide.
    "sdxl": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=24,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 2, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=40,
    ),
}
SIZES = {"sd1": (8, 8), "sd1_inpaint_scaleshift": (8, 8), "sd2": (10, 12), "sdxl": (8, 8)}  # sd2: not divisible by 8


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random: weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.05^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))
            for name, p in module.named_parameters(recurse=False):
                r = torch.randn(p.shape, generator=g)
                if name == "bias":
                    p.copy_(0.05 * r)
                elif is_norm:
                    p.copy_(1 + 0.1 * r)
                else:
                    p.copy_(r / math.sqrt(p[0].numel()))


def make_pair(name: str):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**DIFFUSERS_CONFIGS[name]).eval()
    randomize_(ref, seed=1)
    ours = UNet(cfg).eval()
    ours.load_state_dict(diffusers_to_ours(ref.state_dict(), cfg), strict=True)
    return cfg, ours, ref


def make_inputs(name: str, cfg: UNetConfig, ref: UNet2DConditionModel, B: int = 2):
    g = torch.Generator().manual_seed(2)
    H, W = SIZES[name]
    x = torch.randn(B, 4, H, W, generator=g)
    t = torch.tensor([3.0, 731.5])[:B]
    context = torch.randn(B, 7, cfg.context_dim, generator=g)
    concat = torch.randn(B, cfg.in_channels - 4, H, W, generator=g) if cfg.in_channels > 4 else None
    ref_kwargs, vector = {}, None
    if cfg.adm_in_channels:
        text_embeds = torch.randn(B, 16, generator=g)
        # (original height, width, crop top, left, target height, width) per image
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768.0, 1344, 16, 32, 1024, 1024]])[:B]
        ref_kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        with torch.no_grad():  # the vector as SDXL's conditioner builds it, with diffusers' own time projection
            vector = torch.cat([text_embeds, ref.add_time_proj(time_ids.flatten()).reshape(B, -1)], dim=-1)
    return x, t, Cond(context=context, vector=vector, concat=concat), ref_kwargs


def ref_forward(ref, x, t, cond, ref_kwargs, **extra):
    sample = x if cond.concat is None else torch.cat([x, cond.concat], dim=1)
    with torch.no_grad():
        return ref(sample, t, encoder_hidden_states=cond.context, **ref_kwargs, **extra).sample


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


# (backend, sdpa kernel): the reference formula, PyTorch's choice, and the kernels that exist on CPU.
BACKENDS = [("math", "auto"), ("sdpa", "auto"), ("sdpa", "math"), ("sdpa", "flash")]
with warnings.catch_warnings():  # not installed here: the probe's one warning is expected
    warnings.simplefilter("ignore")
    BACKENDS += [("xformers", "auto")] if xformers_available("cpu") else []


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers_every_backend(name):
    cfg, ours, ref = make_pair(name)
    x, t, cond, ref_kwargs = make_inputs(name, cfg, ref)
    expected = ref_forward(ref, x, t, cond, ref_kwargs)
    assert expected.abs().max() > 0.1  # randomized weights: the output is not near zero
    for backend, kernel in BACKENDS:
        ours.set_attention_backend(backend, kernel)
        with torch.no_grad():
            out = ours(x, t, cond)
        assert out.shape == expected.shape
        assert rel_err(out, expected) < TOL, (name, backend, kernel, rel_err(out, expected))


def test_pinned_kernel_reaches_every_layer():
    """The U-Net pins the SDPA kernel once around its forward; 'efficient' has no CPU implementation, so
    pinning it must make the forward fail (and only the pin can)."""
    cfg, ours, ref = make_pair("sd1")
    x, t, cond, _ = make_inputs("sd1", cfg, ref)
    ours.set_attention_backend("sdpa", "efficient")
    with pytest.raises(RuntimeError), torch.no_grad():
        ours(x, t, cond)
    with pytest.raises(ValueError, match="sdpa_kernel: unknown value 'fast'"):
        ours.set_attention_backend("sdpa", "fast")


def test_control_residuals_match_diffusers():
    """ControlNet residuals: one per input block (added to its skip), the last to the middle block's output."""
    cfg, ours, ref = make_pair("sd1")
    x, t, cond, ref_kwargs = make_inputs("sd1", cfg, ref)
    shapes = []
    blocks = [*ours.input_blocks, ours.middle_block]
    hooks = [b.register_forward_hook(lambda m, i, o: shapes.append(o.shape)) for b in blocks]
    with torch.no_grad():
        ours(x, t, cond)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(3)
    control = tuple(torch.randn(s, generator=g) for s in shapes)
    expected = ref_forward(
        ref, x, t, cond, ref_kwargs,
        down_block_additional_residuals=control[:-1], mid_block_additional_residual=control[-1],
    )  # fmt: skip
    with torch.no_grad():
        out = ours(x, t, Cond(context=cond.context, control=control))
        plain = ours(x, t, cond)
    assert rel_err(out, expected) < TOL
    assert rel_err(plain, expected) > 1e-2  # the residuals did change the output


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_key_map_round_trips_bit_for_bit(name):
    cfg, ours, ref = make_pair(name)
    theirs = ref.state_dict()
    back = ours_to_diffusers(diffusers_to_ours(theirs, cfg), cfg)
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)
    mine = ours.state_dict()
    again = diffusers_to_ours(ours_to_diffusers(mine, cfg), cfg)
    assert again.keys() == mine.keys()
    assert all(torch.equal(again[k], mine[k]) for k in mine)


def test_key_map_rejects_foreign_keys():
    cfg = CONFIGS["sd1"]
    with pytest.raises(ValueError, match="sd: keys not in the diffusers U-Net layout"):
        diffusers_to_ours({"down_blocks.0.resnets.0.nonsense.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="sd: keys not in the ours U-Net layout"):
        ours_to_diffusers({"model.diffusion_model.out.0.weight": torch.zeros(1)}, cfg)


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_our_layout_is_the_original_layout(name):
    """diffusers' own single-file converter (original LDM keys -> diffusers) reads our state dict as an original one."""
    cfg, ours, ref = make_pair(name)
    randomize_(ours, seed=5)  # weights of our own, not the ones mapped from diffusers
    original = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(original, ref.config)
    ref.load_state_dict(converted, strict=True)
    x, t, cond, ref_kwargs = make_inputs(name, cfg, ref)
    with torch.no_grad():
        out = ours(x, t, cond)
    assert rel_err(out, ref_forward(ref, x, t, cond, ref_kwargs)) < TOL


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = UNetConfig.sd15().tiny(channel_mult=(1, 2), transformer_depth=(1, 1), num_res_blocks=1)
    ours = UNet(cfg)
    randomize_(ours, seed=4)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0])
    cond = Cond(context=torch.randn(1, 3, cfg.context_dim, generator=g))
    grads = []
    for flag, kernel in [(False, "auto"), (True, "auto"), (True, "math")]:  # math: the recompute keeps the pin
        ours.zero_grad()
        ours.gradient_checkpointing = flag
        ours.set_attention_backend("sdpa", kernel)
        ours(x, t, cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
    # Same ops on the same inputs, recomputed: equal up to float reassociation in autograd accumulation.
    assert rel_err(grads[1], grads[0]) < TOL
    assert rel_err(grads[2], grads[0]) < TOL
