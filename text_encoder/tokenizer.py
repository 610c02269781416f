"""CLIP tokenization: prompts -> (B, 77) token ids, with the padding convention of each original model.

The byte-pair encoding is open_clip's ``SimpleTokenizer`` with its bundled vocabulary
(``bpe_simple_vocab_16e6.txt.gz``, the OpenAI CLIP vocabulary, 49,408 ids), including its text cleaning:
ftfy + HTML unescaping, whitespace collapsed, lower-cased.

Every sequence is ``[SOT_ID] + tokens + [EOT_ID]``, truncated to ``context_length`` with the end token kept
as the last entry, then padded with ``pad_id``. The models differ only in the padding id:

- ``PAD_OPENAI = EOT_ID`` (49407): SD 1.x and SDXL's CLIP ViT-L/14. Their originals tokenize with transformers'
  ``CLIPTokenizer`` of ``openai/clip-vit-large-patch14``, whose pad token is ``<|endoftext|>``.
- ``PAD_OPENCLIP = 0``: SD 2.x (OpenCLIP ViT-H/14) and SDXL's OpenCLIP ViT-bigG/14, tokenized with
  ``open_clip.tokenize``, which pads with zeros.

Both pool at ``argmax(ids)``: the first end token in either convention (id 0 is the token "!", never larger).
Padding is done here, not by replacing zeros in ``open_clip.tokenize``'s output, because 0 is a real token.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor

from ldm.text_config import CONTEXT_LENGTH, EOT_ID, PAD_OPENAI, PAD_OPENCLIP, SOT_ID, VOCAB_SIZE  # noqa: F401


@lru_cache(maxsize=1)
def bpe() -> SimpleTokenizer:
    """open_clip's tokenizer with its bundled vocabulary, built once (reading the vocabulary takes ~0.5 s)."""
    tok = SimpleTokenizer()
    assert (tok.sot_token_id, tok.eot_token_id, tok.vocab_size) == (SOT_ID, EOT_ID, VOCAB_SIZE)
    return tok


def encode(prompt: str) -> list[int]:
    """One prompt -> its token ids without start/end tokens and without truncation (for chunking long prompts)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    return bpe().encode(prompt)


def tokenize(prompts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, *, pad_id: int) -> Tensor:
    """Prompts -> LongTensor (B, context_length): SOT, tokens, EOT, then pad_id up to context_length.

    pad_id is required on purpose: use PAD_OPENAI (49407) for SD 1.x / SDXL CLIP-L and PAD_OPENCLIP (0) for
    SD 2.x / SDXL bigG (see the module docstring). Too long prompts are cut to context_length - 2 tokens.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a str or a sequence of str")
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for start and end tokens), got {context_length!r}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < VOCAB_SIZE:
        raise ValueError(f"pad_id must be an int in [0, {VOCAB_SIZE}), got {pad_id!r}")

    out = torch.full((len(prompts), context_length), pad_id, dtype=torch.long)  # (B, T)
    for i, prompt in enumerate(prompts):
        ids = [SOT_ID] + encode(prompt)[: context_length - 2] + [EOT_ID]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def decode(ids: Sequence[int] | Tensor) -> str:
    """Token ids -> text (special tokens included, padding not removed); for inspection and error messages."""
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    return bpe().decode(list(ids))
