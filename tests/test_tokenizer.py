"""text_encoder.tokenizer against its references.

pad 0 (SD 2.x, SDXL bigG): open_clip.tokenize, which the original FrozenOpenCLIPEmbedder[2] call.
pad 49407 (SD 1.x, SDXL CLIP-L): transformers' CLIPTokenizer with padding="max_length", truncation=True, as the
original FrozenCLIPEmbedder calls it. The openai/clip-vit-large-patch14 files cannot be downloaded here, so the HF
tokenizer is built from open_clip's bundled vocabulary (the same OpenAI BPE: 49,152 - 256 - 2 merges, byte tokens,
special tokens renamed to <|startoftext|> / <|endoftext|>); the tokenization itself is transformers' code.
"""
from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTokenizer

from text_encoder import EOT_ID, PAD_OPENAI, PAD_OPENCLIP, SOT_ID, decode, encode, tokenize

PROMPTS = [
    "A photo of a Cat, sitting on   a mat!",
    "  café 123 éclair — naïve   FAÇADE  ",
    "",
    "!~",  # [0, 349]: id 0 ("!" inside a word) must survive padding with 49407
    "it's I'll don't we've they're 3.14159 x^2 #hashtag @user",
    "masterpiece, best quality, (detailed:1.2) [landscape], 8k uhd",
    "an astronaut riding a horse on the moon, " * 12,  # > 77 tokens: truncated, end token kept
]
# open_clip additionally unescapes HTML (twice) and runs ftfy; transformers' fast CLIPTokenizer does neither,
# so these are compared with open_clip only (the SD 1.x original used the slow tokenizer, with ftfy).
HTML_PROMPTS = ["fish &amp; chips &lt;3", "Tom &amp;amp; Jerry"]


@pytest.fixture(scope="module")
def hf_tokenizer() -> CLIPTokenizer:
    st = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): i for tok, i in st.encoder.items()}
    merges = [pair for pair, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges)  # pad_token defaults to <|endoftext|>, as the OpenAI files


def test_pad_zero_matches_open_clip_tokenize():
    prompts = PROMPTS + HTML_PROMPTS
    ours = tokenize(prompts, pad_id=PAD_OPENCLIP)
    assert ours.dtype == torch.long and ours.shape == (len(prompts), 77)
    assert torch.equal(ours, open_clip.tokenize(prompts))


@pytest.mark.parametrize("context_length", [8, 20])
def test_other_context_length_matches_open_clip(context_length):
    ours = tokenize(PROMPTS, context_length, pad_id=PAD_OPENCLIP)
    assert torch.equal(ours, open_clip.tokenize(PROMPTS, context_length=context_length))


def test_pad_eot_matches_transformers_clip_tokenizer(hf_tokenizer):
    ref = hf_tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert hf_tokenizer.pad_token_id == EOT_ID
    assert torch.equal(tokenize(PROMPTS, pad_id=PAD_OPENAI), ref)


def test_layout_start_end_truncation_and_token_zero():
    ids = tokenize(["!~", "", PROMPTS[-1]], pad_id=PAD_OPENAI)
    assert ids[0, :4].tolist() == [SOT_ID, 0, 349, EOT_ID] and (ids[0, 4:] == EOT_ID).all()
    assert ids[1, :2].tolist() == [SOT_ID, EOT_ID] and (ids[1, 2:] == EOT_ID).all()
    long = encode(PROMPTS[-1])
    assert len(long) > 75
    assert ids[2].tolist() == [SOT_ID] + long[:75] + [EOT_ID]
    # the two conventions differ only in the padding
    zero = tokenize(["!~", "", PROMPTS[-1]], pad_id=PAD_OPENCLIP)
    assert torch.equal(ids.argmax(-1), zero.argmax(-1))  # both pool at the first end token


def test_encode_decode():
    assert decode(encode("A  Photo of a CAT")) == "a photo of a cat "
    assert decode(tokenize("hi", 4, pad_id=PAD_OPENCLIP)[0]) == "<start_of_text>hi <end_of_text>!"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=["a"], pad_id=49408), "pad_id"),
        (dict(prompts=["a"], pad_id=-1), "pad_id"),
        (dict(prompts=["a"], pad_id=0, context_length=1), "context_length"),
        (dict(prompts=["a", 3], pad_id=0), "prompts"),
        (dict(prompts=None, pad_id=0), "prompts"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tokenize(**kwargs)


def test_encode_rejects_non_str():
    with pytest.raises(ValueError, match="prompt"):
        encode(b"bytes")
