"""text_encoder.prompts: chunking, emphasis and clip skip against hand-built references on tiny random towers.

References are built independently of the module under test: chunk ids with ``tokenize`` on the text each chunk
must hold (it adds SOT/EOT and the padding itself), hidden states by running the tower on those ids, emphasis
with the webui's "Original" formula written out below (modules/sd_emphasis.py, EmphasisOriginal).
"""
from __future__ import annotations

import math

import pytest
import torch

from ldm.text_config import SDXLTextConfig, TextEncoderConfig
from text_encoder import (
    EOT_ID,
    PAD_OPENAI,
    PAD_OPENCLIP,
    SOT_ID,
    ClipTextEncoder,
    SDXLTextEncoders,
    chunk_prompt,
    decode,
    encode,
    encode_prompts,
    encode_prompts_sdxl,
    tokenize,
    tokenize_weighted,
)

T = 77


def tower(cfg: TextEncoderConfig, seed: int = 0) -> ClipTextEncoder:
    torch.manual_seed(seed)
    enc = ClipTextEncoder(cfg).eval()
    with torch.no_grad():
        for p in enc.parameters():  # zero biases and unit norm weights would hide mistakes there
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    return enc


@pytest.fixture(scope="module")
def sd1() -> ClipTextEncoder:
    return tower(TextEncoderConfig.sd1().tiny())


@pytest.fixture(scope="module")
def bigg() -> ClipTextEncoder:
    return tower(TextEncoderConfig.sdxl_bigg().tiny(), seed=1)


def original_emphasis(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The webui's EmphasisOriginal.after_transformers on one chunk: z (1, T, D), w (1, T) float32."""
    original_mean = z.mean()
    z = z * w.reshape(w.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


def words(word: str, n: int) -> str:
    return (word + " ") * n  # n tokens: each of these words is one token


# ---- chunking ----


@pytest.mark.parametrize("n", [0, 1, 74, 75, 76, 150, 151, 226])
def test_n_tokens_make_ceil_n_over_75_chunks(n):
    assert len(encode(words("cat", n))) == n
    ids, weights = tokenize_weighted(words("cat", n), pad_id=PAD_OPENAI)
    k = max(1, math.ceil(n / 75))
    assert ids.shape == weights.shape == (1, k, T) and ids.dtype == torch.long and weights.dtype == torch.float32
    sizes = [75] * (k - 1) + [n - 75 * (k - 1)]
    for chunk, size in zip(ids[0], sizes):
        assert decode(chunk.tolist()) == "<start_of_text>" + "cat " * size + "<end_of_text>" * (T - 1 - size)
        assert chunk[0] == SOT_ID and chunk[size + 1] == EOT_ID
    assert torch.equal(weights, torch.ones(1, k, T))


@pytest.mark.parametrize("pad_id", [PAD_OPENAI, PAD_OPENCLIP])
def test_chunks_equal_tokenizing_each_chunk_text(pad_id):
    prompt = words("cat", 80) + words("dog", 90)  # 170 tokens: 75 cats | 5 cats 70 dogs | 20 dogs
    ids, _ = tokenize_weighted(prompt, pad_id=pad_id)
    texts = [words("cat", 75), words("cat", 5) + words("dog", 70), words("dog", 20)]
    assert torch.equal(ids[0], tokenize(texts, pad_id=pad_id))
    if pad_id == PAD_OPENCLIP:  # zeros after the end token
        assert ids[0, 2, 22:].eq(0).all() and ids[0, 2, 21] == EOT_ID


def test_batch_is_padded_with_empty_chunks():
    prompts = [words("cat", 80), "a dog", "(red) " + words("fox", 160)]  # 80, 2, 161 tokens -> 2, 1, 3 chunks
    ids, weights = tokenize_weighted(prompts, pad_id=PAD_OPENCLIP)
    assert ids.shape == (3, 3, T)
    expected = [
        [words("cat", 75), words("cat", 5), ""],
        ["a dog", "", ""],
        ["red " + words("fox", 74), words("fox", 75), words("fox", 11)],
    ]
    for i, texts in enumerate(expected):
        assert torch.equal(ids[i], tokenize(texts, pad_id=PAD_OPENCLIP)), i
    assert ids[1, 2].tolist() == [SOT_ID, EOT_ID] + [0] * 75  # an empty chunk: start, end, padding
    w = torch.ones(3, 3, T)
    w[2, 0, 1] = torch.tensor(1.1, dtype=torch.float32)  # "red", weights are float32 as in the webui
    assert torch.equal(weights, w)


@pytest.mark.parametrize(
    "prompt, texts",
    [
        ("a cat BREAK a dog", ["a cat", "a dog"]),
        ("BREAK a", ["", "a"]),  # BREAK closes even an empty chunk (the webui's next_chunk)
        ("a BREAK", ["a"]),
        ("a BREAK BREAK b", ["a", "", "b"]),
        (words("cat", 75) + "BREAK dog", [words("cat", 75), "dog"]),  # a full chunk is not followed by an empty one
        (words("cat", 80) + "BREAK dog", [words("cat", 75), words("cat", 5), "dog"]),
    ],
)
def test_break_starts_a_new_chunk(prompt, texts):
    ids, _ = tokenize_weighted(prompt, pad_id=PAD_OPENAI)
    assert torch.equal(ids[0], tokenize(texts, pad_id=PAD_OPENAI))


def test_break_inside_brackets_still_breaks_and_keeps_weights():
    ids, weights = tokenize_weighted("(red BREAK blue)", pad_id=PAD_OPENAI)
    assert torch.equal(ids[0], tokenize(["red", "blue"], pad_id=PAD_OPENAI))
    assert weights[0, :, 1].tolist() == [pytest.approx(1.1)] * 2 and weights[0, :, 2:].eq(1).all()


def test_comma_backtracking():
    prompt = words("cat", 70) + ", " + words("dog", 10)  # 81 tokens; the comma is token 71 (index 70)
    comma = encode(",")
    assert len(comma) == 1 and len(encode(prompt)) == 81
    plain = chunk_prompt(prompt)  # 70 cats, comma, 4 dogs | 6 dogs
    assert [len(ids) for ids, _ in plain] == [75, 6]
    # the chunk is full with its comma 75 - 70 = 5 tokens from the end: with a limit >= 5 the 4 dogs move on
    moved = chunk_prompt(prompt, comma_backtrack=5)
    assert [ids for ids, _ in moved] == [encode(words("cat", 70)) + comma, encode(words("dog", 10))]
    assert [ids for ids, _ in chunk_prompt(prompt, comma_backtrack=4)] == [ids for ids, _ in plain]
    assert [ids for ids, _ in chunk_prompt(prompt, comma_backtrack=20)] == [ids for ids, _ in moved]
    # the moved tokens keep their weights
    weighted = chunk_prompt(words("cat", 70) + ", (" + words("dog", 10) + ":1.5)", comma_backtrack=20)
    assert weighted[1][1] == [1.5] * 10 and weighted[0][1] == [1.0] * 71


def test_emphasis_tokenizes_each_piece_separately():
    (ids, weights), = chunk_prompt("a (red:1.5) cat, [[blue]]")  # fmt: skip
    assert ids == encode("a") + encode("red") + encode("cat,") + encode("blue")
    assert weights == [1.0, 1.5, 1.0, 1.0, (1 / 1.1) * (1 / 1.1)]


# ---- encoding ----


@pytest.mark.parametrize("prompt", ["a photo of a cat", "", words("cat", 75), "A Cat, on  a mat!"])
def test_unweighted_short_prompt_is_exactly_the_tower_output(sd1, bigg, prompt):
    for enc in (sd1, bigg):
        ref_hidden, ref_pooled = enc(enc.tokenize(prompt))
        context, pooled = encode_prompts(enc, prompt)
        assert torch.equal(context, ref_hidden)
        assert (pooled is None and ref_pooled is None) or torch.equal(pooled, ref_pooled)


def test_short_batch_is_exactly_the_tower_output(sd1):
    prompts = ["a photo of a cat", "a dog", ""]
    context, _ = encode_prompts(sd1, prompts)
    assert torch.equal(context, sd1(sd1.tokenize(prompts))[0])


def test_emphasis_equals_hand_computation(sd1):
    with torch.no_grad():
        context, _ = encode_prompts(sd1, "a (red) cat")
        z, _ = sd1(tokenize("a red cat", pad_id=PAD_OPENAI))  # (1, 77, D)
        w = torch.ones(1, T)
        w[0, 2] = 1.1  # [SOT, a, red, cat, EOT, ...]
        expected = original_emphasis(z, w)
    assert not torch.equal(context, z)
    assert torch.equal(context, expected)
    torch.testing.assert_close(context.mean(), z.mean(), rtol=1e-5, atol=1e-7)  # the mean is restored
    d = z.shape[-1]  # the weighted token moves relative to the others: ratio 1.1 vs 1.0
    torch.testing.assert_close(context[0, 2] / z[0, 2], torch.full((d,), 1.1 * z.mean() / (z * w[..., None]).mean()))


def test_long_prompt_equals_chunks_encoded_by_hand(sd1):
    prompt = "(cat:1.5) " + words("dog", 80)  # 81 tokens: cat + 74 dogs | 6 dogs
    with torch.no_grad():
        context, pooled = encode_prompts(sd1, prompt)
        ids = tokenize(["cat " + words("dog", 74), words("dog", 6)], pad_id=PAD_OPENAI)
        z, _ = sd1(ids)  # (2, 77, D), the two chunks in one call as the module does
        w = torch.ones(1, T)
        w[0, 1] = 1.5
        first = original_emphasis(z[:1], w)
        first_alone, _ = sd1(ids[:1])  # the first chunk encoded on its own
    assert pooled is None and context.shape == (1, 2 * T, 32)
    assert torch.equal(context, torch.cat([first, z[1:]], dim=1))
    torch.testing.assert_close(context[:, :T], original_emphasis(first_alone, w), rtol=1e-5, atol=1e-6)


def test_batch_with_different_lengths(sd1):
    prompts = [words("cat", 80), "a (dog:0.5)"]
    with torch.no_grad():
        context, _ = encode_prompts(sd1, prompts)
        ids = torch.cat([tokenize([words("cat", 75), words("cat", 5)], pad_id=PAD_OPENAI),
                         tokenize(["a dog", ""], pad_id=PAD_OPENAI)])  # fmt: skip
        z, _ = sd1(ids)  # (4, 77, D)
        w = torch.ones(1, T)
        w[0, 2] = 0.5
        expected = torch.stack([torch.cat([z[0], z[1]]), torch.cat([original_emphasis(z[2:3], w)[0], z[3]])])
    assert context.shape == (2, 2 * T, 32)
    assert torch.equal(context, expected)
    # the empty chunk of the short prompt is the tower's encoding of ""
    torch.testing.assert_close(context[1, T:], sd1(tokenize("", pad_id=PAD_OPENAI))[0][0], rtol=1e-5, atol=1e-6)


def test_emphasis_is_per_prompt_not_per_batch(sd1):
    with torch.no_grad():
        alone, _ = encode_prompts(sd1, "a (red:1.3) cat")
        batched, _ = encode_prompts(sd1, ["a (red:1.3) cat", "(loud:2) " + words("noise", 40)])
    torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-6)


def test_pooled_comes_from_the_first_chunk(bigg):
    prompt = words("cat", 75) + "(dog:2)"
    with torch.no_grad():
        _, pooled = encode_prompts(bigg, prompt)
        _, ref = bigg(tokenize([words("cat", 75), "dog"], pad_id=PAD_OPENCLIP))  # (2, P)
    assert pooled.shape == (1, 24)
    assert torch.equal(pooled, ref[:1])
    assert not torch.allclose(pooled, ref[1:])


def test_weight_one_everywhere_is_bit_identical(sd1):
    prompt = words("cat", 80)
    with torch.no_grad():
        plain, _ = encode_prompts(sd1, prompt)
        ones, _ = encode_prompts(sd1, "(" + words("cat", 80) + ":1.0)")
        z, _ = sd1(tokenize([words("cat", 75), words("cat", 5)], pad_id=PAD_OPENAI))
    assert torch.equal(ones, plain)
    assert torch.equal(plain, z.reshape(1, 2 * T, -1))


@pytest.mark.parametrize("prompt", ["a photo of a cat", words("cat", 80) + "(dog:1.2)"])
def test_clip_skip_2_is_layer_minus_2(sd1, prompt):
    skipped = tower(sd1.cfg.with_clip_skip(2))
    skipped.load_state_dict(sd1.state_dict())
    with torch.no_grad():
        ours, _ = encode_prompts(sd1, prompt, clip_skip=2)
        ref, _ = encode_prompts(skipped, prompt)
        default, _ = encode_prompts(sd1, prompt)
        one, _ = encode_prompts(sd1, prompt, clip_skip=1)
        ids, _ = tokenize_weighted(prompt, pad_id=PAD_OPENAI)
        direct, _ = sd1(ids[0], layer=-2)  # (k, 77, D)
    assert torch.equal(ours, ref)
    assert torch.equal(one, default) and not torch.allclose(ours, default)
    if ids.shape[1] == 1:
        assert torch.equal(ours, direct)


# ---- SDXL ----


@pytest.fixture(scope="module")
def sdxl() -> SDXLTextEncoders:
    torch.manual_seed(2)
    return SDXLTextEncoders(SDXLTextConfig.tiny()).eval()


def test_sdxl_short_unweighted_is_exactly_encode(sdxl):
    prompts = ["a photo of a cat", "a dog"]
    with torch.no_grad():
        context, pooled = encode_prompts_sdxl(sdxl, prompts)
        ref_context, ref_pooled = sdxl.encode(prompts)
    assert torch.equal(context, ref_context) and torch.equal(pooled, ref_pooled)


def test_sdxl_long_weighted_prompt(sdxl):
    prompt = words("cat", 76) + "(dog:1.4)"  # 77 tokens: 75 cats | cat, dog
    texts = [words("cat", 75), "cat dog"]
    with torch.no_grad():
        context, pooled = encode_prompts_sdxl(sdxl, prompt, clip_skip=1)
        h_l, _ = sdxl.clip_l(tokenize(texts, pad_id=PAD_OPENAI), layer=-1)  # (2, 77, 32) clip skip 1: CLIP-L only
        h_g, p_g = sdxl.bigg(tokenize(texts, pad_id=PAD_OPENCLIP))  # (2, 77, 32), (2, 24)
        w = torch.ones(1, T)
        w[0, 2] = 1.4
        second = torch.cat([original_emphasis(h_l[1:], w), original_emphasis(h_g[1:], w)], dim=-1)  # per tower
        expected = torch.cat([torch.cat([h_l[:1], h_g[:1]], dim=-1), second], dim=1)
    assert context.shape == (1, 2 * T, 64) and pooled.shape == (1, 24)
    assert torch.equal(context, expected)
    assert torch.equal(pooled, p_g[:1])


# ---- bad input ----


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([], {}, "prompts must not be empty"),
        ([1], {}, "prompts must be a str"),
        (["a", None], {}, "prompts must be a str"),
        (3, {}, "prompts must be a str"),
        ("a", {"clip_skip": 0}, "clip_skip"),
        ("a", {"clip_skip": 4}, "clip_skip"),  # the tiny tower has 3 layers
        ("a", {"clip_skip": 2.0}, "clip_skip"),
        ("a", {"comma_backtrack": -1}, "comma_backtrack"),
        ("a", {"comma_backtrack": 75}, "comma_backtrack"),
        ("(a:1.2.3)", {}, "weight"),
    ],
)
def test_bad_input(sd1, sdxl, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        encode_prompts(sd1, prompts, **kwargs)
    with pytest.raises(ValueError, match=match):
        encode_prompts_sdxl(sdxl, prompts, **kwargs)


def test_bad_encoder_and_pad_id(sd1, sdxl):
    with pytest.raises(ValueError, match="encoder must be a ClipTextEncoder"):
        encode_prompts(sdxl, "a")
    with pytest.raises(ValueError, match="encoders must be an SDXLTextEncoders"):
        encode_prompts_sdxl(sd1, "a")
    with pytest.raises(ValueError, match="pad_id"):
        tokenize_weighted("a", pad_id=-1)
