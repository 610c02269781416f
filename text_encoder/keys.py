"""Explicit key maps between foreign text-encoder state dicts and ours (open_clip's layout, see encoder.py).

transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` (SD 1.x, SDXL CLIP-L, diffusers folders):

    text_model.embeddings.token_embedding.weight          <-> token_embedding.weight
    text_model.embeddings.position_embedding.weight       <-> positional_embedding
    text_model.encoder.layers.{i}.self_attn.{q,k,v}_proj  <-> transformer.resblocks.{i}.attn.in_proj_{weight,bias}
                                                              (q, k, v stacked along dim 0, in that order)
    text_model.encoder.layers.{i}.self_attn.out_proj      <-> transformer.resblocks.{i}.attn.out_proj
    text_model.encoder.layers.{i}.layer_norm1 / 2         <-> transformer.resblocks.{i}.ln_1 / ln_2
    text_model.encoder.layers.{i}.mlp.fc1 / fc2           <-> transformer.resblocks.{i}.mlp.c_fc / c_proj
    text_model.final_layer_norm                           <-> ln_final
    text_projection.weight (P, D)                         <-> text_projection (D, P), transposed

That is the layout of checkpoint files (diffusers ``text_encoder/``, SD 1.x ``cond_stage_model.transformer.*``) and of
transformers' in-memory state dicts, except transformers >= 5's ``CLIPTextModel``, which drops the ``text_model.``
prefix (its loader strips it from files): ``hf_to_ours`` accepts both, ``ours_to_hf(sd, prefix="")`` writes the latter.

``text_model.embeddings.position_ids`` (saved by transformers < 4.31, and found with corrupted values in some
merged SD 1.x checkpoints) is dropped: positions are always 0..T-1 here, as in a fresh transformers model.

open_clip ``CLIP`` (SD 2.x ``cond_stage_model.model.*``, SDXL ``conditioner.embedders.1.model.*``): the text keys
are ours already; ``open_clip_to_ours`` only drops the parts that are not the text tower.

The functions take state dicts whose keys start at the model (strip checkpoint prefixes first), return new
dicts sharing the tensors (the transposed / stacked ones are new), and raise ValueError on any key they do not
know, so that a checkpoint of another layout is never half-loaded.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

_HF_BLOCK = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
_OURS_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")

# per-block parameters that are a plain rename (HF suffix -> ours suffix)
_BLOCK_RENAMES = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_TOP_RENAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_HF_DROPPED = {"text_model.embeddings.position_ids"}
_QKV = ("q", "k", "v")  # order of the stacked in_proj rows in nn.MultiheadAttention


def hf_to_ours(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers CLIPTextModel[WithProjection] state dict (with or without ``text_model.``) -> ClipTextEncoder's."""
    if not any(k.startswith("text_model.") for k in sd):  # transformers >= 5 CLIPTextModel: no text_model. prefix
        sd = {k if k == "text_projection.weight" else f"text_model.{k}": v for k, v in sd.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}  # (block, "weight"|"bias") -> {"q": ..., "k": ..., "v": ...}
    unknown = []
    for key, value in sd.items():
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()  # (P, D) -> (D, P)
        elif key in _HF_DROPPED:
            continue
        elif m := _HF_BLOCK.fullmatch(key):
            i, rest = int(m.group(1)), m.group(2)
            if rest in _BLOCK_RENAMES:
                out[f"transformer.resblocks.{i}.{_BLOCK_RENAMES[rest]}"] = value
            elif (q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)) is not None:
                qkv.setdefault((i, q.group(2)), {})[q.group(1)] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"hf_to_ours: keys not in transformers' CLIPTextModel layout: {sorted(unknown)[:10]}")
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != set(_QKV):
            raise ValueError(f"hf_to_ours: block {i} has self_attn {sorted(parts)}_proj.{kind}, needs q, k and v")
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in _QKV], dim=0)  # (3D, ...)
    return out


def ours_to_hf(sd: dict[str, Tensor], prefix: str = "text_model.") -> dict[str, Tensor]:
    """ClipTextEncoder state dict -> transformers CLIPTextModel (or ...WithProjection if text_projection is there).

    prefix replaces ``text_model.`` on the text-model keys: the default is the file layout (and transformers < 5);
    pass ``""`` for ``load_state_dict`` into a transformers >= 5 ``CLIPTextModel``.
    """
    if prefix not in ("text_model.", ""):
        raise ValueError(f"ours_to_hf: prefix must be 'text_model.' or '', got {prefix!r}")
    out = _ours_to_hf(sd)
    return {k if k == "text_projection.weight" else prefix + k.removeprefix("text_model."): v for k, v in out.items()}


def _ours_to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    top = {ours: hf for hf, ours in _TOP_RENAMES.items()}
    block = {ours: hf for hf, ours in _BLOCK_RENAMES.items()}
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()  # (D, P) -> (P, D)
        elif m := _OURS_BLOCK.fullmatch(key):
            i, rest = int(m.group(1)), m.group(2)
            prefix = f"text_model.encoder.layers.{i}"
            if rest in block:
                out[f"{prefix}.{block[rest]}"] = value
            elif rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                if value.shape[0] % 3:
                    raise ValueError(f"ours_to_hf: {key} has {value.shape[0]} rows, not a multiple of 3 (q, k, v)")
                for p, part in zip(_QKV, value.chunk(3, dim=0)):  # (3D, ...) -> 3 x (D, ...)
                    out[f"{prefix}.self_attn.{p}_proj.{kind}"] = part.contiguous()
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"ours_to_hf: keys not in ClipTextEncoder's layout: {sorted(unknown)[:10]}")
    return out


_OPEN_CLIP_TEXT = re.compile(r"token_embedding\.weight|positional_embedding|ln_final\.(weight|bias)|text_projection|"
                             r"transformer\.resblocks\.\d+\..+")  # fmt: skip
_OPEN_CLIP_OTHER = re.compile(r"visual\..+|logit_scale|logit_bias|attn_mask")


def open_clip_to_ours(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """open_clip CLIP state dict (whole model or text part) -> ClipTextEncoder state dict.

    Keeps the text tower, drops the vision tower, logit_scale / logit_bias and a saved attn_mask. Checkpoints whose
    text tower is a separate module (open_clip CustomTextCLIP, ``text.*`` keys) are refused.
    """
    unknown = [k for k in sd if not (_OPEN_CLIP_TEXT.fullmatch(k) or _OPEN_CLIP_OTHER.fullmatch(k))]
    if unknown:
        raise ValueError(f"open_clip_to_ours: keys not in open_clip CLIP's layout: {sorted(unknown)[:10]}")
    return {k: v for k, v in sd.items() if _OPEN_CLIP_TEXT.fullmatch(k)}
