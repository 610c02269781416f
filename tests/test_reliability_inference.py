"""Reliability of inference (issue 9, rows 13 and 20-23; docs/reliability.md lists every row and its test).

On a tiny random SD 1.x pipeline (U-Net and VAE randomised, so guidance and decoding matter):
- NaN never becomes a silent black image: a U-Net that yields NaN latents and a VAE that decodes to NaN are errors,
  and the command line writes no PNG; a decode that is NaN only in reduced precision is redone in float32;
- a prompt over 77 tokens reaches the U-Net as whole 77-token chunks (not truncated);
- steps that are negative, bool or text are refused before any network runs; 1 step works for every sampler and
  gives the closed form of a single step to sigma 0: the denoiser's x0 prediction at the first sigma;
- img2img strength 0 (rounds to zero steps) is refused, strength 1 runs every step from the noised image;
  guidance 0 and 1 both run the conditional rows only (diffusers' rule) and give the same image, > 1 guides;
  seeds: 2**64 - 1 is the largest and is recorded; beyond, negative, bool and float seeds are refused.
Other rows are proved in tests/test_pipeline_inputs.py (width / height, steps 0 and 2.5, strength out of range,
negative guidance and seeds), tests/test_long_prompts.py (chunking) and tests/test_vae_parity.py (the NaN guard).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from PIL import Image

from autoencoder.vae import NonFiniteOutputError
from inference import generate_cli
from inference.images import to_pixels
from inference.pipeline import Pipeline
from ldm.bundle import Bundle
from ldm.cli import main as ldm_main
from ldm.model_config import ModelConfig
from ldm.samplers import SAMPLERS
from tests.test_unet_parity import randomize_ as randomize_unet
from tests.test_vae_parity import randomize_ as randomize_vae

SIZE = 16  # the tiny VAE is f4: 4 x 4 latents


def tiny_bundle() -> Bundle:
    b = Bundle(ModelConfig.tiny("sd1"))
    randomize_unet(b.unet, seed=1)
    randomize_vae(b.vae, seed=2)
    return b.eval()


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline(tiny_bundle(), name="tiny")


def rows_seen(pipe: Pipeline):
    """A list that collects the batch size of every U-Net call, and the hook handle to remove."""
    seen = []
    handle = pipe.bundle.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen, handle


# ------------------------------------------------------------------------------------------ 13. NaN


def test_nan_latents_are_an_error_and_the_command_line_writes_no_png(tmp_path, monkeypatch, capsys):
    nan_pipe = Pipeline(tiny_bundle(), name="nan")
    handle = nan_pipe.bundle.unet.register_forward_hook(lambda m, args, out: out * float("nan"))
    with pytest.raises(ValueError, match="latent contains .* NaN"):
        nan_pipe("a cat", steps=2, width=SIZE, height=SIZE, seed=1)
    monkeypatch.setattr(generate_cli, "load_pipeline", lambda path, **kw: nan_pipe)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"never read")
    code = ldm_main(["txt2img", "--model", "model.safetensors", "a cat", "--steps", "2", "--width", str(SIZE),
                     "--height", str(SIZE), "--seed", "1", "-q"])  # fmt: skip
    assert code == 2 and "NaN" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.png"))
    handle.remove()


def test_a_vae_that_decodes_to_nan_is_an_error_not_a_black_image(monkeypatch):
    broken = Pipeline(tiny_bundle(), name="broken")
    decoder = broken.bundle.vae.decoder
    real = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda z: real(z) * float("nan"))
    with pytest.raises(NonFiniteOutputError, match="NaN"):
        broken("a cat", steps=1, width=SIZE, height=SIZE, seed=1)


def test_a_decode_that_is_nan_only_in_bf16_is_redone_in_float32(monkeypatch):
    half = Pipeline(tiny_bundle().to(torch.bfloat16), name="bf16")
    vae32 = copy.deepcopy(half.bundle.vae).float()
    decoder = half.bundle.vae.decoder
    real = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda z: real(z) * (float("nan") if z.dtype == torch.bfloat16 else 1.0))
    with pytest.warns(RuntimeWarning, match="decoding again in float32"):
        result = half("a cat", steps=2, width=SIZE, height=SIZE, seed=1)
    assert torch.isfinite(result.pixels).all() and result.pixels.std() > 0.01  # an image, not a flat / black one
    with torch.no_grad():
        expected = to_pixels(vae32.decode(result.latents.float()).to(torch.bfloat16))
    assert torch.equal(result.pixels, expected)


# ---------------------------------------------------------------------------------- 20. long prompts


def test_a_prompt_over_77_tokens_reaches_the_unet_in_whole_chunks(pipe):
    contexts = []
    handle = pipe.bundle.unet.register_forward_pre_hook(lambda m, args: contexts.append(args[2].context.shape))
    try:
        pipe(" ".join(["cat"] * 100), steps=1, width=SIZE, height=SIZE, seed=1, cfg_scale=2.0)  # 100 tokens
    finally:
        handle.remove()
    assert contexts == [(2, 2 * 77, 32)]  # 2 chunks of 77 (75 + 25 tokens) for cond and uncond, nothing cut


# ------------------------------------------------------------------------------------------- 22. steps


class NetworkRan(Exception):
    pass


@pytest.mark.parametrize("steps", [-1, 0, True, 2.0, "3", None])
def test_bad_step_counts_are_refused_before_any_network_runs(pipe, steps):
    handle = pipe.bundle.unet.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(NetworkRan()))
    try:
        with pytest.raises(ValueError, match=r"steps: must be an integer >= 1"):
            pipe("a cat", steps=steps, width=SIZE, height=SIZE, seed=1)
    finally:
        handle.remove()


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_one_step_works_for_every_sampler(pipe, sampler):
    steps = []
    result = pipe("a cat", steps=1, sampler=sampler, width=SIZE, height=SIZE, seed=3, cfg_scale=3.0,
                  callback=steps.append)  # fmt: skip
    (step,) = steps
    assert step.i == 0 and step.sigma > 0 and step.sigma_next == 0
    assert torch.equal(result.latents, step.denoised)  # one step to sigma 0 lands on the x0 prediction
    assert torch.isfinite(result.pixels).all() and result.images[0].size == (SIZE, SIZE)


# ----------------------------------------------------------------------------- 23. strength, guidance, seeds


def test_img2img_strength_zero_is_refused_and_one_runs_every_step(pipe):
    init = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    with pytest.raises(ValueError, match="strength: 0.0 with steps=4 rounds to zero denoising steps"):
        pipe("a cat", init_image=init, strength=0.0, steps=4, seed=1)
    steps = []
    full = pipe("a cat", init_image=init, strength=1.0, steps=4, seed=1, callback=steps.append)
    txt = pipe("a cat", steps=4, width=SIZE, height=SIZE, seed=1)
    assert len(steps) == 4 and full.params[0].strength == 1.0 and full.params[0].mode == "img2img"
    assert not torch.equal(full.latents, txt.latents)  # it starts from the noised init image, not from pure noise
    quarter = []
    pipe("a cat", init_image=init, strength=0.25, steps=4, seed=1, callback=quarter.append)
    assert len(quarter) == 1  # int(4 * 0.25) = 1 step


def test_guidance_zero_and_one_run_the_conditional_rows_only_and_agree(pipe):
    seen, handle = rows_seen(pipe)
    try:
        out = {s: pipe("a cat", negative="blurry", steps=2, width=SIZE, height=SIZE, seed=5, cfg_scale=s)
               for s in (0.0, 1.0, 1.5)}  # fmt: skip
    finally:
        handle.remove()
    assert seen == [1, 1, 1, 1, 2, 2]  # 2 steps each; uncond rows only when guided (cfg_scale > 1)
    assert torch.equal(out[0.0].latents, out[1.0].latents)
    assert not torch.equal(out[1.5].latents, out[1.0].latents)
    assert [out[s].params[0].cfg_scale for s in out] == [0.0, 1.0, 1.5]


def test_seed_range(pipe):
    top = 2**64 - 1
    result = pipe("a cat", steps=1, width=SIZE, height=SIZE, seed=top)
    assert result.params[0].seed == top and torch.isfinite(result.latents).all()
    for seed, message in ((2**64, r"seed: must be in \[0, 2\*\*64 - 1\]"),
                          (-1, r"seed: must be in \[0, 2\*\*64 - 1\]"),
                          (True, "seed: must be None, an int or a list of ints, got bool"),
                          (1.0, "seed: must be None, an int or a list of ints, got float"),
                          ([top, 2**64], r"seed: every seed must be an integer in \[0, 2\*\*64\)")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            pipe.check("a cat", seed=seed, n=len(seed) if isinstance(seed, list) else 1, width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match=r"seed: must be in \[0, 2\*\*64 - 2\] so that all 2 image seeds fit"):
        pipe.check("a cat", seed=top, n=2, width=SIZE, height=SIZE)
    starts_a, starts_b = [], []  # the starting noise, drawn from each image's own seed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = pipe("a cat", steps=1, width=SIZE, height=SIZE, seed=top - 1, n=2, callback=lambda s: starts_a.append(s.x))
    pipe("a cat", steps=1, width=SIZE, height=SIZE, seed=top, callback=lambda s: starts_b.append(s.x))
    assert [p.seed for p in a.params] == [top - 1, top] and torch.equal(starts_a[0][1], starts_b[0][0])
    assert not torch.equal(starts_a[0][0], starts_a[0][1])
