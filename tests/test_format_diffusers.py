"""diffusers pipeline folders: reading against the diffusers / transformers models that wrote them, writing folders
that diffusers' and transformers' ``from_pretrained`` load (offline) with the same outputs, and bit-exact round trips.

Reference folders are written by ``save_pretrained`` of tiny random ``UNet2DConditionModel``, ``AutoencoderKL``,
``CLIPTextModel[WithProjection]`` and ``EulerDiscreteScheduler``, configured by hand like the published pipelines
(SD 2.x: a CLIPTextModel read at its last layer, no projection; SDXL: two encoders). fp32 on CPU, 1e-5 relative.
"""
from __future__ import annotations

import json
import pickle
import shutil
from functools import lru_cache

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import autoencoder  # noqa: F401  registers the vae component
import text_encoder  # noqa: F401  registers the text component
from ldm.bundle import Bundle, load_bundle, save_bundle
from ldm.checkpoint import CheckpointError
from ldm.components import get_component, unet_config_from_diffusers, unet_config_to_diffusers
from ldm.conditioning import Cond
from ldm.model_config import ModelConfig
from ldm.schedule import DiscreteSchedule
from ldm.unet import UNet, UNetConfig
from ldm.unet_keys import ours_to_diffusers
from tests.test_format_original import OVERRIDES, network_tensors, reference, write
from tests.test_text_encoder_parity import PROMPTS, assert_rel_close, hf_clip
from tests.test_unet_parity import DIFFUSERS_CONFIGS
from tests.test_unet_parity import randomize_ as randomize_unet
from tests.test_vae_parity import randomize_ as randomize_vae

FAMILIES = ("sd1", "sd2", "sdxl")
TOL = 1e-5
UNET = {
    "sd1": dict(DIFFUSERS_CONFIGS["sd1"], cross_attention_dim=32),
    "sd2": dict(DIFFUSERS_CONFIGS["sd2"], cross_attention_dim=32),
    "sdxl": dict(DIFFUSERS_CONFIGS["sdxl"], cross_attention_dim=64, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=24 + 6 * 256),
}  # fmt: skip
VAE = dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)  # fmt: skip
PIPELINE = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


@lru_cache(maxsize=None)
def models(family: str):
    """The reference models of a tiny pipeline, randomized."""
    unet = UNet2DConditionModel(**UNET[family])
    randomize_unet(unet, seed=1)
    vae = randomize_vae(DiffusersVAE(**VAE, scaling_factor=0.13025 if family == "sdxl" else 0.18215), seed=2)
    if family == "sd1":
        texts = [hf_clip("quick_gelu", projection=False, seed=3)]
    elif family == "sd2":  # diffusers' SD 2.x text encoder: OpenCLIP-H as a CLIPTextModel (gelu), no projection
        texts = [hf_clip("gelu", projection=False, seed=3)]
    else:
        texts = [hf_clip("quick_gelu", projection=False, seed=3), hf_clip("gelu", projection=True, seed=4)]
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="v_prediction" if family == "sd2" else "epsilon")  # fmt: skip
    return unet.eval(), vae.eval(), [t.eval() for t in texts], scheduler


def make_folder(root, family: str, hub_layout: bool = False):
    """A pipeline folder written by diffusers / transformers. hub_layout: text encoder files with the ``text_model.``
    prefix, as on the Hub and as transformers < 5 writes them (transformers 5 drops it for CLIPTextModel)."""
    unet, vae, texts, scheduler = models(family)
    root.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    scheduler.save_pretrained(root / "scheduler")
    index = {"_class_name": PIPELINE[family], "unet": ["diffusers", "UNet2DConditionModel"]}
    for name, model in zip(["text_encoder", "text_encoder_2"], texts):
        model.save_pretrained(root / name)
        index[name] = ["transformers", type(model).__name__]
        file = root / name / "model.safetensors"
        sd = load_file(str(file))
        if hub_layout and not any(k.startswith("text_model.") for k in sd):
            save_file({f"text_model.{k}": v for k, v in sd.items()}, str(file), metadata={"format": "pt"})
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def text_references(family: str, b: Bundle):
    """What the family's diffusers pipeline feeds the U-Net: (context, pooled)."""
    texts = models(family)[2]
    ids = b.text[0].tokenize(PROMPTS)  # SD 1.x pads with 49407, SD 2.x with 0: as diffusers' tokenizers do
    if family != "sdxl":
        return texts[0](input_ids=ids).last_hidden_state, None
    out_l = texts[0](input_ids=ids, output_hidden_states=True)
    out_g = texts[1](input_ids=b.text[1].tokenize(PROMPTS), output_hidden_states=True)
    return torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1), out_g.text_embeds


def unet_inputs(family: str, ctx_dim: int, ref: UNet2DConditionModel):
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3.0, 731.0])
    ctx = torch.randn(2, 7, ctx_dim, generator=g)
    kwargs, vector = {}, None
    if family == "sdxl":
        pooled = torch.randn(2, 24, generator=g)
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 32, 1024, 1024]])
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        vector = torch.cat([pooled, ref.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=-1)
    return x, t, ctx, vector, kwargs


# ------------------------------------------------------------------------------------------- read


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_read_matches_the_models_that_wrote_the_folder(tmp_path, family):
    b = load_bundle(make_folder(tmp_path / "in", family))
    unet, vae, _, _ = models(family)
    assert b.config.family == family
    assert b.config.diffusion.prediction == ("v" if family == "sd2" else "eps")  # from scheduler_config.json
    x, t, ctx, vector, kwargs = unet_inputs(family, b.config.unet.context_dim, unet)
    assert rel_err(b.unet(x, t, Cond(context=ctx, vector=vector)), unet(x, t, ctx, **kwargs).sample) < TOL
    latent = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(6))
    assert rel_err(b.vae.decode(latent), vae.decode(latent / vae.config.scaling_factor).sample) < TOL
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    assert rel_err(b.vae.moments(image)[0], vae.encode(image).latent_dist.mean) < TOL
    context, pooled = b.encode_prompts(PROMPTS)
    ref_context, ref_pooled = text_references(family, b)
    assert_rel_close(context, ref_context)
    if family == "sdxl":
        assert_rel_close(pooled, ref_pooled)
    else:
        assert pooled is None


def test_scheduler_settings_are_read(tmp_path):
    root = make_folder(tmp_path / "in", "sd1")
    EulerDiscreteScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=500,
                           prediction_type="v_prediction", rescale_betas_zero_snr=True).save_pretrained(root / "scheduler")
    cfg = load_bundle(root).config.diffusion
    assert cfg.prediction == "v" and cfg.schedule.zero_terminal_snr
    assert (cfg.schedule.beta_schedule, cfg.schedule.beta_start, cfg.schedule.beta_end) == ("linear", 0.0001, 0.02)
    assert cfg.schedule.num_train_timesteps == 500


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_ours_diffusers_is_bit_for_bit(tmp_path, family):
    src = make_folder(tmp_path / "in", family, hub_layout=True)
    save_bundle(load_bundle(src), tmp_path / "out", format="diffusers")
    for name in ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else []):
        file = "model.safetensors" if name.startswith("text") else "diffusion_pytorch_model.safetensors"
        a, b = load_file(str(src / name / file)), load_file(str(tmp_path / "out" / name / file))
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_sharded_fp16_variant_and_weights_only_bin(tmp_path):
    root = make_folder(tmp_path / "in", "sd1")
    plain = load_bundle(root).state_dict()
    unet_file = root / "unet" / "diffusion_pytorch_model.safetensors"  # -> two shards + index
    sd = load_file(str(unet_file))
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}  # fmt: skip
    for shard, names in shards.items():
        save_file({k: sd[k] for k in names}, str(root / "unet" / shard))
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (root / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    unet_file.unlink()
    vae_file = root / "vae" / "diffusion_pytorch_model.safetensors"  # -> a plain-tensor pickle
    torch.save(load_file(str(vae_file)), root / "vae" / "diffusion_pytorch_model.bin")
    vae_file.unlink()
    text_file = root / "text_encoder" / "model.safetensors"  # -> the .fp16 variant
    save_file({k: v.half() for k, v in load_file(str(text_file)).items()}, str(root / "text_encoder" / "model.fp16.safetensors"))
    text_file.unlink()
    b = load_bundle(root, dtype=torch.float32)
    got = b.state_dict()
    assert got.keys() == plain.keys()
    for k in plain:
        want = plain[k].half().float() if k.startswith("text.") else plain[k]
        assert torch.equal(got[k], want), k


class _Payload:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bin_pickle_with_code_is_refused(tmp_path):
    root = make_folder(tmp_path / "in", "sd1")
    (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    sentinel = tmp_path / "pwned"
    with open(root / "vae" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"decoder.conv_in.weight": _Payload(sentinel)}, f)
    with pytest.raises(CheckpointError, match="refused to load") as e:
        load_bundle(root)
    assert "diffusion_pytorch_model.bin" in str(e.value) and not sentinel.exists()


def test_bad_folders_name_the_file(tmp_path):
    root = make_folder(tmp_path / "in", "sd1")
    (root / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"vae/config.json: missing"):
        load_bundle(root)
    root = make_folder(tmp_path / "in2", "sd1")
    cfg = json.loads((root / "unet" / "config.json").read_text())
    (root / "unet" / "config.json").write_text(json.dumps(dict(cfg, class_embed_type="timestep")))
    with pytest.raises(CheckpointError, match=r"in2: unsupported diffusers UNet2DConditionModel config: class_embed_type"):
        load_bundle(root)
    root = make_folder(tmp_path / "in3", "sd1")
    (root / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"text_encoder: no weights found \(looked for .*model.safetensors"):
        load_bundle(root)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a model folder.*Known layouts"):
        load_bundle(tmp_path / "junk")


# ------------------------------------------------------------------------------------------ write


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_written_folder_loads_in_diffusers_and_transformers(tmp_path, family):
    """Original file -> ours -> diffusers folder: each component loads with from_pretrained (offline, local folder)
    and computes what ours computes. SD 2.x's 3-block tower read at its penultimate block becomes a 2-layer
    CLIPTextModel whose last_hidden_state is that reading (diffusers' own SD 2.x layout)."""
    b = load_bundle(write(tmp_path, network_tensors(reference(family)[0])), config_overrides=OVERRIDES[family])
    out = tmp_path / "out"
    save_bundle(b, out, format="diffusers")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE[family]

    unet = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    x, t, ctx, vector, kwargs = unet_inputs(family, b.config.unet.context_dim, unet)
    assert rel_err(unet(x, t, ctx, **kwargs).sample, b.unet(x, t, Cond(context=ctx, vector=vector))) < TOL
    vae = DiffusersVAE.from_pretrained(out / "vae").eval()
    latent = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(6))
    assert rel_err(vae.decode(latent / vae.config.scaling_factor).sample, b.vae.decode(latent)) < TOL

    texts = [CLIPTextModel.from_pretrained(out / "text_encoder").eval()]
    if family == "sdxl":
        texts.append(CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2").eval())
    ids = [tower.tokenize(PROMPTS) for tower in b.text]
    ours = [tower(i) for tower, i in zip(b.text, ids)]
    if family == "sdxl":
        assert_rel_close(texts[0](input_ids=ids[0], output_hidden_states=True).hidden_states[-2], ours[0][0])
        out_g = texts[1](input_ids=ids[1], output_hidden_states=True)
        assert_rel_close(out_g.hidden_states[-2], ours[1][0])
        assert_rel_close(out_g.text_embeds, ours[1][1])
    else:
        assert_rel_close(texts[0](input_ids=ids[0]).last_hidden_state, ours[0][0])
        assert texts[0].config.num_hidden_layers == (2 if family == "sd2" else 3)

    scheduler = EulerDiscreteScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    expected = DiscreteSchedule(b.config.diffusion.schedule).alphas_cumprod
    assert torch.allclose(scheduler.alphas_cumprod.double(), expected, rtol=1e-6)  # diffusers computes in float32

    again = load_bundle(out)  # and back: the same networks (SD 2.x: the tower diffusers reads)
    context, _ = again.encode_prompts(PROMPTS)
    assert_rel_close(context, b.encode_prompts(PROMPTS)[0])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_written_folder_loads_as_a_pipeline(tmp_path, family):
    """model_index.json names every component; tokenizers are not written, so they are passed in."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()  # open_clip's BPE table as a transformers tokenizer
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    tok = CLIPTokenizer(vocab={rename.get(t, t): i for t, i in st.encoder.items()}, model_max_length=77,
                        merges=[p for p, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])])  # fmt: skip
    save_bundle(Bundle(ModelConfig.tiny(family)), tmp_path / "p", format="diffusers")
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(tmp_path / "p", tokenizer=tok, **({"tokenizer_2": tok} if family == "sdxl" else {}))
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.unet.config.cross_attention_dim == ModelConfig.tiny(family).unet.context_dim


def test_refuses_what_diffusers_cannot_hold(tmp_path):
    b = Bundle(ModelConfig.tiny("sd1"))
    b.config = ModelConfig(**{**b.config.__dict__, "family": "custom"})
    with pytest.raises(CheckpointError, match="'custom' model has no diffusers pipeline"):
        save_bundle(b, tmp_path / "out", format="diffusers")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(CheckpointError, match="not a model folder of this format; refusing to replace it"):
        save_bundle(Bundle(ModelConfig.tiny("sd1")), tmp_path / "mine", format="diffusers")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left behind


def test_overwrites_an_older_diffusers_folder(tmp_path):
    src = make_folder(tmp_path / "in", "sd1")
    out = tmp_path / "out"
    shutil.copytree(src, out)
    b = load_bundle(src)
    with torch.no_grad():
        b.unet.out[2].bias.add_(1.0)
    save_bundle(b, out, format="diffusers")
    assert torch.equal(load_bundle(out).unet.out[2].bias, b.unet.out[2].bias)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


# ------------------------------------------------------------------------------ U-Net config.json


# unet/config.json of the published pipelines (runwayml SD 1.5, stabilityai SD 2.1, SDXL 1.0 base), abridged to the
# entries that differ from UNet2DConditionModel's defaults
PUBLISHED = {
    "sd15": {"attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
             "sample_size": 64},
    "sd21": {"attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
             "cross_attention_dim": 1024, "use_linear_projection": True, "upcast_attention": True, "sample_size": 96},
    "sdxl_base": {"addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
                  "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
                  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  "projection_class_embeddings_input_dim": 2816, "transformer_layers_per_block": [1, 2, 10],
                  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  "use_linear_projection": True, "sample_size": 128},
}  # fmt: skip


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_unet_configs(name):
    preset = getattr(UNetConfig, name)()
    assert UNetConfig(**unet_config_from_diffusers(PUBLISHED[name])) == preset
    with torch.device("meta"):  # full size, shapes only
        theirs = UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(preset).items() if k != "_class_name"})
        ours = UNet(preset)
    mapped = ours_to_diffusers(ours.state_dict(), preset)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_unet_config_round_trips_through_config_json():
    for cfg in (UNetConfig.sd15(in_channels=9).tiny(use_scale_shift_norm=True), UNetConfig.sd21().tiny(num_heads=8),
                UNetConfig.sdxl_base().tiny(num_heads=8)):  # fmt: skip
        assert UNetConfig(**unet_config_from_diffusers(unet_config_to_diffusers(cfg))) == cfg  # num_heads: unused with a head width, 8 by default
    with pytest.raises(ValueError, match="transformer_depth_middle=3 cannot be written"):
        unet_config_to_diffusers(UNetConfig.sd21(transformer_depth=(1, 1, 1, 1), transformer_depth_middle=3))
    assert get_component("unet").config_to_diffusers is unet_config_to_diffusers
