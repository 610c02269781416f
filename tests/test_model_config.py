"""ModelConfig: presets against the published original configs, consistency checks, YAML round trips, per-tower
overrides, and the component registry."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

import autoencoder  # noqa: F401  registers the vae component
import text_encoder  # noqa: F401  registers the text component
from ldm import components
from ldm.bundle import Bundle
from ldm.conditioning import Cond
from ldm.config import ConfigError, load_config, save_config, to_yaml
from ldm.model_config import ModelConfig, load_model_config
from ldm.schedule import DiscreteSchedule
from ldm.text_config import TextEncoderConfig

PRESETS = {"sd15": ModelConfig.sd15, "sd21_v": ModelConfig.sd21_v, "sd21_base": ModelConfig.sd21_base,
           "sdxl_base": ModelConfig.sdxl_base}  # fmt: skip
ALL = {**{k: f() for k, f in PRESETS.items()}, **{f"tiny_{f}": ModelConfig.tiny(f) for f in ("sd1", "sd2", "sdxl")}}


def test_presets_match_the_published_original_configs():
    # configs/stable-diffusion/v1-inference.yaml, v2-inference(-v).yaml, sgm's sd_xl_base.yaml
    sd15, sd21, base, xl = ModelConfig.sd15(), ModelConfig.sd21_v(), ModelConfig.sd21_base(), ModelConfig.sdxl_base()
    assert (sd15.family, sd15.diffusion.prediction, sd15.unet.context_dim, sd15.vae.scale_factor) == ("sd1", "eps", 768, 0.18215)
    assert (sd21.family, sd21.diffusion.prediction, sd21.unet.context_dim) == ("sd2", "v", 1024)  # parameterization: "v"
    assert (base.family, base.diffusion.prediction) == ("sd2", "eps")
    assert (xl.unet.context_dim, xl.unet.adm_in_channels, xl.vae.scale_factor) == (2048, 2816, 0.13025)
    assert [t.width for t in xl.text] == [768, 1280] and xl.pooled_dim == 1280
    for cfg in (sd15, sd21, xl):  # scale_linear betas 0.00085 -> 0.012 over 1000 steps, as all three yamls
        s = cfg.diffusion.schedule
        assert (s.beta_schedule, s.beta_start, s.beta_end, s.num_train_timesteps) == ("scaled_linear", 0.00085, 0.012, 1000)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@torch.no_grad()
def test_tiny_networks_fit_together(family):
    cfg = ModelConfig.tiny(family)
    torch.manual_seed(0)
    b = Bundle(cfg).eval()
    context, pooled = b.encode_prompts(["a cat", ""])
    assert context.shape == (2, 77, cfg.unet.context_dim)
    vector = None
    if family == "sdxl":  # pooled text ++ 6 size/crop ids x 256 sinusoidal features
        assert pooled.shape == (2, cfg.pooled_dim)
        vector = torch.cat([pooled, torch.randn(2, 6 * 256)], dim=-1)
    latent = b.vae.encode(torch.rand(2, 3, 16, 16) * 2 - 1, sample=False)
    out = b.denoiser()(latent, torch.tensor([1.0, 5.0]), Cond(context=context, vector=vector))
    assert out.shape == latent.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(ALL))
def test_yaml_round_trip(name, tmp_path):
    cfg = ALL[name]
    text = to_yaml(cfg)
    back = load_config(ModelConfig, yaml.safe_load(text))
    assert back == cfg
    assert isinstance(back.unet.channel_mult, tuple) and isinstance(back.vae.channel_mult, tuple)  # lists in YAML
    assert all(isinstance(t, TextEncoderConfig) for t in back.text)
    save_config(cfg, tmp_path / "model.yaml")
    assert load_model_config(tmp_path / "model.yaml") == cfg == load_config(ModelConfig, str(tmp_path / "model.yaml"))


def test_per_tower_overrides():
    cfg = ModelConfig.tiny("sdxl")
    b = load_model_config(cfg, ["text[1].layer=-3", "text[0].final_norm=true", "unet.num_head_channels=8"])
    assert (b.text[1].layer, b.text[0].final_norm, b.unet.num_head_channels) == (-3, True, 8)
    assert cfg.text[1].layer == "penultimate"  # the source is not modified
    # widths may change together; one validation at the end
    b = load_model_config(cfg, ["text[0].width=48", "text[0].heads=3", "unet.context_dim=80"])
    assert b.unet.context_dim == 80 and b.text[0].width == 48


@pytest.mark.parametrize("overrides,match", [
    (["text[2].layer=1"], r"text\[2\]: .*TextEncoderConfig"),
    (["text[0].bogus=1"], r"text\[0\].bogus: unknown key .*'bogus' not in 'TextEncoderConfig'"),
    (["text[0].heads=5"], r"must be divisible by heads \(5\)"),
    (["unet.context_dim=40"], r"unet.context_dim: 40 != 32 \+ 32, the summed widths"),
    (["unet.adm_in_channels=2816"], r"unet.adm_in_channels: SDXL's vector is the pooled text \(24\) plus 6"),
    (["text[1].return_pooled=false"], r"SDXL needs a tower with return_pooled=True"),
    (["family=sd1"], r"text: family 'sd1' has 1 text tower\(s\), got 2"),
    (["family=sd3"], r"family: 'sd3' is not an allowed value.*sd1, sd2, sdxl, custom"),
    (["vae.latent_channels=16"], r"unet.out_channels: 4 != vae.latent_channels \(16\)"),
])  # fmt: skip
def test_inconsistent_configs_are_rejected(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_model_config(ModelConfig.tiny("sdxl"), overrides)


def test_custom_family_relaxes_the_family_rules():
    cfg = load_model_config(ModelConfig.tiny("sdxl"), ["family=custom", "unet.adm_in_channels=100"])
    assert cfg.family == "custom" and cfg.unet.adm_in_channels == 100


def test_bundle_denoiser_uses_the_model_schedule_and_prediction():
    cfg = load_model_config(ModelConfig.tiny("sd2"), ["diffusion.schedule.zero_terminal_snr=true"])
    d = Bundle(cfg).denoiser()
    assert d.prediction == "v"
    assert torch.equal(d.schedule.alphas_cumprod, DiscreteSchedule(cfg.diffusion.schedule).alphas_cumprod)


# ---------------------------------------------------------------------------------------- registry


def test_registry_names_the_package_to_import(monkeypatch):
    monkeypatch.delitem(components._REGISTRY, "vae")
    with pytest.raises(KeyError, match=r"component 'vae' is not registered: import autoencoder \(inference and training do\)"):
        components.get_component("vae")
    with pytest.raises(KeyError, match="is not registered: import autoencoder"):
        Bundle(ModelConfig.tiny("sd1"))
    with pytest.raises(KeyError, match="unknown component 'controlnet'; known: conditions, text, unet, vae"):
        components.get_component("controlnet")


def test_registry_holds_the_three_networks(monkeypatch):
    assert {"unet", "vae", "text"} <= set(components.registered())
    spec = components.get_component("text")
    with pytest.raises(ValueError, match="has no original layout 'ldm'; known: hf, open_clip"):
        spec.original_map("ldm", "from")
    monkeypatch.setitem(components._REGISTRY, "text", spec)
    replaced = components.register_component(dataclasses.replace(spec, build=lambda cfg: torch.nn.Linear(1, 1)))
    assert components.get_component("text") is replaced
    with pytest.raises(TypeError, match="needs a ComponentSpec"):
        components.register_component("text")
