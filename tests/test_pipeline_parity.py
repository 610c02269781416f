"""Image-level parity of inference.pipeline.Pipeline with diffusers' pipelines on the same tiny random weights.

A tiny random bundle is saved as a diffusers folder (save_bundle(format="diffusers")) and loaded twice: by
``Pipeline.load`` and by diffusers' ``from_pretrained`` (offline; tokenizers built from open_clip's vocabulary by
tests/test_tokenizer.py's ``hf_tokenizer``, SDXL's second one padding with "!" = id 0 as the published one).
Each diffusers scheduler is configured as our SamplerConfig places the steps: ``leading`` spacing with
``steps_offset=1``, ending at sigma = 0 (DDIM ``set_alpha_to_one=True``). Both sides draw from one CPU generator
per image (diffusers given a list of generators), so they start from the same latents; img2img and inpainting also
draw the VAE posterior samples from them in the same order.

Compared: our float pixels (``GenerationResult.pixels``, before uint8 rounding) with diffusers' ``output_type="np"``,
max abs difference <= 1e-4 in fp32. Every case uses a negative prompt, and guidance rescale 0.7 wherever the
diffusers pipeline has it (see NO_RESCALE). So that the comparison can fail, the images are checked to be far from
saturated and to change with what is compared (the negative prompt, the rescale, zeros for SDXL's empty negative).
"""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)  # fmt: skip
from PIL import Image

from inference.pipeline import Pipeline
from ldm.bundle import Bundle, save_bundle
from ldm.model_config import ModelConfig
from tests.fakes import SD_SCHEDULE
from tests.test_text_encoder_parity import randomize_ as randomize_text
from tests.test_tokenizer import hf_tokenizer  # noqa: F401  (fixture)
from tests.test_unet_parity import randomize_ as randomize_unet
from tests.test_vae_parity import randomize_ as randomize_vae

TOL = 1e-4
WIDTH, HEIGHT = 48, 32  # tiny VAE is f4: a 12 x 8 latent (not square, not a multiple of the U-Net's 8)
STEPS = 5
PROMPTS = ["a photograph of an astronaut riding a horse", "a red fox in the snow"]
NEGATIVE = "blurry, low quality"
SEEDS = [11, 12]
RESCALE = 0.7
# diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline have no guidance rescale (their
# __call__ swallows the argument in **kwargs and ignores it), so those comparisons run without it; rescale with
# img2img is compared against StableDiffusionXLImg2ImgPipeline, which has it.
NO_RESCALE = 0.0
SCHEDULERS = {  # our sampler -> the diffusers scheduler with the same step placement
    "ddim": lambda: DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                                  timestep_spacing="leading"),  # fmt: skip
    "euler": lambda: EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1),
    "dpmpp_2m": lambda: DPMSolverMultistepScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1),
}


@pytest.fixture(scope="module")
def tokenizers(hf_tokenizer):  # noqa: F811
    tok = copy.deepcopy(hf_tokenizer)
    tok.model_max_length = 77
    tok_2 = copy.deepcopy(tok)
    tok_2.pad_token = "!"  # SDXL's tokenizer_2 pads with id 0, as open_clip (our bigG tower's pad_id)
    return tok, tok_2


def tiny_folder(root, family: str, inpainting: bool = False):
    cfg = ModelConfig.tiny(family)
    if inpainting:
        cfg = replace(cfg, unet=replace(cfg.unet, in_channels=9))
    b = Bundle(cfg)
    randomize_unet(b.unet, seed=1)
    randomize_vae(b.vae, seed=2)
    with torch.no_grad():  # random decoders overshoot [-1, 1] (std ~2): scale the output so images are not clipped
        b.vae.decoder.conv_out.weight.mul_(0.25)
        b.vae.decoder.conv_out.bias.mul_(0.25)
    for i, tower in enumerate(b.text):
        randomize_text(tower, seed=3 + i)
    save_bundle(b, root, format="diffusers")
    return root


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, tokenizers):
    root = tiny_folder(tmp_path_factory.mktemp("sd1") / "tiny-sd1", "sd1")
    ref = StableDiffusionPipeline.from_pretrained(root, tokenizer=tokenizers[0])
    ref.set_progress_bar_config(disable=True)
    return Pipeline.load(root), ref


@pytest.fixture(scope="module")
def sd1_inpainting(tmp_path_factory, tokenizers):
    root = tiny_folder(tmp_path_factory.mktemp("sd1i") / "tiny-inpaint", "sd1", inpainting=True)
    base = StableDiffusionPipeline.from_pretrained(root, tokenizer=tokenizers[0])
    ref = StableDiffusionInpaintPipeline(**base.components)
    ref.set_progress_bar_config(disable=True)
    return Pipeline.load(root), ref


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, tokenizers):
    root = tiny_folder(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", "sdxl")
    ref = StableDiffusionXLPipeline.from_pretrained(root, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1])
    ref.set_progress_bar_config(disable=True)
    return Pipeline.load(root), ref


def reference(ref, sampler: str, seeds, rescale: float = RESCALE, **kwargs) -> torch.Tensor:
    """diffusers' float images (N, H, W, 3) with the scheduler of ``sampler`` and one generator per image."""
    ref.scheduler = SCHEDULERS[sampler]()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    if "image" not in kwargs or "mask_image" in kwargs:  # img2img pipelines take the image's size
        kwargs.update(height=HEIGHT, width=WIDTH)
    if rescale:
        kwargs["guidance_rescale"] = rescale
    out = ref(num_inference_steps=STEPS, guidance_scale=7.5, generator=gens, output_type="np", **kwargs).images
    return torch.from_numpy(np.asarray(out))


def ours(pipe: Pipeline, sampler: str, prompts, seeds, rescale: float = RESCALE, **kwargs):
    return pipe(prompts, steps=STEPS, sampler=sampler, cfg_scale=7.5, guidance_rescale=rescale, seed=seeds,
                width=WIDTH, height=HEIGHT, **kwargs)  # fmt: skip


def assert_images_match(result, ref: torch.Tensor) -> None:
    got = result.pixels
    assert got.shape == ref.shape == (ref.shape[0], HEIGHT, WIDTH, 3)
    inside = ((ref > 0.02) & (ref < 0.98)).float().mean().item()
    assert inside > 0.5, f"reference images are saturated ({inside:.0%} of values inside (0, 1)): a weak comparison"
    err = (got - ref).abs().max().item()
    assert err <= TOL, f"max |ours - diffusers| = {err:.3g}"
    # the PIL images are the float ones rounded, as diffusers' output_type="pil"
    assert np.array_equal(np.asarray(result.images[0]), (got[0].numpy() * 255).round().astype("uint8"))


def assert_sensitive(result, other) -> None:
    """The compared output depends on what is compared (here: the negative prompt) well above the tolerance."""
    assert (result.pixels - other.pixels).abs().max().item() > 100 * TOL


def init_image(seed: int = 7) -> Image.Image:
    """A smooth random RGB image (upsampled noise), WIDTH x HEIGHT."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, HEIGHT // 8, WIDTH // 8, generator=g)
    x = torch.nn.functional.interpolate(small, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)
    return Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def mask_image() -> Image.Image:
    """White (repaint) on the right half's middle band, black (keep) elsewhere; edges off the latent grid."""
    m = np.zeros((HEIGHT, WIDTH), dtype="uint8")
    m[6:27, 21:45] = 255
    return Image.fromarray(m)


# ----------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@torch.no_grad()
def test_txt2img_matches_stable_diffusion_pipeline(sd1, sampler):
    pipe, ref = sd1
    result = ours(pipe, sampler, PROMPTS, SEEDS, negative=NEGATIVE)
    assert_images_match(result, reference(ref, sampler, SEEDS, prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2))
    assert [p.seed for p in result.params] == SEEDS and result.params[0].model == "tiny-sd1"
    if sampler == "euler":
        assert_sensitive(result, ours(pipe, sampler, PROMPTS, SEEDS, negative="a cat"))


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@torch.no_grad()
def test_img2img_matches_img2img_pipeline(sd1, sampler):
    pipe, base = sd1
    ref = StableDiffusionImg2ImgPipeline(**base.components)
    ref.set_progress_bar_config(disable=True)
    image = init_image()
    kw = dict(init_image=image, strength=0.6, rescale=NO_RESCALE)  # 3 of the 5 steps
    result = ours(pipe, sampler, PROMPTS, SEEDS, negative=NEGATIVE, **kw)
    expected = reference(ref, sampler, SEEDS, NO_RESCALE, prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2, image=image,
                         strength=0.6)  # fmt: skip
    assert_images_match(result, expected)
    assert result.params[0].mode == "img2img" and result.params[0].strength == 0.6
    if sampler == "ddim":
        assert_sensitive(result, ours(pipe, sampler, PROMPTS, SEEDS, negative="a cat", **kw))


@pytest.mark.parametrize("sampler,strength", [("ddim", 1.0), ("euler", 1.0), ("dpmpp_2m", 1.0), ("euler", 0.75)])
@torch.no_grad()
def test_inpaint_matches_inpaint_pipeline_with_9_channel_unet(sd1_inpainting, sampler, strength):
    """One image per call: diffusers draws a single image's posterior samples from generator 0 alone."""
    pipe, ref = sd1_inpainting
    image, mask = init_image(), mask_image()
    kw = dict(init_image=image, mask=mask, strength=strength, rescale=NO_RESCALE)
    result = ours(pipe, sampler, PROMPTS[:1], SEEDS[:1], negative=NEGATIVE, **kw)
    expected = reference(ref, sampler, SEEDS[:1], NO_RESCALE, prompt=PROMPTS[:1], negative_prompt=[NEGATIVE],
                         image=image, mask_image=mask, strength=strength)  # fmt: skip
    assert_images_match(result, expected)
    assert result.params[0].mode == "inpaint"
    if strength < 1:
        assert_sensitive(result, ours(pipe, sampler, PROMPTS[:1], SEEDS[:1], negative="a cat", **kw))


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@torch.no_grad()
def test_sdxl_matches_stable_diffusion_xl_pipeline(sdxl, sampler):
    pipe, ref = sdxl
    result = ours(pipe, sampler, PROMPTS, SEEDS, negative=NEGATIVE)
    assert_images_match(result, reference(ref, sampler, SEEDS, prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2))
    if sampler == "dpmpp_2m":
        assert_sensitive(result, ours(pipe, sampler, PROMPTS, SEEDS, negative="a cat"))


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@torch.no_grad()
def test_sdxl_img2img_with_guidance_rescale_matches_sdxl_img2img_pipeline(sdxl, sampler):
    pipe, base = sdxl
    ref = StableDiffusionXLImg2ImgPipeline(**base.components)
    ref.set_progress_bar_config(disable=True)
    image = init_image()
    result = ours(pipe, sampler, PROMPTS, SEEDS, negative=NEGATIVE, init_image=image, strength=0.6)
    assert_images_match(result, reference(ref, sampler, SEEDS, prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2,
                                          image=image, strength=0.6))  # fmt: skip
    if sampler == "euler":
        no_rescale = ours(pipe, sampler, PROMPTS, SEEDS, rescale=0.0, negative=NEGATIVE, init_image=image, strength=0.6)
        assert_sensitive(result, no_rescale)


@torch.no_grad()
def test_sdxl_empty_negative_is_zeros_as_diffusers(sdxl):
    """force_zeros_for_empty_prompt: our empty negative = diffusers' negative_prompt=None (zero embeddings)."""
    pipe, ref = sdxl
    result = ours(pipe, "euler", PROMPTS, SEEDS)
    assert_images_match(result, reference(ref, "euler", SEEDS, prompt=PROMPTS, negative_prompt=None))
    encoded_empty = reference(ref, "euler", SEEDS, prompt=PROMPTS, negative_prompt=[""] * 2)  # what zeros replace
    assert (result.pixels - encoded_empty).abs().max().item() > 100 * TOL


@torch.no_grad()
def test_sdxl_size_conditioning_matches_diffusers(sdxl):
    """original_size / crops_coords_top_left / target_size: the ids of SDXL's micro-conditioning (sec. 2.2)."""
    pipe, ref = sdxl
    sizes = dict(original_size=(512, 384), crop_coords=(16, 8), target_size=(256, 320))
    result = ours(pipe, "euler", PROMPTS, SEEDS, negative=NEGATIVE, **sizes)
    expected = reference(ref, "euler", SEEDS, prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2, original_size=(512, 384),
                         crops_coords_top_left=(16, 8), target_size=(256, 320))  # fmt: skip
    assert_images_match(result, expected)
    assert_sensitive(result, ours(pipe, "euler", PROMPTS, SEEDS, negative=NEGATIVE))
    with pytest.raises(ValueError, match=r"crop_coords: two integers >= 0"):
        pipe.check(PROMPTS, crop_coords=(1.5, 0))
