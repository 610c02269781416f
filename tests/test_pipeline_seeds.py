"""Seeds: image k of a batch equals the same prompt and seed generated alone, bit for bit (CPU), for every sampler.

The reference for image k is the pipeline itself run on image k alone (one prompt, one seed) or in other network
batches: the property is batch independence; torch.equal on the final latents (and on the float pixels: images are
decoded one by one). Stochastic samplers run with eta = 1 where they take one, so their per-step noise
(ldm.samplers.per_sample_noise) is exercised. A tiny random SD 1.x bundle, 12 x 12 latents, CFG on.

The pipeline can only be as batch independent as the U-Net's forward pass. On the CPU, MKL's sgemm rounds
differently for fewer than 4 rows (and oneDNN's convolution for a batch of 1), so a network call with the 2 rows of
one guided image may differ in the last bit from the same rows inside a larger batch; in the U-Net that hits the
(B, E) time / vector embedding linears (and attention at levels with fewer than 4 tokens, hence 12 x 12 latents
here). ``test_image_k_of_a_batch_equals_it_alone`` therefore first checks the U-Net itself on 2 vs 8 rows and is
marked xfail, naming that cause, when the U-Net is not batch invariant there; batches of >= 2 images (>= 4 rows)
are compared strictly in any case.
"""
from __future__ import annotations

import pytest
import torch

from inference.images import image_to_tensor
from inference.pipeline import Pipeline
from ldm.bundle import Bundle
from ldm.conditioning import Cond
from ldm.model_config import ModelConfig
from ldm.samplers import SAMPLERS, randn_per_sample
from ldm.samplers.config import TAKES_ETA
from tests.test_unet_parity import randomize_ as randomize_unet
from tests.test_vae_parity import randomize_ as randomize_vae

SIZE = 48  # tiny VAE is f4: 12 x 12 latents, U-Net levels 12, 6, 3, 2: >= 4 tokens per image everywhere (see above)
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]
SEED = 1234
KW = dict(steps=3, width=SIZE, height=SIZE, negative="blurry", cfg_scale=5.0)


@pytest.fixture(scope="module")
def pipe():
    b = Bundle(ModelConfig.tiny("sd1"))
    randomize_unet(b.unet, seed=1)
    randomize_vae(b.vae, seed=2)
    return Pipeline(b, name="tiny")


def options(sampler: str) -> dict:
    return dict(KW, sampler=sampler, **({"eta": 1.0} if sampler in TAKES_ETA else {}))


def require_batch_invariant_unet(pipe) -> None:
    """xfail (naming the cause) if the U-Net alone gives other bits for 2 rows than for the same rows among 8."""
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(8, 4, SIZE // 4, SIZE // 4, generator=g), torch.randn(8, 77, 32, generator=g)
    t, unet = torch.full((8,), 500.0), pipe.bundle.unet
    with torch.no_grad():
        same = torch.equal(unet(x, t, Cond(context=ctx))[:2], unet(x[:2], t[:2], Cond(context=ctx[:2])))
    if not same:
        pytest.xfail("the U-Net's forward pass is not batch invariant for 2 rows on this CPU (MKL sgemm below 4 rows "
                     "in the (B, E) embedding linears): ldm/unet.py must pad those rows; see the module docstring")


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_image_k_of_a_batch_equals_it_alone(pipe, sampler):
    require_batch_invariant_unet(pipe)
    batch = pipe(PROMPTS, n=2, seed=SEED, **options(sampler))  # 4 images: prompt 0 twice, then prompt 1 twice
    for k in range(4):
        alone = pipe(PROMPTS[k // 2], seed=SEED + k, **options(sampler))
        assert torch.equal(batch.latents[k : k + 1], alone.latents), f"image {k}"
        assert torch.equal(batch.pixels[k : k + 1], alone.pixels), f"image {k}"


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_network_batches_do_not_change_the_images(pipe, sampler):
    """4 images in one network batch = the same in two batches of 2 (batch_size); order, seeds and prompts kept."""
    whole = pipe(PROMPTS, n=2, seed=SEED, **options(sampler))  # prompt 0 twice, then prompt 1 twice
    assert [(p.prompt, p.seed) for p in whole.params] == [(PROMPTS[k // 2], SEED + k) for k in range(4)]
    split = pipe(PROMPTS, n=2, seed=SEED, batch_size=2, **options(sampler))
    assert torch.equal(whole.latents, split.latents)
    assert torch.equal(whole.pixels, split.pixels)
    if sampler == "euler_ancestral":  # an image's batch neighbours do not matter either
        swapped = pipe(PROMPTS[::-1], n=2, seed=[SEED + 2, SEED + 3, SEED, SEED + 1], batch_size=2, **options(sampler))
        assert torch.equal(whole.latents, torch.cat([swapped.latents[2:], swapped.latents[:2]]))
    assert not torch.equal(whole.latents[0], whole.latents[1])  # the seed matters


def test_img2img_and_blend_inpainting_are_batch_independent(pipe):
    init = pipe("a cat", seed=3, **options("euler")).images[0]
    mask = torch.zeros(SIZE, SIZE)
    mask[12:36, 8:30] = 1.0
    for extra in (dict(init_image=init, strength=0.7), dict(init_image=init, mask=mask, strength=0.7)):
        whole = pipe(PROMPTS, n=2, seed=[21, 22, 23, 24], **options("euler_ancestral"), **extra)
        split = pipe(PROMPTS, n=2, seed=[21, 22, 23, 24], batch_size=2, **options("euler_ancestral"), **extra)
        assert torch.equal(whole.latents, split.latents)


def test_random_seeds_are_recorded_and_reproduce(pipe):
    first = pipe(PROMPTS[0], n=2, seed=None, **options("dpmpp_2m_sde"))
    seeds = [p.seed for p in first.params]
    assert seeds[1] == seeds[0] + 1
    again = pipe(PROMPTS[0], n=2, seed=seeds, **options("dpmpp_2m_sde"))
    assert torch.equal(first.latents, again.latents)


def test_latents_argument_is_the_starting_noise(pipe):
    """Passing the noise that the seeds would draw gives the seeded result exactly (for a deterministic sampler)."""
    gens = [torch.Generator().manual_seed(s) for s in (40, 41)]
    noise = randn_per_sample(gens, (4, SIZE // 4, SIZE // 4), "cpu", torch.float32)
    seeded = pipe(PROMPTS, seed=[40, 41], **options("heun"))
    given = pipe(PROMPTS, seed=[0, 1], latents=noise, **options("heun"))
    assert torch.equal(seeded.latents, given.latents)


def test_blend_inpainting_keeps_the_seeded_posterior_sample_where_the_mask_is_0(pipe):
    """Known region = the init image's VAE posterior sample, drawn first from the image's generator (as diffusers)."""
    init = pipe("a cat", seed=3, **options("euler")).images[0]
    mask = torch.zeros(SIZE, SIZE)
    mask[:, : SIZE // 2] = 1.0  # generate the left half, keep the right half
    result = pipe("a dog", seed=77, init_image=init, mask=mask, strength=0.8, **options("dpmpp_2m_sde"))
    with torch.no_grad():
        z0 = pipe.bundle.vae.encode(image_to_tensor(init), generator=[torch.Generator().manual_seed(77)])
    keep = SIZE // 4 // 2
    assert torch.equal(result.latents[..., keep:], z0[..., keep:])
    assert not torch.allclose(result.latents[..., :keep], z0[..., :keep], atol=1e-2)
