"""Original single-file checkpoints: load_bundle against diffusers / transformers / open_clip references.

The files are built without our key maps: random tensors in the original LDM / SGM layout, the same tensors loaded
into the references through diffusers' own single-file converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, strict) whose configs diffusers derives from original-style YAML parameters
(``create_*_diffusers_config_from_ldm``); text towers come from transformers' CLIPTextModel (SD 1.x, SDXL CLIP-L:
the file layout ``text_model.*``) and open_clip's CLIP (SD 2.x, SDXL bigG, by identity, as the original embedders
hold them). The original key names of U-Net and VAE are taken from our modules' shapes; diffusers' strict load
proves they are the original ones. fp32 on CPU; error measure max |ours - ref| / max |ref| < 1e-5.
"""
from __future__ import annotations

import dataclasses
import math
import pickle
from functools import lru_cache

import open_clip
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)  # fmt: skip
from safetensors.torch import load_file, save_file

import autoencoder  # noqa: F401  registers the vae component
import text_encoder  # noqa: F401  registers the text component
from autoencoder import AutoencoderConfig, AutoencoderKL
from ldm import bundle as bundle_module
from ldm import components
from ldm.bundle import Bundle, load_bundle, save_bundle
from ldm.checkpoint import CheckpointError
from ldm.conditioning import Cond
from ldm.formats import original as original_format
from ldm.model_config import ModelConfig
from ldm.unet import UNet, UNetConfig
from tests.test_text_encoder_parity import (
    PROMPTS, assert_rel_close, hf_clip, open_clip_model, ref_sd2_frozen_openclip, ref_sgm_frozen_openclip2,
)  # fmt: skip

FAMILIES = ("sd1", "sd2", "sdxl")

# Original-style YAML parameters (unet_config / network_config.params, first_stage_config ddconfig) of tiny models
# with each family's shape features: the single source both diffusers and our loader start from.
UNET_PARAMS = {
    "sd1": dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                channel_mult=[1, 2, 2, 2], num_heads=2, transformer_depth=1, context_dim=32),
    "sd2": dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                channel_mult=[1, 2, 2, 2], num_head_channels=16, use_linear_in_transformer=True, transformer_depth=1,
                context_dim=32),
    "sdxl": dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2], num_res_blocks=2,
                 channel_mult=[1, 2, 2], num_head_channels=16, use_linear_in_transformer=True, transformer_depth=[1, 2, 2],
                 context_dim=64, num_classes="sequential", adm_in_channels=24 + 6 * 256),
}  # fmt: skip
DDCONFIG = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)  # fmt: skip
SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
NORM_GROUPS = 8  # tiny models: 8 GroupNorm groups (the original code always uses 32; shapes cannot tell)
# what the tensor shapes cannot tell about these tiny models (head counts, norm groups)
OVERRIDES = {
    "sd1": ["unet.num_heads=2", "unet.norm_groups=8", "vae.norm_num_groups=8", "text[0].heads=4"],
    "sd2": ["unet.num_head_channels=16", "unet.norm_groups=8", "vae.norm_num_groups=8", "text[0].heads=4"],
    "sdxl": ["unet.num_head_channels=16", "unet.norm_groups=8", "vae.norm_num_groups=8", "text[0].heads=4",
             "text[1].heads=4"],
}  # fmt: skip
TOL = 1e-5


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


def random_tensors(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.05^2): every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        r = torch.randn(shape, generator=g)
        if k.endswith("bias"):
            out[k] = 0.05 * r
        elif len(shape) == 1:
            out[k] = 1 + 0.1 * r
        else:
            out[k] = r / math.sqrt(math.prod(shape[1:]))
    return out


def original_config(family: str, params: dict) -> dict:
    return {"model": {"params": {
        "scale_factor": SCALE[family],
        "unet_config": {"params": params},
        "first_stage_config": {"params": {"ddconfig": DDCONFIG}},
    }}}  # fmt: skip


INPAINT = dict(in_channels=9, use_scale_shift_norm=True)  # SD 1.x inpainting input, plus AdaGN scale-shift


@lru_cache(maxsize=None)
def reference(family: str, inpaint: bool = False):
    """(original-layout state dict, diffusers U-Net, diffusers VAE, text references) with the same random weights."""
    params = dict(UNET_PARAMS[family], **(INPAINT if inpaint else {}))
    with torch.device("meta"):  # shapes only
        unet_shapes = {k: v.shape for k, v in UNet(UNetConfig.from_original(params, norm_groups=NORM_GROUPS)).state_dict().items()}
        vae_cfg = AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=NORM_GROUPS)
        vae_shapes = {k: v.shape for k, v in AutoencoderKL(vae_cfg).state_dict().items()}
    sd = {"model.diffusion_model." + k: v for k, v in random_tensors(unet_shapes, seed=1).items()}
    sd.update({"first_stage_model." + k: v for k, v in random_tensors(vae_shapes, seed=2).items()})

    # diffusers builds its models from the original parameters and converts the original tensors itself
    ucfg = create_unet_diffusers_config_from_ldm(original_config(family, params), sd)
    ucfg["norm_num_groups"] = NORM_GROUPS
    if params.get("use_scale_shift_norm"):  # not read by diffusers' config helper
        ucfg["resnet_time_scale_shift"] = "scale_shift"
    if family == "sdxl":  # diffusers recognises SDXL by a 2048/1280-wide context; the tiny one is 64 wide
        ucfg.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    unet_ref = UNet2DConditionModel(**ucfg).eval()
    unet_ref.load_state_dict(convert_ldm_unet_checkpoint(sd, unet_ref.config), strict=True)
    vcfg = create_vae_diffusers_config_from_ldm(original_config(family, params), sd)
    vae_ref = DiffusersVAE(**vcfg, norm_num_groups=NORM_GROUPS).eval()
    vae_ref.load_state_dict(convert_ldm_vae_checkpoint(sd, vae_ref.config), strict=True)

    # text towers as the original embedders hold them: transformers CLIPTextModel (file layout text_model.*),
    # open_clip CLIP without the vision tower
    text = {}
    if family in ("sd1", "sdxl"):
        hf = hf_clip("quick_gelu", projection=False, seed=3)
        prefix = "cond_stage_model.transformer." if family == "sd1" else "conditioner.embedders.0.transformer."
        sd.update({prefix + "text_model." + k.removeprefix("text_model."): v for k, v in hf.state_dict().items()})
        text["hf"] = hf
    if family in ("sd2", "sdxl"):
        oc = open_clip_model(seed=4)
        prefix = "cond_stage_model.model." if family == "sd2" else "conditioner.embedders.1.model."
        sd.update({prefix + k: v for k, v in oc.state_dict().items() if not k.startswith("visual.")})
        text["open_clip"] = oc
    return sd, unet_ref, vae_ref, text


def network_tensors(sd: dict) -> dict:
    """The file without the entries that are no part of any network (open_clip's logit_scale)."""
    return {k: v for k, v in sd.items() if not k.endswith("logit_scale")}


def write(tmp_path, sd: dict, name: str = "model.safetensors", metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tmp_path_factory):
    family = request.param
    sd, unet_ref, vae_ref, text = reference(family)
    path = write(tmp_path_factory.mktemp(family), sd)
    return family, load_bundle(path, config_overrides=OVERRIDES[family]), unet_ref, vae_ref, text


# --------------------------------------------------------------------------------------- parity


def test_config_is_read_from_shapes(loaded):
    family, b, *_ = loaded
    tiny = ModelConfig.tiny(family)  # the same sizes, written independently of the YAML parameters above
    assert b.config.family == family
    assert b.config.unet == UNetConfig.from_original(UNET_PARAMS[family], norm_groups=NORM_GROUPS)
    assert b.config.vae == tiny.vae and b.config.vae.scale_factor == SCALE[family]
    assert b.config.text == tiny.text
    assert b.config.diffusion.prediction == ("v" if family == "sd2" else "eps")  # SD 2.x: 768-v by default


@torch.no_grad()
def test_unet_matches_diffusers(loaded):
    family, b, unet_ref, _, _ = loaded
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([3.0, 731.0])
    ctx = torch.randn(2, 7, b.config.unet.context_dim, generator=g)
    kwargs, vector = {}, None
    if family == "sdxl":  # vector = [pooled text, sinusoidal embeddings of the 6 size/crop ids], as SDXL builds it
        pooled = torch.randn(2, 24, generator=g)
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 32, 1024, 1024]])
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        vector = torch.cat([pooled, unet_ref.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=-1)
    expected = unet_ref(x, t, encoder_hidden_states=ctx, **kwargs).sample
    assert expected.abs().max() > 0.1
    assert rel_err(b.unet(x, t, Cond(context=ctx, vector=vector)), expected) < TOL


@torch.no_grad()
def test_vae_matches_diffusers(loaded):
    family, b, _, vae_ref, _ = loaded
    g = torch.Generator().manual_seed(6)
    image = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1
    mean, logvar = b.vae.moments(image)
    post = vae_ref.encode(image).latent_dist
    assert rel_err(mean, post.mean) < TOL and rel_err(logvar, post.logvar) < TOL
    latent = torch.randn(2, 4, 4, 6, generator=g)
    expected = vae_ref.decode(latent / vae_ref.config.scaling_factor).sample
    assert rel_err(b.vae.decode(latent), expected) < TOL


@torch.no_grad()
def test_text_matches_transformers_and_open_clip(loaded):
    family, b, _, _, text = loaded
    context, pooled = b.encode_prompts(PROMPTS)
    if family == "sd1":  # FrozenCLIPEmbedder: last_hidden_state
        ids = b.text[0].tokenize(PROMPTS)
        assert_rel_close(context, text["hf"](input_ids=ids).last_hidden_state)
        assert pooled is None
    elif family == "sd2":  # FrozenOpenCLIPEmbedder(layer="penultimate")
        assert_rel_close(context, ref_sd2_frozen_openclip(text["open_clip"], open_clip.tokenize(PROMPTS)))
        assert pooled is None
    else:  # GeneralConditioner: CLIP-L hidden_states[-2] ++ bigG penultimate; pooled from bigG
        ids_l = b.text[0].tokenize(PROMPTS)
        ref_l = text["hf"](input_ids=ids_l, output_hidden_states=True).hidden_states[-2]
        ref_g, ref_pooled = ref_sgm_frozen_openclip2(text["open_clip"], open_clip.tokenize(PROMPTS))
        assert_rel_close(context, torch.cat([ref_l, ref_g], dim=-1))
        assert_rel_close(pooled, ref_pooled)


@torch.no_grad()
def test_inpainting_unet_with_scale_shift_norm(tmp_path):
    sd, unet_ref, _, _ = reference("sd1", inpaint=True)
    b = load_bundle(write(tmp_path, sd), config_overrides=OVERRIDES["sd1"])
    assert b.config.unet == UNetConfig.from_original(dict(UNET_PARAMS["sd1"], **INPAINT), norm_groups=NORM_GROUPS)
    g = torch.Generator().manual_seed(7)
    x, concat = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, 8, generator=g)  # latent | mask + masked
    ctx = torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([10.0, 500.0])
    expected = unet_ref(torch.cat([x, concat], dim=1), t, encoder_hidden_states=ctx).sample
    assert rel_err(b.unet(x, t, Cond(context=ctx, concat=concat)), expected) < TOL


# ---------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_original_ours_original_is_bit_for_bit(tmp_path, family, dtype):
    sd = {k: v.to(dtype) for k, v in network_tensors(reference(family)[0]).items()}
    src = write(tmp_path, sd, "in.safetensors")
    b = load_bundle(src, config_overrides=OVERRIDES[family])  # dtype=None: as stored
    assert all(p.dtype == dtype for p in b.parameters())
    save_bundle(b, tmp_path / "out.safetensors", format="original")
    back = load_file(str(tmp_path / "out.safetensors"))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    again = load_bundle(tmp_path / "out.safetensors")  # our file: its config travels in the metadata
    assert again.config == b.config


def test_v_pred_and_ztsnr_markers(tmp_path):
    sd = dict(network_tensors(reference("sd1")[0]), v_pred=torch.zeros(0), ztsnr=torch.zeros(0))
    b = load_bundle(write(tmp_path, sd), config_overrides=OVERRIDES["sd1"])
    assert b.config.diffusion.prediction == "v" and b.config.diffusion.schedule.zero_terminal_snr
    save_bundle(b, tmp_path / "out.safetensors", format="original")
    back = load_file(str(tmp_path / "out.safetensors"))
    assert back.keys() == sd.keys()  # the markers are written back where a reader needs them
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_non_network_entries_are_dropped(tmp_path):
    """Schedule buffers, EMA bookkeeping, position_ids and logit_scale are in real files and in no network."""
    sd = dict(reference("sd1")[0])
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd.update(alphas_cumprod=torch.rand(1000), betas=torch.rand(1000), **{"model_ema.decay": torch.tensor(0.999)})
    messages = []
    b = load_bundle(write(tmp_path, sd), config_overrides=OVERRIDES["sd1"], progress=messages.append)
    assert any("ignoring 3 non-network entries" in m for m in messages)
    sd2 = reference("sd2")[0]
    assert "cond_stage_model.model.logit_scale" in sd2
    assert load_bundle(write(tmp_path, sd2, "sd2.safetensors"), config_overrides=OVERRIDES["sd2"]).config.family == "sd2"
    assert b.config.family == "sd1"


# ------------------------------------------------------------------------------------ detection


def test_other_sgm_embedder_sets_are_read_as_custom(tmp_path):
    """An SDXL-refiner-like file: one OpenCLIP tower at embedders.0 whose pooled vector feeds the U-Net."""
    params = dict(UNET_PARAMS["sdxl"], context_dim=32, adm_in_channels=24 + 5 * 256)  # refiner: 5 size/crop ids
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet(UNetConfig.from_original(params, norm_groups=NORM_GROUPS)).state_dict().items()}
    sd = {"model.diffusion_model." + k: v for k, v in random_tensors(shapes, seed=8).items()}
    sd.update({k: v for k, v in reference("sdxl")[0].items() if k.startswith("first_stage_model.")})
    sd.update({"conditioner.embedders.0.model." + k: v for k, v in open_clip_model(seed=9).state_dict().items()
               if not k.startswith("visual.") and k != "logit_scale"})  # fmt: skip
    path = write(tmp_path, sd)
    b = load_bundle(path, config_overrides=[o for o in OVERRIDES["sdxl"] if not o.startswith("text[1]")])
    cfg = b.config
    assert cfg.family == "custom" and cfg.vae.scale_factor == 0.13025
    assert cfg.unet == UNetConfig.from_original(params, norm_groups=NORM_GROUPS)
    assert len(cfg.text) == 1 and cfg.text[0].return_pooled and cfg.text[0].layer == "penultimate"
    save_bundle(b, tmp_path / "out.safetensors", format="original")
    back = load_file(str(tmp_path / "out.safetensors"))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_overrides_win_over_detection(tmp_path):
    path = write(tmp_path, reference("sd2")[0])
    b = load_bundle(path, prediction="eps", config_overrides=OVERRIDES["sd2"])  # an SD 2.x base (512) model
    assert b.config.diffusion.prediction == "eps"
    b = load_bundle(path, prediction="eps", config_overrides=OVERRIDES["sd2"] + ["diffusion.prediction=x0"])
    assert b.config.diffusion.prediction == "x0"  # config_overrides come last
    b = load_bundle(path, family="custom", config_overrides=OVERRIDES["sd2"])
    assert b.config.family == "custom" and b.config.diffusion.prediction == "eps"  # no SD 2.x convention


def test_unknown_layout_names_the_file_and_the_known_layouts(tmp_path):
    path = write(tmp_path, {"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)}, "mystery.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_bundle(path)
    msg = str(e.value)
    assert str(path) in msg and "not a Stable Diffusion checkpoint" in msg
    for layout in ("sd1: model.diffusion_model.*", "sd2:", "sdxl:", "diffusers folder", "ldm folder"):
        assert layout in msg


def test_head_count_that_shapes_cannot_tell_must_be_given(tmp_path):
    path = write(tmp_path, reference("sd1")[0])
    with pytest.raises(CheckpointError, match=r"cannot read text\[0\]\.heads from the tensor shapes") as e:
        load_bundle(path)  # width 32 is no multiple of the 64-wide heads of the convention
    assert str(path) in str(e.value) and "config_overrides=['text[0].heads=N']" in str(e.value)


def test_family_with_the_wrong_number_of_towers_is_an_error(tmp_path):
    path = write(tmp_path, reference("sdxl")[0])
    with pytest.raises(CheckpointError, match=r"family 'sd1' has 1 text tower\(s\), the file 2") as e:
        load_bundle(path, family="sd1", config_overrides=OVERRIDES["sd1"])
    assert str(path) in str(e.value)


# ------------------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder") as e:
        load_bundle(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(e.value)


def test_truncated_and_foreign_files(tmp_path):
    path = write(tmp_path, network_tensors(reference("sd1")[0]))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_bundle(path, config_overrides=OVERRIDES["sd1"])
    assert str(path) in str(e.value)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x00\x01 this is not a safetensors file at all" * 4)
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as e:
        load_bundle(fake)
    assert str(fake) in str(e.value)


class _Payload:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))  # would create the sentinel file if unpickled


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"model.diffusion_model.x": _Payload(sentinel)}}, f)
    with pytest.raises(CheckpointError, match="refused to load") as e:
        load_bundle(path)
    assert str(path) in str(e.value)
    assert not sentinel.exists()


def test_weights_only_ckpt_loads(tmp_path):
    sd = network_tensors(reference("sd1")[0])
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, path)  # a Lightning-era file of plain tensors
    b = load_bundle(path, config_overrides=OVERRIDES["sd1"])
    assert torch.equal(b.unet.out[2].weight, sd["model.diffusion_model.out.2.weight"])


def test_missing_and_misshaped_keys_are_listed(tmp_path):
    sd = dict(network_tensors(reference("sd1")[0]))
    del sd["model.diffusion_model.out.2.bias"]
    path = write(tmp_path, sd)
    with pytest.raises(CheckpointError) as e:
        load_bundle(path, config_overrides=OVERRIDES["sd1"])
    msg = str(e.value)
    assert str(path) in msg and "[unet]" in msg and "1 missing key(s): out.2.bias" in msg
    sd = dict(network_tensors(reference("sd1")[0]), **{"first_stage_model.quant_conv.weight": torch.zeros(8, 8, 3, 3)})
    path = write(tmp_path, sd, "b.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_bundle(path, config_overrides=OVERRIDES["sd1"])
    msg = str(e.value)
    assert str(path) in msg and "[vae]" in msg
    assert "1 mis-shaped key(s): quant_conv.weight (expected (8, 8, 1, 1), found (8, 8, 3, 3))" in msg


def test_unexpected_entries(tmp_path):
    sd = dict(network_tensors(reference("sd1")[0]), **{"some_adapter.lora_up.weight": torch.zeros(2)})
    path = write(tmp_path, sd)
    with pytest.raises(CheckpointError, match="entries that belong to no network.*some_adapter.lora_up.weight") as e:
        load_bundle(path, config_overrides=OVERRIDES["sd1"])
    assert str(path) in str(e.value)
    messages = []
    load_bundle(path, config_overrides=OVERRIDES["sd1"], strict=False, progress=messages.append)
    assert any("ignoring 1 unexpected" in m for m in messages)


def test_original_is_written_as_safetensors_only(tmp_path):
    b = Bundle(ModelConfig.tiny("sd1"))
    with pytest.raises(CheckpointError, match=r"\.safetensors file"):
        save_bundle(b, tmp_path / "out.ckpt", format="original")
    assert not (tmp_path / "out.ckpt").exists()


# --------------------------------------------------------------------------------- meta device


def test_networks_are_built_on_meta_and_take_the_file_tensors(tmp_path, monkeypatch):
    """No network is materialised before loading: modules are built under torch.device('meta') and the
    parameters ARE the tensors read from the file (same storage), not copies."""
    devices = []

    def spy(spec):
        def build(cfg):
            devices.append(torch.empty(0).device.type)  # the default device while building
            return spec.build(cfg)

        return dataclasses.replace(spec, build=build)

    for name in ("unet", "vae", "text"):
        monkeypatch.setitem(components._REGISTRY, name, spy(components.get_component(name)))
    read = {}

    def capture(path, device="cpu"):
        sd = real_read(path, device)
        read.update((v.data_ptr(), k) for k, v in sd.items())
        return sd

    real_read = original_format.read_state_dict
    monkeypatch.setattr(original_format, "read_state_dict", capture)
    b = load_bundle(write(tmp_path, network_tensors(reference("sd1")[0])), config_overrides=OVERRIDES["sd1"])
    assert devices == ["meta", "meta", "meta"]
    assert all(p.data_ptr() in read for p in [*b.unet.parameters(), *b.vae.parameters()])  # assigned, never copied
    assert b.text[0].ln_final.weight.data_ptr() in read  # (q, k, v are concatenated: new tensors by necessity)
    assert not any(t.is_meta for t in list(b.parameters()) + list(b.buffers()))


def test_requested_dtype_is_applied_while_loading(tmp_path, monkeypatch):
    calls = []
    real = bundle_module.load_into
    monkeypatch.setattr(bundle_module, "load_into", lambda m, sd, **kw: calls.append(kw["dtype"]) or real(m, sd, **kw))
    b = load_bundle(write(tmp_path, network_tensors(reference("sd1")[0])), dtype="bf16", config_overrides=OVERRIDES["sd1"])
    assert calls == [torch.bfloat16] * 3
    assert {p.dtype for p in b.parameters()} == {torch.bfloat16}
