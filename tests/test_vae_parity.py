"""Our AutoencoderKL (original LDM layout) against diffusers' AutoencoderKL with the same random weights.

Every parameter of the reference is randomized (norm scales around 1, everything else around 0), so a
swapped, transposed or unused tensor changes the outputs. fp32 on CPU; tolerance 1e-5 relative.
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    NonFiniteOutputError,
    config_from_diffusers,
    config_to_diffusers,
    diffusers_to_ours,
    original_to_ours,
    ours_to_diffusers,
)
from autoencoder.keys import key_pairs
from tests.fakes import rel_err

TOL = 1e-5

# Two tiny shapes: 2 levels x 2 resnets with 16 groups (nin_shortcut in encoder and decoder),
# and the 3-level, 1-resnet tiny preset with 8 groups.
CONFIGS = {
    "2lvl": AutoencoderConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=2, norm_num_groups=16),
    "tiny": AutoencoderConfig.tiny(),
}


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")  # GroupNorm gamma: around 1
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if is_norm_scale else 0.0))
    return module.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    """(our config, our model, diffusers model) with identical random weights."""
    cfg = CONFIGS[request.param]
    ref = randomize_(DiffusersAutoencoderKL(**config_to_diffusers(cfg)), seed=0)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(diffusers_to_ours(ref.state_dict(), cfg), strict=True)
    return cfg, ours, ref


def image(b=2, h=32, w=48, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------ outputs


@torch.no_grad()
def test_moments_match_diffusers_posterior(pair):
    cfg, ours, ref = pair
    x = image()
    mean, logvar = ours.moments(x)
    post = ref.encode(x).latent_dist
    f = cfg.downsample_factor
    assert mean.shape == (2, cfg.latent_channels, 32 // f, 48 // f)
    assert rel_err(mean, post.mean) < TOL
    assert rel_err(logvar, post.logvar) < TOL


@torch.no_grad()
def test_logvar_clamp_matches_original_range(pair):
    cfg, ours, ref = pair
    ours, ref = copy.deepcopy(ours), copy.deepcopy(ref)
    z = cfg.latent_channels
    for m in (ours.quant_conv, ref.quant_conv):  # push half of the logvar channels far out of range
        m.bias[z : z + z // 2] += 200.0
        m.bias[z + z // 2 :] -= 200.0
    _, logvar = ours.moments(image())
    ref_logvar = ref.encode(image()).latent_dist.logvar
    assert torch.equal(logvar[:, : z // 2], torch.full_like(logvar[:, : z // 2], 20.0))
    assert torch.equal(logvar[:, z // 2 :], torch.full_like(logvar[:, z // 2 :], -30.0))
    assert torch.equal(logvar, ref_logvar)


@torch.no_grad()
def test_encode_mean_is_scaled_diffusers_mean(pair):
    cfg, ours, ref = pair
    x = image()
    expected = ref.encode(x).latent_dist.mean * ref.config.scaling_factor  # what SD pipelines feed the U-Net
    assert rel_err(ours.encode(x, sample=False), expected) < TOL


@torch.no_grad()
def test_encode_sample_matches_diffusers_with_same_generator(pair):
    cfg, ours, ref = pair
    x = image()
    got = ours.encode(x, generator=torch.Generator().manual_seed(7))
    expected = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7)) * cfg.scale_factor
    assert rel_err(got, expected) < TOL


@torch.no_grad()
def test_per_row_generators_match_diffusers_and_do_not_depend_on_batch(pair):
    cfg, ours, ref = pair
    x = image(b=3)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4, 5)]  # noqa: E731
    got = ours.encode(x, generator=gens())
    expected = ref.encode(x).latent_dist.sample(generator=gens()) * cfg.scale_factor
    assert rel_err(got, expected) < TOL
    alone = ours.encode(x[1:2], generator=[torch.Generator().manual_seed(4)])  # row 1 encoded on its own
    assert rel_err(alone, got[1:2]) < TOL  # equal up to batched-conv rounding
    with pytest.raises(ValueError, match="one torch.Generator per batch row"):
        ours.encode(x, generator=gens()[:2])


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    cfg, ours, ref = pair
    latent = torch.randn(2, cfg.latent_channels, 6, 10, generator=torch.Generator().manual_seed(2))
    expected = ref.decode(latent / ref.config.scaling_factor).sample  # the SD pipelines' unscaling
    got = ours.decode(latent)
    assert got.shape == (2, 3, 6 * cfg.downsample_factor, 10 * cfg.downsample_factor)
    assert rel_err(got, expected) < TOL


@torch.no_grad()
def test_shift_factor_is_subtracted_before_scaling():
    cfg = AutoencoderConfig.tiny(scale_factor=1.5, shift_factor=0.25, use_quant_conv=False)
    ref = randomize_(DiffusersAutoencoderKL(**config_to_diffusers(cfg)), seed=3)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(diffusers_to_ours(ref.state_dict(), cfg), strict=True)
    assert ours.quant_conv is None and ref.quant_conv is None
    x = image(b=1)
    expected = (ref.encode(x).latent_dist.mean - 0.25) * 1.5  # SD3-style pipelines
    assert rel_err(ours.encode(x, sample=False), expected) < TOL
    latent = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    assert rel_err(ours.decode(latent), ref.decode(latent / 1.5 + 0.25).sample) < TOL


# ------------------------------------------------------------------------------------------ key maps


def test_key_map_covers_both_layouts_exactly(pair):
    cfg, ours, ref = pair
    pairs = key_pairs(cfg)
    assert {o for o, _ in pairs} == set(ours.state_dict())
    assert {d for _, d in pairs} == set(ref.state_dict())
    assert len(pairs) == len(ours.state_dict())


def test_round_trip_diffusers_ours_diffusers_is_bitwise(pair):
    cfg, _, ref = pair
    sd = ref.state_dict()
    back = ours_to_diffusers(diffusers_to_ours(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


@torch.no_grad()
def test_independent_mapping_with_diffusers_single_file_converter(pair):
    """Our original-layout weights, converted by diffusers' own LDM converter, give the same outputs."""
    cfg, _, _ = pair
    ours = randomize_(AutoencoderKL(cfg), seed=11)  # weights that never went through our key map
    ckpt = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    ckpt["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # other parts of a full file
    dcfg = config_to_diffusers(cfg)
    ref = DiffusersAutoencoderKL(**dcfg).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(ckpt, dcfg), strict=True)
    x = image(b=1)
    mean, logvar = ours.moments(x)
    post = ref.encode(x).latent_dist
    assert rel_err(mean, post.mean) < TOL and rel_err(logvar, post.logvar) < TOL
    latent = torch.randn(1, cfg.latent_channels, 4, 6, generator=torch.Generator().manual_seed(5))
    assert rel_err(ours.decode(latent), ref.decode(latent / cfg.scale_factor).sample) < TOL
    # and our own loader of that file: strip the prefix, drop the rest
    ckpt["loss.discriminator.main.0.weight"] = torch.zeros(1)
    again = AutoencoderKL(cfg)
    again.load_state_dict(original_to_ours(ckpt), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_deprecated_diffusers_attention_names_are_accepted(pair):
    cfg, ours, ref = pair
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in ref.state_dict().items():
        for new, dep in old_names.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{dep}.")
        old[k] = v
    assert any(".query." in k for k in old)
    converted = diffusers_to_ours(old, cfg)
    for k, v in ours.state_dict().items():
        assert torch.equal(converted[k], v), k


def test_key_map_rejects_mismatched_state_dicts(pair):
    cfg, _, ref = pair
    sd = dict(ref.state_dict())
    sd.pop("decoder.conv_out.bias")
    sd["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="1 missing.*1 unexpected"):
        diffusers_to_ours(sd, cfg)
    with pytest.raises(ValueError, match="channel_mult"):
        key_pairs(AutoencoderConfig(base_channels=32, channel_mult=(2, 2), norm_num_groups=8))


def test_config_round_trips_through_diffusers_config(pair):
    cfg, _, ref = pair
    assert config_from_diffusers(dict(ref.config)) == cfg
    with pytest.raises(ValueError, match="act_fn"):
        config_from_diffusers({**dict(ref.config), "act_fn": "gelu"})


# ------------------------------------------------------------------------------------------ construction


def test_full_size_parameter_count_on_meta_device():
    """83,653,863 parameters: the published SD 1.x/2.x VAE (stable-diffusion-v1-5 'vae' = diffusers
    AutoencoderKL with block_out_channels (128, 256, 512, 512), layers_per_block 2), counted here on a
    diffusers model built on the meta device, i.e. without allocating memory."""
    with torch.device("meta"):
        ours = AutoencoderKL(AutoencoderConfig.sd())
        xl = AutoencoderKL(AutoencoderConfig.sdxl())
        ref = DiffusersAutoencoderKL(**config_to_diffusers(AutoencoderConfig.sd()))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert all(p.is_meta for p in ours.parameters())
    assert count(ref) == 83_653_863
    assert count(ours) == count(xl) == 83_653_863
    assert AutoencoderConfig.sd().downsample_factor == 8
    assert (AutoencoderConfig.sd().scale_factor, AutoencoderConfig.sdxl().scale_factor) == (0.18215, 0.13025)
    assert {tuple(v.shape) for k, v in ours.state_dict().items() if k.endswith("attn_1.q.weight")} == {(512, 512, 1, 1)}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(latent_channels=0), "latent_channels"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(channel_mult=(1, 0)), "channel_mult"),
        (dict(norm_num_groups=48), "norm_num_groups"),
        (dict(scale_factor=0.0), "scale_factor"),
        (dict(shift_factor=float("nan")), "shift_factor"),
        (dict(num_res_blocks=1.5), "num_res_blocks"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderConfig(**kwargs)


def test_config_accepts_lists_from_yaml_and_round_trips_through_a_dict():
    assert AutoencoderConfig(channel_mult=[1, 2, 4, 4]).channel_mult == (1, 2, 4, 4)
    cfg = AutoencoderConfig.sdxl()
    assert cfg.to_dict()["channel_mult"] == [1, 2, 4, 4]  # plain types, for YAML / JSON
    assert AutoencoderConfig(**cfg.to_dict()) == cfg


@torch.no_grad()
def test_bad_inputs_raise_value_errors(pair):
    cfg, ours, _ = pair
    f = cfg.downsample_factor
    with pytest.raises(ValueError, match="3 channels"):
        ours.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=f"multiples of the downsampling factor {f}"):
        ours.moments(torch.zeros(1, 3, 32, 32 + 1))
    with pytest.raises(ValueError, match="image must be a"):
        ours.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="latent must"):
        ours.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="latent must be a"):
        ours.decode(torch.zeros(4, 4, 4))


# ------------------------------------------------------------------------------------------ NaN safety


def nan_in_reduced_precision(monkeypatch, vae: AutoencoderKL, always: bool = False) -> None:
    """Make the decoder return NaN when it runs in bf16/fp16 (or always), like an fp16 overflow."""
    real = vae.decoder.forward

    def forward(z):
        out = real(z)
        return out * float("nan") if always or z.dtype in (torch.float16, torch.bfloat16) else out

    monkeypatch.setattr(vae.decoder, "forward", forward)


@torch.no_grad()
def test_half_precision_nan_is_recomputed_in_float32(monkeypatch):
    cfg = AutoencoderConfig.tiny()
    vae = randomize_(AutoencoderKL(cfg), seed=4).to(torch.bfloat16)
    expected = copy.deepcopy(vae).float().decode(torch.ones(1, 4, 4, 4)).to(torch.bfloat16)  # same weights, fp32
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    nan_in_reduced_precision(monkeypatch, vae)
    latent = torch.ones(1, 4, 4, 4, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="float32"):
        got = vae.decode(latent)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert torch.equal(got, expected)
    after = vae.state_dict()  # the module is left exactly as it was
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], v) for k, v in before.items())
    with pytest.warns(RuntimeWarning):  # tiled decode goes through the same guard, tile by tile
        tiled = vae.decode(torch.ones(1, 4, 8, 8, dtype=torch.bfloat16), tile=4, tile_overlap=2)
    assert torch.isfinite(tiled).all()


@torch.no_grad()
def test_non_finite_decode_raises_instead_of_returning_nan(monkeypatch):
    vae = randomize_(AutoencoderKL(AutoencoderConfig.tiny()), seed=4)
    nan_in_reduced_precision(monkeypatch, vae, always=True)
    with pytest.raises(NonFiniteOutputError, match="NaN"):
        vae.decode(torch.ones(1, 4, 4, 4))  # fp32: nothing to retry
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteOutputError, match="even in float32"):
        vae.to(torch.bfloat16).decode(torch.ones(1, 4, 4, 4, dtype=torch.bfloat16))


@torch.no_grad()
def test_non_finite_latent_is_reported_as_bad_input():
    vae = randomize_(AutoencoderKL(AutoencoderConfig.tiny()), seed=4)
    latent = torch.ones(1, 4, 4, 4)
    latent[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="latent contains 1 NaN"):
        vae.decode(latent)
