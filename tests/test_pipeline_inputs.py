"""Bad input is a ValueError naming the argument, raised by ``check`` and by ``__call__`` before any network runs;
the defaults and the image conversions (against diffusers' VaeImageProcessor) are what the pipeline documents."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from inference.images import image_to_tensor, latent_mask, mask_to_tensor, pixels_to_pil, resize, to_pixels
from inference.pipeline import Pipeline
from ldm.bundle import Bundle
from ldm.model_config import ModelConfig

SIZE = 32  # tiny VAE is f4


class NetworkRan(Exception):
    pass


@pytest.fixture(scope="module")
def pipe():
    """A tiny SD 1.x pipeline whose networks raise NetworkRan if called."""
    p = Pipeline(Bundle(ModelConfig.tiny("sd1")), name="tiny")
    for module in [p.bundle.unet, p.bundle.vae.encoder, p.bundle.vae.decoder, *p.bundle.text]:
        module.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(NetworkRan()))
    return p


def gray(w: int = SIZE, h: int = SIZE, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (w, h), 128)


BAD = [  # (kwargs, what the message must say)
    (dict(width=30), r"width: must be a positive multiple of 4"),
    (dict(height=0), r"height: must be a positive multiple of 4"),
    (dict(width=-8), r"width: must be a positive multiple of 4"),
    (dict(width=32.0), r"width: must be a positive multiple of 4"),
    (dict(steps=0), r"steps: must be an integer >= 1"),
    (dict(steps=2.5), r"steps: must be an integer >= 1"),
    (dict(sampler="euler_a"), r"sampler: unknown 'euler_a'; allowed: .*dpmpp_2m"),
    (dict(schedule="cosine"), r"schedule: unknown 'cosine'; allowed: discrete, karras, exponential"),
    (dict(n=0), r"n: must be an integer >= 1"),
    (dict(batch_size=0), r"batch_size: must be an integer >= 1"),
    (dict(n=2, seed=[1, 2, 3]), r"seed: a list needs one seed per image \(2 = prompts x n\), got 3"),
    (dict(seed=-1), r"seed: must be in \[0, 2\*\*64"),
    (dict(seed=[1.5]), r"seed: every seed must be an integer"),
    (dict(seed="7"), r"seed: must be None, an int or a list of ints"),
    (dict(cfg_scale=-1.0), r"cfg_scale: must be a number >= 0"),
    (dict(cfg_scale=float("nan")), r"cfg_scale: must be a number >= 0"),
    (dict(guidance_rescale=1.5), r"guidance_rescale: must be a number in \[0.0, 1.0\]"),
    (dict(sampler="euler", eta=1.0), r"eta: sampler 'euler' has no eta; samplers with eta: ddim"),
    (dict(sampler="ddim", eta=-0.5), r"eta: must be a number >= 0"),
    (dict(clip_skip=0), r"clip_skip: must be an integer in \[1, 3\]"),
    (dict(clip_skip=4), r"clip_skip: must be an integer in \[1, 3\]"),
    (dict(tile=0), r"tile: must be an integer >= 1"),
    (dict(negative=["a", "b"]), r"negative: a str or one per prompt \(1\), got 2"),
    (dict(negative=3), r"negative: must be a str or a sequence of str"),
    (dict(inpaint="pix2pix"), r"inpaint: unknown 'pix2pix'; allowed: auto, blend, unet"),
    (dict(inpaint="unet"), r"inpaint: 'unet' needs an inpainting U-Net \(9 input channels.*this one has 4"),
    (dict(strength=1.5, init_image=gray()), r"strength: must be a number in \[0.0, 1.0\]"),
    (dict(strength=-0.1), r"strength: must be a number in \[0.0, 1.0\]"),
    (dict(strength=0.1, steps=5, init_image=gray()), r"strength: 0.1 with steps=5 rounds to zero denoising steps"),
    (dict(init_image=gray(48, 32), width=32, height=32), r"init_image: is 48x32, but the image to generate is 32x32"),
    (dict(init_image=gray(), mask=gray(32, 48, "L")), r"mask: is 32x48, but the image to generate is 32x32"),
    (dict(init_image=[gray(), gray(48, 32)], prompt=["a", "b"]), r"init_image\[1\]: is 48x32"),
    (dict(init_image=[gray(), gray()]), r"init_image: a list needs one item per prompt \(1\), got 2"),
    (dict(mask=gray(mode="L")), r"mask: inpainting needs init_image too"),
    (dict(init_image="/no/such/image.png"), r"init_image: no such file: /no/such/image.png"),
    (dict(init_image=3), r"init_image: expected a PIL image, a path or a tensor"),
    (dict(init_image=torch.rand(1, 3, SIZE, SIZE) * 2), r"init_image: tensor values must be finite and in \[0, 1\]"),
    (dict(init_image=torch.rand(3, 3, SIZE, SIZE)), r"init_image: a tensor must be float with shape \(3, H, W\)"),
    (dict(init_image=gray(), mask=torch.ones(2, SIZE, SIZE)), r"mask: a tensor must be float with shape \(H, W\)"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), r"latents: .* float tensor of shape \(1, 4, 8, 8\)"),
    (dict(callback="print"), r"callback: must be callable"),
    (dict(prompt=[]), r"prompt: give at least one prompt"),
    (dict(prompt=["a", 1]), r"prompt: must be a str or a sequence of str"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_input_is_a_value_error_before_any_network_runs(pipe, kwargs, message):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "a cat")
    kwargs = {"width": SIZE, "height": SIZE, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe.check(prompt=prompt, **kwargs)
    with pytest.raises(ValueError, match=message):  # not NetworkRan: nothing ran before the error
        pipe(prompt, **kwargs)


def test_good_input_passes_check_without_running_a_network(pipe):
    pipe.check(prompt=["a", "b"], negative=["c", "d"], n=2, seed=[1, 2, 3, 4], width=SIZE, height=48, steps=3,
               sampler="ddim", eta=0.5, schedule="karras", clip_skip=2, tile=8, batch_size=3)  # fmt: skip
    pipe.check(prompt="a", init_image=gray(), mask=gray(mode="L"), strength=0.2, steps=5, inpaint="blend")
    with pytest.raises(NetworkRan):  # the hooks do fire once a call gets past the checks
        pipe("a", width=SIZE, height=SIZE, steps=1)


def test_inpainting_unet_is_accepted_and_picked_by_auto():
    cfg = ModelConfig.tiny("sd1")
    with torch.device("meta"):
        inpainting = Pipeline(Bundle(replace(cfg, unet=replace(cfg.unet, in_channels=9))))
    req = inpainting.request("a", init_image=gray(), mask=gray(mode="L"))
    assert (req.mode, req.inpaint, (req.width, req.height)) == ("inpaint", "unet", (SIZE, SIZE))  # size from the image
    assert inpainting.request("a", init_image=gray(), mask=gray(mode="L"), inpaint="blend").inpaint == "blend"


@pytest.mark.parametrize("factory,size", [("sd15", 512), ("sd21_v", 768), ("sd21_base", 512), ("sdxl_base", 1024)])
def test_default_size_of_the_published_models(factory, size):
    with torch.device("meta"):  # full size, no weights
        p = Pipeline(Bundle(getattr(ModelConfig, factory)()))
    assert p.default_size == (size, size)
    assert p.request("a").width == size


def test_default_size_of_a_test_model(pipe):
    assert pipe.default_size == (8 * 4, 8 * 4)  # an 8 x 8 latent of the f4 tiny VAE


# ------------------------------------------------------------------------------------------- images


def random_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_image_and_mask_tensors_match_vae_image_processor():
    image = random_rgb(24, 16)
    ref = VaeImageProcessor(vae_scale_factor=8).preprocess(image)
    assert torch.equal(image_to_tensor(image), ref)
    mask = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 24), dtype=np.uint8))
    proc = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    assert torch.equal(mask_to_tensor(mask), proc.preprocess(mask))
    assert torch.equal(mask_to_tensor(mask.convert("RGB")), proc.preprocess(mask.convert("RGB")))
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W) in [0, 1]
    assert torch.equal(image_to_tensor(tensor), ref)


def test_outputs_match_vae_image_processor_postprocess():
    decoded = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(0)) * 1.5  # partly out of range
    proc = VaeImageProcessor(vae_scale_factor=8)
    pixels = to_pixels(decoded)
    assert np.array_equal(pixels.numpy(), proc.postprocess(decoded, output_type="np"))
    for ours, ref in zip(pixels_to_pil(pixels), proc.postprocess(decoded, output_type="pil")):
        assert ours.mode == "RGB" and np.array_equal(np.asarray(ours), np.asarray(ref))


def test_latent_mask_is_nearest_neighbour():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 3:6, 0:2] = 1
    expected = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # nearest picks rows/cols 0 and 4
    assert torch.equal(latent_mask(mask, 2, 2)[0, 0], expected)


def test_resize_modes():
    image = random_rgb(40, 20)
    assert resize(image, 40, 20).tobytes() == image.tobytes()
    assert resize(image, 30, 30, "stretch").size == (30, 30)
    crop = resize(image, 20, 20, "crop")  # 40x20 -> 40x20 (scale 1), centre 20x20 = columns 10..29
    assert crop.tobytes() == image.crop((10, 0, 30, 20)).tobytes()
    pad = resize(image, 40, 40, "pad")  # fits as 40x20, black bands above and below
    arr = np.asarray(pad)
    assert arr[:10].max() == 0 and arr[30:].max() == 0 and np.array_equal(arr[10:30], np.asarray(image))
    with pytest.raises(ValueError, match="resize mode: unknown 'fit'"):
        resize(image, 8, 8, "fit")


# ------------------------------------------------------------------------------------------- conditions


def test_long_prompt_and_short_negative_get_the_same_length():
    """A prompt of 2 chunks and a negative of 1: the negative is padded with the empty prompt's chunk, which is what
    encode_prompts gives a shorter prompt encoded in one batch with a longer one (the webui's pad_cond)."""
    from inference.conditioning import PromptEncoder
    from text_encoder.prompts import encode_prompts

    bundle = Bundle(ModelConfig.tiny("sd1")).eval()
    long, short = "a red fox in the snow, " * 16, "blurry"
    with torch.no_grad():
        cond, uncond = PromptEncoder(bundle).conds([long], [short], height=SIZE, width=SIZE)
        ref, _ = encode_prompts(bundle.text[0], [long, short])  # (2, 154, D)
    assert cond.context.shape == uncond.context.shape == (1, 154, 32)
    assert torch.equal(cond.context, ref[:1]) and torch.equal(uncond.context, ref[1:])
    assert cond.vector is None and cond.concat is None
