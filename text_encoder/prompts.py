"""Long, weighted prompts as AUTOMATIC1111's stable-diffusion-webui encodes them ("Original" emphasis).

    context, pooled = encode_prompts(encoder, ["a (red:1.5) cat", long_prompt])   # (B, 77 k, D), None or (B, P)
    context, pooled = encode_prompts_sdxl(sdxl, prompts)                          # (B, 77 k, 2048), (B, 1280)

Steps (webui ``modules/sd_hijack_clip.py``, ``FrozenCLIPEmbedderWithCustomWordsBase``, textual inversion aside):

1. ``parse_emphasis`` splits the prompt into (piece, weight) and BREAK sentinels; each piece is tokenized on
   its own (``tokenizer.encode``: no start/end tokens, no truncation) and every token takes its piece's weight.
2. Tokens fill chunks of 75 (context_length - 2). A chunk is closed when it is full and another token arrives,
   at a BREAK (even an empty chunk: "BREAK a" gives an empty chunk, then "a"), and at the end if it holds tokens
   or is the only one. So N tokens without BREAK make max(1, ceil(N / 75)) chunks.
   Comma backtracking (webui setting "Prompt word wrap length limit", default 20 there) is available as
   ``comma_backtrack`` and off by default (0): when a chunk is full and the next token is not a comma, and the
   chunk's last comma lies within the final ``comma_backtrack`` tokens, the tokens after that comma move to the
   next chunk. Pass ``comma_backtrack=20`` to chunk as the webui does with its default settings.
3. Each chunk becomes ``[SOT] + tokens + [EOT]`` padded to 77 with the tower's pad id (cfg.pad_id: 49407 for
   OpenAI CLIP, 0 for OpenCLIP), weight 1.0 on start, end and padding. All prompts of a batch get as many chunks
   as the longest; the extra chunks are empty (SOT, EOT, padding), i.e. the encoding of "".
4. The tower runs once on all chunks of all prompts, (B k, 77). Per chunk: hidden (77, D) -> emphasis (below),
   then the chunks are concatenated along the sequence: (B, 77 k, D). The pooled vector (SDXL's bigG) is that of
   the first chunk, taken before emphasis, as the webui's ``zs[0].pooled``.

Emphasis, the webui's "Original" (``modules/sd_emphasis.py``, ``EmphasisOriginal``), on one chunk z (77, D) with
token weights w (77,):

    z' = z * w[:, None];   z'' = z' * (mean(z) / mean(z'))          (means over all 77 x D entries)

in the same float operations and order, with float32 weights as the webui's ``torch.asarray(multipliers)``.
Chunks whose weights are all 1.0 are left untouched (the webui's formula gives the same bits there, except that
it would turn an all-zero chunk into NaN), so an unweighted prompt of <= 75 tokens gives exactly
``encoder(encoder.tokenize(prompt))``. One difference: the webui takes the means over every prompt of the
batch at once (it encodes one prompt at a time, so in practice per prompt); here the mean is per prompt and
chunk, so a prompt's encoding does not depend on what else is in the batch.

Clip skip k reads hidden state -k (``TextEncoderConfig.with_clip_skip``), overriding the tower's own ``layer``;
final_norm stays as configured (SD 1.x: ln_final after the skipped layer, as the webui). For SDXL it applies
to CLIP-L only, as the webui's "sdxl_clip_l_skip" option does (bigG always reads its penultimate layer);
None keeps the configured layers (SDXL's CLIP-L penultimate is clip skip 2).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ldm.text_config import CONTEXT_LENGTH, EOT_ID, SOT_ID, VOCAB_SIZE, TextEncoderConfig

from text_encoder.emphasis import BREAK, parse_emphasis
from text_encoder.encoder import ClipTextEncoder
from text_encoder.sdxl import SDXLTextEncoders
from text_encoder.tokenizer import bpe, encode

Chunk = tuple[list[int], list[float]]  # (token ids, weights), at most chunk_tokens each, no start/end tokens


def comma_id() -> int:
    """Token id of "," as a word of its own (",</w>", 267): where comma backtracking may cut."""
    return bpe().encoder[",</w>"]


def chunk_prompt(prompt: str, chunk_tokens: int = CONTEXT_LENGTH - 2, *, comma_backtrack: int = 0) -> list[Chunk]:
    """One prompt -> its chunks of at most chunk_tokens (ids, weights), without start/end tokens (steps 1-2)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if isinstance(comma_backtrack, bool) or not isinstance(comma_backtrack, int) or not (
        0 <= comma_backtrack < chunk_tokens
    ):
        raise ValueError(f"comma_backtrack must be an int in [0, {chunk_tokens}) (0: off), got {comma_backtrack!r}")
    comma = comma_id()

    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in ids of the current chunk's last comma

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for piece in parse_emphasis(prompt):
        if piece is BREAK:
            close()
            continue
        text, weight = piece
        for token in encode(text):
            if token == comma:
                last_comma = len(ids)
            elif comma_backtrack and len(ids) == chunk_tokens and last_comma != -1 \
                    and len(ids) - last_comma <= comma_backtrack:  # fmt: skip
                cut = last_comma + 1  # the comma stays, what follows it moves on
                moved = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved
            if len(ids) == chunk_tokens:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def tokenize_weighted(
    prompts: str | Sequence[str], *, pad_id: int, context_length: int = CONTEXT_LENGTH, comma_backtrack: int = 0
) -> tuple[Tensor, Tensor]:
    """Prompts -> (ids (B, k, T) int64, weights (B, k, T) float32), T = context_length, k = most chunks (step 3)."""
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 3:
        raise ValueError(f"context_length must be an int >= 3 (start, end and one token), got {context_length!r}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < VOCAB_SIZE:
        raise ValueError(f"pad_id must be an int in [0, {VOCAB_SIZE}), got {pad_id!r}")
    chunked = _chunk_all(prompts, context_length - 2, comma_backtrack)
    return _pack(chunked, pad_id, context_length)


def apply_emphasis(hidden: Tensor, weights: Tensor) -> Tensor:
    """The webui's "Original" emphasis per chunk: hidden (N, T, D), weights (N, T) -> (N, T, D), dtype kept."""
    if not isinstance(hidden, Tensor) or hidden.ndim != 3:
        raise ValueError("hidden must be a tensor of shape (N, T, D)")
    if not isinstance(weights, Tensor) or tuple(weights.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"weights must be a tensor of shape (N, T) = {tuple(hidden.shape[:2])}")
    weights = weights.to(hidden.device)
    plain = (weights == 1).all(dim=1).tolist()  # (N,) chunks without emphasis
    if all(plain):
        return hidden
    rows = []
    for z, w, skip in zip(hidden, weights, plain):  # z (T, D), w (T,)
        if skip:
            rows.append(z)
            continue
        original_mean = z.mean()
        z_w = z * w[:, None]  # (T, D)
        z_w = z_w * (original_mean / z_w.mean())  # restore the chunk's mean
        rows.append(z_w.to(hidden.dtype))
    return torch.stack(rows)  # (N, T, D)


def encode_prompts(
    encoder: ClipTextEncoder, prompts: str | Sequence[str], *, clip_skip: int | None = None, comma_backtrack: int = 0
) -> tuple[Tensor, Tensor | None]:
    """Prompts -> (context (B, 77 k, D), pooled (B, P) of the first chunk, or None) for one CLIP text tower."""
    if not isinstance(encoder, ClipTextEncoder):
        raise ValueError(f"encoder must be a ClipTextEncoder, got {type(encoder).__name__}")
    cfg = encoder.cfg
    layer = _clip_skip_layer(cfg, clip_skip)
    ids, weights = tokenize_weighted(prompts, pad_id=cfg.pad_id, context_length=cfg.context_length,
                                     comma_backtrack=comma_backtrack)  # fmt: skip
    return _encode_chunks(encoder, ids, weights, layer)


def encode_prompts_sdxl(
    encoders: SDXLTextEncoders, prompts: str | Sequence[str], *, clip_skip: int | None = None,
    comma_backtrack: int = 0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Prompts -> (context (B, 77 k, D_l + D_g), pooled (B, P_g) from bigG's first chunk); clip_skip: CLIP-L only."""
    if not isinstance(encoders, SDXLTextEncoders):
        raise ValueError(f"encoders must be an SDXLTextEncoders, got {type(encoders).__name__}")
    cfg_l, cfg_g = encoders.clip_l.cfg, encoders.bigg.cfg
    layer_l = _clip_skip_layer(cfg_l, clip_skip)
    chunked = _chunk_all(prompts, cfg_l.context_length - 2, comma_backtrack)  # same chunks for both towers
    ids_l, weights = _pack(chunked, cfg_l.pad_id, cfg_l.context_length)  # (B, k, T)
    ids_g, _ = _pack(chunked, cfg_g.pad_id, cfg_g.context_length)
    h_l, _ = _encode_chunks(encoders.clip_l, ids_l, weights, layer_l)  # (B, T k, D_l)
    h_g, pooled = _encode_chunks(encoders.bigg, ids_g, weights, None)  # (B, T k, D_g), (B, P_g)
    return torch.cat([h_l, h_g], dim=-1), pooled  # emphasis was applied per tower, as the webui does


# ---- helpers ----


def _chunk_all(prompts: str | Sequence[str], chunk_tokens: int, comma_backtrack: int) -> list[list[Chunk]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a str or a non-empty sequence of str")
    if len(prompts) == 0:
        raise ValueError("prompts must not be empty: give at least one prompt (\"\" for the empty prompt)")
    return [chunk_prompt(p, chunk_tokens, comma_backtrack=comma_backtrack) for p in prompts]


def _pack(chunked: list[list[Chunk]], pad_id: int, context_length: int) -> tuple[Tensor, Tensor]:
    """Chunks of B prompts -> ids (B, k, T) with [SOT] + tokens + [EOT] + padding, weights (B, k, T) (1 off-text)."""
    b, k = len(chunked), max(len(c) for c in chunked)
    ids = torch.full((b, k, context_length), pad_id, dtype=torch.long)  # empty chunks: SOT, EOT, pad ...
    ids[:, :, 0], ids[:, :, 1] = SOT_ID, EOT_ID
    weights = torch.ones(b, k, context_length, dtype=torch.float32)
    for i, chunks in enumerate(chunked):
        for j, (tokens, w) in enumerate(chunks):
            n = len(tokens)
            ids[i, j, 1 : n + 1] = torch.tensor(tokens, dtype=torch.long)
            ids[i, j, n + 1] = EOT_ID
            weights[i, j, 1 : n + 1] = torch.tensor(w, dtype=torch.float32)
    return ids, weights


def _encode_chunks(
    encoder: ClipTextEncoder, ids: Tensor, weights: Tensor, layer: int | None
) -> tuple[Tensor, Tensor | None]:
    """ids, weights (B, k, T) -> (context (B, k T, D), pooled (B, P) of chunk 0 or None); one tower call."""
    b, k, t = ids.shape
    device = encoder.token_embedding.weight.device
    hidden, pooled = encoder(ids.reshape(b * k, t).to(device), layer=layer)  # (B k, T, D), (B k, P) or None
    hidden = apply_emphasis(hidden, weights.reshape(b * k, t))  # (B k, T, D)
    context = hidden.reshape(b, k * t, hidden.shape[-1])  # chunks side by side along the sequence
    if pooled is not None:
        pooled = pooled.reshape(b, k, -1)[:, 0].contiguous()  # (B, P): the first chunk's
    return context, pooled


def _clip_skip_layer(cfg: TextEncoderConfig, clip_skip: int | None) -> int | None:
    if clip_skip is None:
        return None
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= cfg.layers:
        raise ValueError(f"clip_skip must be None or an int in [1, {cfg.layers}] (1: last layer), got {clip_skip!r}")
    return cfg.with_clip_skip(clip_skip).layer  # -clip_skip
