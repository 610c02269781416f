"""Registers one CLIP text tower as the ``text`` component of a model bundle (see ldm/components.py).

Layouts (key maps in text_encoder/keys.py):
    diffusers  transformers ``CLIPTextModel[WithProjection]`` files (``text_model.*``; transformers >= 5 also
               writes CLIPTextModel without that prefix: both are read, the prefixed file layout is written)
    hf         the original single file's OpenAI CLIP towers (SD 1.x ``cond_stage_model.transformer.*``,
               SDXL ``conditioner.embedders.0.transformer.*``): the same transformers layout
    open_clip  the original single file's OpenCLIP towers (SD 2.x ``cond_stage_model.model.*``, SDXL
               ``conditioner.embedders.1.model.*``): our names; ``logit_scale`` and the like are dropped

What a pipeline reads out of a tower (layer, final norm, pooled, padding) is not in transformers' config.json;
ldm/formats/diffusers_folder.py sets it from the pipeline family.
"""
from __future__ import annotations

from ldm.components import ComponentSpec, register_component
from ldm.text_config import EOT_ID, SOT_ID, TextEncoderConfig

from text_encoder import keys
from text_encoder.encoder import ClipTextEncoder

HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}  # ours -> transformers hidden_act


def config_to_hf(cfg: TextEncoderConfig) -> dict:
    """transformers ``CLIPTextConfig`` (config.json) of the same tower: CLIPTextModelWithProjection when the tower
    has a text_projection, CLIPTextModel otherwise."""
    arch = "CLIPTextModelWithProjection" if cfg.projection_dim is not None else "CLIPTextModel"
    return {
        "architectures": [arch],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": 4 * cfg.width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.context_length,
        "hidden_act": HF_ACTIVATIONS[cfg.act],
        "layer_norm_eps": 1e-5,
        "projection_dim": cfg.projection_dim or cfg.width,
        "attention_dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": SOT_ID,
        "eos_token_id": EOT_ID,  # pooling at the first end token = at argmax(ids), as ours
        "pad_token_id": cfg.pad_id,
    }


def config_from_hf(d: dict) -> dict:
    """transformers ``CLIPTextConfig`` (config.json) -> the shape fields of a TextEncoderConfig (plain data)."""
    width = d.get("hidden_size", 512)
    problems = []
    act = d.get("hidden_act", "quick_gelu")
    if act not in HF_ACTIVATIONS.values():
        problems.append(f"hidden_act={act!r} (supported: {', '.join(HF_ACTIVATIONS.values())})")
    if d.get("intermediate_size", 4 * width) != 4 * width:
        problems.append(f"intermediate_size={d.get('intermediate_size')} (supported: 4 * hidden_size = {4 * width})")
    if d.get("layer_norm_eps", 1e-5) != 1e-5:
        problems.append(f"layer_norm_eps={d.get('layer_norm_eps')} (supported: 1e-05)")
    if problems:
        raise ValueError("unsupported transformers CLIPTextConfig: " + "; ".join(problems))
    arch = (d.get("architectures") or ["CLIPTextModel"])[0]
    return dict(
        width=width,
        layers=d.get("num_hidden_layers", 12),
        heads=d.get("num_attention_heads", 8),
        act=act,
        projection_dim=d.get("projection_dim", 512) if arch == "CLIPTextModelWithProjection" else None,
        vocab_size=d.get("vocab_size", 49408),
        context_length=d.get("max_position_embeddings", 77),
    )


SPEC = register_component(ComponentSpec(
    name="text",
    build=ClipTextEncoder,
    from_diffusers=lambda sd, cfg: keys.hf_to_ours(sd),
    to_diffusers=lambda sd, cfg: keys.ours_to_hf(sd, prefix="text_model."),
    from_original={"hf": lambda sd, cfg: keys.hf_to_ours(sd), "open_clip": lambda sd, cfg: keys.open_clip_to_ours(sd)},
    to_original={"hf": lambda sd, cfg: keys.ours_to_hf(sd, prefix="text_model."), "open_clip": lambda sd, cfg: dict(sd)},
    config_to_diffusers=config_to_hf,
    config_from_diffusers=config_from_hf,
))  # fmt: skip
