"""ClipTextEncoder / SDXLTextEncoders against independent references, fp32 on CPU, tiny random towers.

References:
- SD 1.x / SDXL CLIP-L: transformers' CLIPTextModel[WithProjection] (what ldm's and sgm's FrozenCLIPEmbedder run),
  weights moved into ours with text_encoder.keys.hf_to_ours.
- SD 2.x / SDXL bigG: open_clip.CLIP's own modules, driven as ldm's FrozenOpenCLIPEmbedder and sgm's
  FrozenOpenCLIPEmbedder2 drive them (functions below, written from those classes, independent of our code),
  weights loaded by identity (keys.open_clip_to_ours only drops the vision tower and logit_scale).
- Parameter counts: open_clip.CLIP / transformers models of the published configs, built on the meta device.

Every parameter is randomized (LayerNorm gains around 1, biases around 0, no zero init) so each one matters.
"""
from __future__ import annotations

import math
from dataclasses import replace

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from text_encoder import ClipTextEncoder, SDXLTextConfig, SDXLTextEncoders, TextEncoderConfig, keys, tokenize
from text_encoder.tokenizer import PAD_OPENAI, PAD_OPENCLIP

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "Masterpiece, best quality: a red fox in the snow!! 8k",
    "a long prompt, " * 30,  # truncated: the end token is the last of 77
]
TINY = dict(width=32, layers=3, heads=4, projection_dim=24)  # = TextEncoderConfig.tiny()


def assert_rel_close(actual, expected, tol=1e-5):
    # Relative to the largest reference magnitude: an elementwise rtol is meaningless for entries near 0.
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert err <= tol, f"max error {err:.3g} relative to max |reference|"


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:  # LayerNorm gains around 1, all biases around 0
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif "embedding" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(32))
    return module.eval()


def hf_clip(act: str, projection: bool, seed: int = 0):
    cfg = CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_size=TINY["width"], intermediate_size=4 * TINY["width"],
        num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"], hidden_act=act,
        projection_dim=TINY["projection_dim"], eos_token_id=49407, pad_token_id=49407, bos_token_id=49406,
    )  # fmt: skip
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    return randomize_(model, seed)


def open_clip_model(seed: int = 0, quick_gelu: bool = False) -> open_clip.CLIP:
    text_cfg = dict(context_length=77, vocab_size=49408, width=TINY["width"], heads=TINY["heads"], layers=TINY["layers"])
    vision_cfg = dict(image_size=32, patch_size=16, width=32, layers=1, head_width=16)
    model = open_clip.CLIP(TINY["projection_dim"], vision_cfg, text_cfg, quick_gelu=quick_gelu)
    return randomize_(model, seed)


def ours_from(cfg: TextEncoderConfig, state_dict) -> ClipTextEncoder:
    enc = ClipTextEncoder(cfg)
    enc.load_state_dict(state_dict, strict=True)
    return enc.eval()


# ---- the original SD 2.x / SDXL embedders, on open_clip's modules ----


def _blocks(model, x, n_blocks):
    """x (B, T, D) through the first n_blocks resblocks with the causal attn_mask, as the originals loop."""
    batch_first = getattr(model.transformer, "batch_first", False)
    x = x if batch_first else x.permute(1, 0, 2)  # NLD -> LND for old open_clip
    for r in model.transformer.resblocks[:n_blocks]:
        x = r(x, attn_mask=model.attn_mask)
    return x if batch_first else x.permute(1, 0, 2)


def ref_sd2_frozen_openclip(model, tokens):
    """ldm FrozenOpenCLIPEmbedder(layer="penultimate").encode_with_transformer: ln_final(penultimate)."""
    x = model.token_embedding(tokens) + model.positional_embedding  # (B, 77, D)
    x = _blocks(model, x, len(model.transformer.resblocks) - 1)  # layer_idx = 1: stop before the last block
    return model.ln_final(x)


def ref_sgm_frozen_openclip2(model, tokens):
    """sgm FrozenOpenCLIPEmbedder2(layer="penultimate", always_return_pooled=True, legacy=False)."""
    x = model.token_embedding(tokens) + model.positional_embedding  # (B, 77, D)
    n = len(model.transformer.resblocks)
    penultimate = _blocks(model, x, n - 1)  # text_transformer_forward: outputs["penultimate"], no ln_final
    last = model.ln_final(_blocks(model, x, n))  # outputs["last"], then ln_final
    pooled = last[torch.arange(last.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection  # pool()
    return penultimate, pooled


# ---- SD 1.x / SDXL CLIP-L: transformers ----


@torch.no_grad()
def test_sd1_matches_transformers_last_hidden_state():
    hf = hf_clip("quick_gelu", projection=False)
    enc = ours_from(TextEncoderConfig.preset("sd1", tiny=True), keys.hf_to_ours(hf.state_dict()))
    ids = enc.tokenize(PROMPTS)  # ours, pad 49407
    assert (ids[1, 2:] == PAD_OPENAI).all()
    hidden, pooled = enc(ids)
    assert pooled is None and hidden.shape == (len(PROMPTS), 77, 32)
    assert_rel_close(hidden, hf(input_ids=ids).last_hidden_state)


@torch.no_grad()
def test_sdxl_clip_l_matches_transformers_penultimate_hidden_state():
    hf = hf_clip("quick_gelu", projection=False)
    enc = ours_from(TextEncoderConfig.preset("sdxl_clip_l", tiny=True), keys.hf_to_ours(hf.state_dict()))
    ids = enc.tokenize(PROMPTS)
    ref = hf(input_ids=ids, output_hidden_states=True).hidden_states[-2]  # sgm: layer "hidden", layer_idx 11 of 12
    assert_rel_close(enc(ids)[0], ref)


@torch.no_grad()
@pytest.mark.parametrize("pad_id", [PAD_OPENCLIP, PAD_OPENAI])
def test_bigg_style_pooled_matches_transformers_text_embeds(pad_id):
    hf = hf_clip("gelu", projection=True)
    cfg = replace(TextEncoderConfig.preset("sdxl_bigg", tiny=True), pad_id=pad_id)
    enc = ours_from(cfg, keys.hf_to_ours(hf.state_dict()))
    ids = enc.tokenize(PROMPTS)
    out = hf(input_ids=ids, output_hidden_states=True)
    hidden, pooled = enc(ids)
    assert pooled.shape == (len(PROMPTS), 24)
    assert_rel_close(hidden, out.hidden_states[-2])
    assert_rel_close(pooled, out.text_embeds)


@torch.no_grad()
def test_every_layer_index_and_clip_skip_match_transformers_hidden_states():
    hf = hf_clip("quick_gelu", projection=False)
    cfg = replace(TextEncoderConfig.preset("sd1", tiny=True), final_norm=False)
    enc = ours_from(cfg, keys.hf_to_ours(hf.state_dict()))
    ids = enc.tokenize(PROMPTS)[:, :20]  # a shorter window works too
    ref = hf(input_ids=ids, output_hidden_states=True).hidden_states  # 0 = embeddings, i = after block i
    for layer in range(-4, 4):
        assert_rel_close(enc(ids, layer=layer)[0], ref[layer])
    for k in (1, 2, 3):  # clip skip k = k-th hidden state from the end; A1111 SD 1.x applies final_layer_norm
        skip = ours_from(replace(cfg, final_norm=True).with_clip_skip(k), enc.state_dict())
        assert_rel_close(skip(ids)[0], getattr(hf, "text_model", hf).final_layer_norm(ref[-k]))


def test_hf_round_trip_is_exact():
    for projection in (False, True):
        hf = hf_clip("quick_gelu", projection=projection)
        sd = hf.state_dict()
        ours = keys.hf_to_ours(sd)
        cfg = TextEncoderConfig.preset("sdxl_bigg" if projection else "sd1", tiny=True)
        enc = ours_from(cfg, ours)  # strict: exactly our key set
        # transformers >= 5 CLIPTextModel keeps its keys without the file layout's text_model. prefix
        prefix = "text_model." if any(k.startswith("text_model.") for k in sd) else ""
        back = keys.ours_to_hf(enc.state_dict(), prefix=prefix)
        assert set(back) == set(sd)
        for k in sd:
            assert back[k].shape == sd[k].shape and torch.equal(back[k], sd[k]), k
        hf.load_state_dict(back, strict=True)
    # the file layout (text_model. prefix everywhere) maps to the same; position_ids (saved by transformers < 4.31,
    # corrupted in some merged SD 1.x checkpoints) are dropped
    files = keys.ours_to_hf(enc.state_dict())
    assert all(k.startswith("text_model.") for k in files if k != "text_projection.weight")
    files["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    assert keys.hf_to_ours(files).keys() == ours.keys()


# ---- SD 2.x / SDXL bigG: open_clip ----


@torch.no_grad()
def test_sd2_matches_frozen_openclip_embedder():
    model = open_clip_model(seed=1)
    enc = ours_from(TextEncoderConfig.preset("sd2", tiny=True), keys.open_clip_to_ours(model.state_dict()))
    ref = ref_sd2_frozen_openclip(model, open_clip.tokenize(PROMPTS))  # the original tokenizes with open_clip
    hidden, pooled = enc(enc.tokenize(PROMPTS))
    assert pooled is None
    assert_rel_close(hidden, ref)


@torch.no_grad()
def test_sdxl_bigg_matches_frozen_openclip_embedder2():
    model = open_clip_model(seed=2)
    enc = ours_from(TextEncoderConfig.preset("sdxl_bigg", tiny=True), keys.open_clip_to_ours(model.state_dict()))
    tokens = open_clip.tokenize(PROMPTS)
    ref_hidden, ref_pooled = ref_sgm_frozen_openclip2(model, tokens)
    hidden, pooled = enc(enc.tokenize(PROMPTS))
    assert_rel_close(hidden, ref_hidden)
    assert_rel_close(pooled, ref_pooled)
    assert_rel_close(pooled, model.encode_text(tokens))  # open_clip's own pooled text features agree


@torch.no_grad()
def test_sdxl_pair_matches_concatenated_references():
    hf = hf_clip("quick_gelu", projection=False, seed=3)
    model = open_clip_model(seed=4)
    pair = SDXLTextEncoders(SDXLTextConfig.tiny())
    pair.clip_l.load_state_dict(keys.hf_to_ours(hf.state_dict()))
    pair.bigg.load_state_dict(keys.open_clip_to_ours(model.state_dict()))
    pair.eval()

    # references tokenize independently: transformers' CLIPTokenizer (pad <|endoftext|>) and open_clip.tokenize
    st = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    hf_tok = CLIPTokenizer(
        vocab={rename.get(t, t): i for t, i in st.encoder.items()},
        merges=[pair_ for pair_, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])],
    )
    ids_l = hf_tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ref_l = hf(input_ids=ids_l, output_hidden_states=True).hidden_states[-2]
    ref_g, ref_pooled = ref_sgm_frozen_openclip2(model, open_clip.tokenize(PROMPTS))

    context, pooled = pair.encode(PROMPTS)
    assert context.shape == (len(PROMPTS), 77, 64) and pooled.shape == (len(PROMPTS), 24)
    assert_rel_close(context, torch.cat([ref_l, ref_g], dim=-1))
    assert_rel_close(pooled, ref_pooled)


# ---- sizes, meta device, misc ----


def _count(module, skip=lambda name: False):
    return sum(p.numel() for n, p in module.named_parameters() if not skip(n))


def test_published_sizes_on_meta_device():
    def not_text(name):
        return name.startswith("visual.") or name in ("logit_scale", "logit_bias")

    with torch.device("meta"):
        # transformers CLIPTextModel with openai/clip-vit-large-patch14's published text config
        clip_l = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=77, hidden_size=768, intermediate_size=3072,
            num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu",
        ))  # fmt: skip
        # open_clip's bundled model configs (model_configs/ViT-H-14.json, ViT-bigG-14.json), text part
        vit_h = open_clip.CLIP(**open_clip.get_model_config("ViT-H-14"))
        vit_bigg = open_clip.CLIP(**open_clip.get_model_config("ViT-bigG-14"))
        ours = {name: ClipTextEncoder(TextEncoderConfig.preset(name)) for name in ("sd1", "sd2", "sdxl_clip_l", "sdxl_bigg")}
        pair = SDXLTextEncoders()

    assert _count(clip_l) == 123_060_480  # the published SD 1.x text encoder size
    assert _count(ours["sd1"]) == _count(ours["sdxl_clip_l"]) == _count(clip_l)
    assert _count(ours["sd2"]) == _count(vit_h, not_text) == 354_032_640
    assert _count(ours["sdxl_bigg"]) == _count(vit_bigg, not_text) == 694_659_840
    assert _count(pair) == _count(clip_l) + _count(vit_bigg, not_text)
    # same layout as open_clip: SD 2.x / SDXL bigG checkpoints load by identity
    ref = {k: v.shape for k, v in keys.open_clip_to_ours(vit_bigg.state_dict()).items()}
    assert {k: v.shape for k, v in ours["sdxl_bigg"].state_dict().items()} == ref
    hf_shapes = {k: v.shape for k, v in keys.hf_to_ours(clip_l.state_dict()).items()}
    assert {k: v.shape for k, v in ours["sd1"].state_dict().items()} == hf_shapes
    with torch.device("meta"):
        hidden, pooled = ours["sdxl_bigg"](torch.zeros(2, 77, dtype=torch.long))
    assert hidden.shape == (2, 77, 1280) and pooled.shape == (2, 1280)


def test_grad_checkpointing_gives_the_same_output_and_gradients():
    cfg = TextEncoderConfig.preset("sdxl_bigg", tiny=True)
    a = ours_from(cfg, keys.open_clip_to_ours(open_clip_model(seed=5).state_dict())).train()
    b = ours_from(cfg, a.state_dict()).train()
    b.set_grad_checkpointing(True)
    ids = a.tokenize(PROMPTS[:2])
    outs = []
    for enc in (a, b):
        hidden, pooled = enc(ids)
        (hidden.square().mean() + pooled.square().mean()).backward()
        outs.append((hidden, pooled, enc.token_embedding.weight.grad))
    for x, y in zip(*outs):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: TextEncoderConfig(width=30, layers=2, heads=4, act="gelu"), "heads"),
        (lambda: TextEncoderConfig(width=32, layers=2, heads=4, act="relu"), "act"),
        (lambda: TextEncoderConfig(width=32, layers=2, heads=4, act="gelu", layer=3), "layer"),
        (lambda: TextEncoderConfig(width=32, layers=2, heads=4, act="gelu", layer="middle"), "layer"),
        (lambda: TextEncoderConfig(width=32, layers=2, heads=4, act="gelu", projection_dim=0), "projection_dim"),
        (lambda: TextEncoderConfig(width=32, layers=2, heads=4, act="gelu", pad_id=49408), "pad_id"),
        (lambda: TextEncoderConfig.sd1().with_clip_skip(0), "clip skip"),
        (lambda: TextEncoderConfig.preset("sd3"), "preset"),
        (lambda: ClipTextEncoder(TextEncoderConfig.sd1().tiny())(torch.zeros(1, 78, dtype=torch.long)), "context_length"),
        (lambda: ClipTextEncoder(TextEncoderConfig.sd1().tiny())(torch.zeros(1, 77)), "integer"),
        (lambda: ClipTextEncoder(TextEncoderConfig.sd1().tiny())(torch.full((1, 77), 49408)), "vocab_size"),
        (lambda: ClipTextEncoder(TextEncoderConfig.sd1().tiny())(torch.zeros(1, 7, dtype=torch.long), layer=-5), "layer"),
        (lambda: SDXLTextEncoders(SDXLTextConfig.tiny())(torch.zeros(1, 77).long(), torch.zeros(1, 76).long()), "ids_l"),
        (lambda: SDXLTextConfig(bigg=TextEncoderConfig.sd2().tiny()), "return_pooled"),
        (lambda: keys.hf_to_ours({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}), "k and v"),
        (lambda: keys.hf_to_ours({"vision_model.post_layernorm.weight": torch.zeros(2)}), "vision_model"),
        (lambda: keys.ours_to_hf({"transformer.resblocks.0.attn.in_proj_weight": torch.zeros(4, 2)}), "multiple of 3"),
        (lambda: keys.open_clip_to_ours({"text.token_embedding.weight": torch.zeros(2, 2)}), "text.token_embedding"),
    ],
)
def test_bad_input_raises_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()
