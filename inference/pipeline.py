"""Text-to-image, image-to-image and inpainting: prompts (+ image, mask) -> PIL images with their parameters.

    pipe = Pipeline.load("sd_xl_base_1.0.safetensors", device="cuda", dtype="fp16")
    result = pipe(["a fox in the snow"], negative="blurry", steps=25, sampler="dpmpp_2m", seed=1, n=4)
    result.images[0].save("fox.png", pnginfo=png_info(result.params[0]))

How one call runs (every piece is imported from below; nothing here knows eps / v or a sampler's update):

1. ``check`` resolves and validates every argument (ValueError naming it) before any network runs.
2. Images are ordered prompt-major, ``n`` per prompt; image k has seed ``seeds[k]`` and its own CPU generator,
   which draws, in this order: the VAE posterior sample of the init image (img2img, and inpainting unless it starts
   from pure noise), the starting noise (or ``latents``), the posterior sample of the masked image (9-channel
   inpainting U-Net), then every stochastic sampler step (ldm.samplers.per_sample_noise). That is the order of
   diffusers' img2img / inpaint pipelines given one generator per image, and it makes image k of a batch equal to
   the same prompt and seed generated alone, bit for bit on the CPU (images are encoded and decoded one by one).
3. Sigmas: ``SamplerConfig`` + ``make_sigmas`` (each sampler places its steps as its diffusers scheduler does);
   img2img / inpaint keep the last ``int(steps * strength)`` of them (ldm.img2img.strength_sigmas).
4. Start: txt2img ``noise * sqrt(1 + sigma_max^2)`` (the exact VP prior, diffusers' ``init_noise_sigma`` for its VP
   schedulers); img2img ``z0 + sigma_0 * noise``; inpainting as img2img, or the txt2img start at strength 1
   (diffusers' ``is_strength_max``).
5. Guidance: ldm.guidance.cfg, conditional and unconditional rows in one network call; ``cfg_scale <= 1`` runs the
   conditional rows only (diffusers' ``do_classifier_free_guidance``). Conditions: inference/conditioning.py.
6. Inpainting, mask 1 = generate (white), 0 = keep: ``unet`` feeds SD's 9-channel inpainting U-Net the latent mask
   and the masked image's latent through ``Cond.concat`` (diffusers' StableDiffusionInpaintPipeline: masked image =
   image * (mask < 0.5), nearest-neighbour mask resize); ``blend`` works with any U-Net by keeping the known
   region on its forward process (ldm.img2img.inpaint_denoiser, blend_known); ``auto`` = unet iff 9 input channels.
   A 9-channel U-Net without a mask gets mask = 1 over a blank (0) image, as the webui does for txt2img.
7. Decode with the NaN-safe VAE path, then pixels = (x / 2 + 0.5).clamp(0, 1) and uint8 = round(255 pixels), as
   diffusers' output_type "np" / "pil" (inference/images.py); ``GenerationResult.pixels`` keeps the float pixels.
   ``tile`` (latent pixels, overlap tile // 4) tiles the VAE decode, and the encode of init images (x factor pixels).

Keyword arguments of ``__call__`` are those of ``request`` (which ``check`` runs alone).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

import autoencoder  # noqa: F401  registers the vae component
import text_encoder  # noqa: F401  registers the text component
from ldm.bundle import Bundle, load_bundle
from ldm.generate import generators
from ldm.conditions import guided_branches
from ldm.guidance import cfg, guide
from ldm.img2img import blend_known, inpaint_denoiser, noised, strength_sigmas
from ldm.model_config import PUBLISHED_MODEL_CHANNELS
from ldm.samplers import SAMPLERS, Step, per_sample_noise, randn_per_sample
from ldm.samplers.config import DEFAULT_CONVENTION, TAKES_ETA, SamplerConfig, make_sigmas, sampler_options
from ldm.samplers.config import configured_sampler  # teleport (ldm/samplers/teleport.py)
from ldm.schedule import SIGMA_SPACINGS
from ldm.speed import SpeedConfig, apply_speed

from .conditioning import PromptEncoder, vector_kind
from .conditions import check_condition_args, condition_extra, set_control_windows, speed_controls
from .images import (image_size, image_to_tensor, latent_mask, mask_to_tensor, open_image, pixels_to_pil,
                     to_pixels)  # fmt: skip
from .call_args import check_int, check_number, per_prompt, seed_list, str_list
from .metadata import GenerationParams, model_hash

INPAINT_MODES = ("auto", "blend", "unet")
PUBLISHED_SIZES = {"sd1": 512, "sd2": 768, "sdxl": 1024}  # sd2: the 768-v model; sd2 eps (base) is 512
TEST_LATENT_SIZE = 8  # default latent side of other (test-sized) models


@dataclass
class GenerationResult:
    images: list[Image.Image]  # one per (prompt, repeat), prompt-major, n per prompt
    params: list[GenerationParams]  # what made each image
    latents: Tensor  # (N, C, h, w) final latents
    pixels: Tensor | None = None  # (N, H, W, 3) float32 in [0, 1] before uint8 rounding (diffusers' output "np")


@dataclass
class Request:
    """A checked call: everything resolved to one value per image where it varies."""

    prompts: list[str]  # (N,) prompt-major
    negatives: list[str]  # (N,)
    seeds: list[int] | None  # (N,); None: drawn when the call runs
    width: int
    height: int
    mode: str  # txt2img | img2img | inpaint
    inpaint: str | None  # unet | blend (inpaint mode only)
    sampler: SamplerConfig
    strength: float
    batch_size: int
    init_images: list[Tensor] | None  # one (1, 3, H, W) in [-1, 1] per prompt
    masks: list[Tensor] | None  # one (1, 1, H, W) in {0, 1} per prompt
    n: int
    clip_skip: int | None
    tile: int | None
    progress: bool
    callback: Callable[[Step], None] | None
    latents: Tensor | None
    conditions: dict | None = None  # name -> one value per prompt (ldm/conditions/), see inference/conditions.py
    condition_scales: dict | None = None  # name -> its own guidance scale
    condition_weights: dict | None = None  # name -> strength (controls)
    condition_ranges: dict | None = None  # name -> (start, end) step fractions (controls)
    sdxl_sizes: dict | None = None  # SDXL: original_size, crop, target_size ((h, w) / (top, left)) when given

    @property
    def guided(self) -> bool:
        return self.sampler.cfg_scale > 1 or bool(self.condition_scales)


class Pipeline:
    """A loaded model and the one entry point ``pipe(prompt, ...) -> GenerationResult`` (see the module docstring)."""

    def __init__(self, bundle: Bundle, name: str = "", model_hash: str = "", speed: SpeedConfig | None = None):
        """``speed``: the U-Net's speed switches (ldm/speed.py), applied in place on the device the bundle is on;
        None: SpeedConfig(), the fastest correct defaults (CUDA: cuDNN attention, fused QKV, CUDA graphs; CPU: none)."""
        if not isinstance(bundle, Bundle):
            raise TypeError(f"Pipeline needs a Bundle, got {type(bundle).__name__}")
        self.bundle = bundle.eval()
        self.name = name
        self.model_hash = model_hash
        self.speed_config = speed
        self.speed = apply_speed(self.bundle.unet, speed)
        speed_controls(self.bundle, speed)  # and the model's ControlNets

    @classmethod
    def load(cls, path, *, device="cpu", dtype="fp32", family=None, prediction=None, config_overrides=(),
             speed: SpeedConfig | None = None) -> "Pipeline":  # fmt: skip
        """Load a model file or folder (any format ldm.bundle.load_bundle reads); name = its file / folder stem."""
        path = Path(path)
        (speed or SpeedConfig()).resolve(device)  # the speed switches' errors for this device, before the loading
        bundle = load_bundle(path, dtype=dtype, device=device, family=family, prediction=prediction,
                             config_overrides=config_overrides)  # fmt: skip
        return cls(bundle, name=path.name if path.is_dir() else path.stem, model_hash=model_hash(path), speed=speed)

    @property
    def device(self) -> torch.device:
        return next(self.bundle.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.bundle.unet.parameters()).dtype

    @property
    def base_in_channels(self) -> int:
        """The U-Net input channels this pipeline fills (latent, or an inpainting U-Net's latent + mask + masked
        image); the channels of the model's further conditions (ldm/conditions/) come after them."""
        cfg = self.bundle.config
        return cfg.unet.in_channels - cfg.condition_widths()["concat"]

    @property
    def factor(self) -> int:
        """Pixels per latent pixel (the VAE's downsampling factor: 8 for SD)."""
        return self.bundle.config.vae.downsample_factor

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height): 512 SD 1.x, 768 SD 2.x v (512 eps), 1024 SDXL, for the published U-Net width;
        ``8 * factor`` (an 8 x 8 latent) for other, test-sized models; the size the model was trained at when its
        config records one (``sample_size``, written by training)."""
        cfg = self.bundle.config
        if cfg.sample_size is not None:
            height, width = cfg.sample_size
            return width, height
        if cfg.unet.model_channels == PUBLISHED_MODEL_CHANNELS:
            side = PUBLISHED_SIZES.get(cfg.family, 512)
            if cfg.family == "sd2" and cfg.diffusion.prediction != "v":
                side = 512
            return side, side
        return TEST_LATENT_SIZE * self.factor, TEST_LATENT_SIZE * self.factor

    # ------------------------------------------------------------------------------------------ checking

    def check(self, prompt="", **kwargs) -> None:
        """Validate the arguments of ``__call__`` (ValueError naming the first bad one); runs no network."""
        self.request(prompt, **kwargs)

    def request(self, prompt: str | Sequence[str], *, negative: str | Sequence[str] = "", steps: int = 25,
                sampler: str = "dpmpp_2m", schedule: str = "discrete", cfg_scale: float = 7.5,
                guidance_rescale: float = 0.0, seed: int | Sequence[int] | None = None, width: int | None = None,
                height: int | None = None, n: int = 1, batch_size: int | None = None, init_image=None,
                strength: float = 0.8, mask=None, inpaint: str = "auto", clip_skip: int | None = None,
                eta: float | None = None, tile: int | None = None, progress: bool = False, callback=None,
                latents=None, conditions=None, condition_scales=None, condition_weights=None,
                condition_ranges=None, original_size=None, crop_coords=None, target_size=None,
                teleport: float = 0.0, teleport_stats=None) -> Request:  # fmt: skip
        """The checked, resolved form of a call's arguments."""
        cfg = self.bundle.config
        prompts = str_list("prompt", prompt)
        if not prompts:
            raise ValueError("prompt: give at least one prompt (\"\" for the empty prompt)")
        negatives = [negative] * len(prompts) if isinstance(negative, str) else str_list("negative", negative)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative: a str or one per prompt ({len(prompts)}), got {len(negatives)}")
        check_int("n", n, 1)
        total = len(prompts) * n
        if batch_size is not None:
            check_int("batch_size", batch_size, 1)
        check_int("steps", steps, 1)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: unknown {sampler!r}; allowed: {', '.join(sorted(SAMPLERS))}")
        if schedule not in SIGMA_SPACINGS:
            raise ValueError(f"schedule: unknown {schedule!r}; allowed: {', '.join(SIGMA_SPACINGS)}")
        check_number("cfg_scale", cfg_scale, 0.0)
        check_number("guidance_rescale", guidance_rescale, 0.0, 1.0)
        if eta is not None:
            if sampler not in TAKES_ETA:
                raise ValueError(f"eta: sampler {sampler!r} has no eta; samplers with eta: {', '.join(TAKES_ETA)}")
            check_number("eta", eta, 0.0)
        seeds = seed_list(seed, total)
        if clip_skip is not None:
            check_int("clip_skip", clip_skip, 1, cfg.text[0].layers)
        if tile is not None:
            check_int("tile", tile, 1)
        if inpaint not in INPAINT_MODES:
            raise ValueError(f"inpaint: unknown {inpaint!r}; allowed: {', '.join(INPAINT_MODES)}")
        latent_ch, in_ch = cfg.vae.latent_channels, self.base_in_channels
        if in_ch not in (latent_ch, 2 * latent_ch + 1):
            raise ValueError(f"model: a U-Net with {in_ch} input channels is not supported here (the latent's "
                             f"{latent_ch}, or {2 * latent_ch + 1} for an inpainting U-Net)")  # fmt: skip
        if inpaint == "unet" and in_ch != 2 * latent_ch + 1:
            raise ValueError(f"inpaint: 'unet' needs an inpainting U-Net ({2 * latent_ch + 1} input channels: latent, "
                             f"mask, masked image); this one has {in_ch}. Use inpaint='blend'")  # fmt: skip
        vector_kind(self.bundle)

        inits = per_prompt("init_image", init_image, len(prompts))
        masks = per_prompt("mask", mask, len(prompts))
        if masks is not None and inits is None:
            raise ValueError("mask: inpainting needs init_image too (the image whose masked region is redrawn)")
        inits = None if inits is None else [open_image(im, "init_image") for im in inits]
        masks = None if masks is None else [open_image(m, "mask") for m in masks]
        dw, dh = self.default_size if inits is None else image_size(inits[0], "init_image")
        width, height = dw if width is None else width, dh if height is None else height
        f = self.factor
        for name, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, int) or v < f or v % f:
                raise ValueError(f"{name}: must be a positive multiple of {f} (the VAE's downsampling factor), "
                                 f"got {v!r}")  # fmt: skip
        for name, items in (("init_image", inits), ("mask", masks)):
            for k, im in enumerate(items or []):
                if image_size(im, name) != (width, height):
                    w, h = image_size(im, name)
                    which = f"{name}[{k}]" if len(items) > 1 else name
                    raise ValueError(f"{which}: is {w}x{h}, but the image to generate is {width}x{height}; resize it "
                                     f"(inference.images.resize) or pass width and height to match")  # fmt: skip
        init_t = None if inits is None else [image_to_tensor(im) for im in inits]  # checks tensor ranges too
        mask_t = None if masks is None else [mask_to_tensor(m) for m in masks]
        mode = "txt2img" if init_t is None else ("img2img" if mask_t is None else "inpaint")

        check_number("strength", strength, 0.0, 1.0)
        if mode != "txt2img" and int(steps * strength) < 1:
            raise ValueError(f"strength: {strength} with steps={steps} rounds to zero denoising steps "
                             f"(int(steps * strength) = 0); raise strength or steps")  # fmt: skip
        if latents is not None:
            shape = (total, latent_ch, height // f, width // f)
            if not isinstance(latents, Tensor) or tuple(latents.shape) != shape or not latents.is_floating_point():
                got = f"{latents.dtype} {tuple(latents.shape)}" if isinstance(latents, Tensor) else type(latents)
                raise ValueError(f"latents: the starting noise must be a float tensor of shape {shape}, got {got}")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback: must be callable, got {type(callback).__name__}")
        if not isinstance(progress, bool):
            raise ValueError(f"progress: must be a bool, got {progress!r}")
        inpaint_mode = None
        if mode == "inpaint":
            inpaint_mode = inpaint if inpaint != "auto" else ("unet" if in_ch == 2 * latent_ch + 1 else "blend")
        sc = SamplerConfig(name=sampler, steps=steps, sigma_spacing=schedule, eta=eta, cfg_scale=float(cfg_scale),
                           guidance_rescale=float(guidance_rescale))  # fmt: skip
        sdxl_sizes = _sdxl_sizes(cfg.family, original_size, crop_coords, target_size)
        sc = _teleport_config(sc, teleport, teleport_stats)  # analytical teleportation, 0 = off
        conds = check_condition_args(self.bundle, len(prompts), (width, height), conditions, condition_scales,
                                     condition_weights, condition_ranges)  # fmt: skip
        return Request(
            prompts=[p for p in prompts for _ in range(n)], negatives=[q for q in negatives for _ in range(n)],
            seeds=seeds, width=width, height=height, mode=mode, inpaint=inpaint_mode, sampler=sc,
            strength=float(strength), batch_size=batch_size or total, init_images=init_t, masks=mask_t, n=n,
            clip_skip=clip_skip, tile=tile, progress=progress, callback=callback, latents=latents, **conds,
            sdxl_sizes=sdxl_sizes,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ running

    def __call__(self, prompt: str | Sequence[str], **kwargs) -> GenerationResult:
        req = self.request(prompt, **kwargs)
        if req.seeds is None:
            first = random.SystemRandom().randrange(2**32)
            req.seeds = [first + k for k in range(len(req.prompts))]
        speed_controls(self.bundle, self.speed_config)  # one attached since (attach_controlnet)
        denoiser = self.bundle.denoiser(quantize=_quantize(req.sampler))
        sigmas = make_sigmas(denoiser.schedule, req.sampler)  # (steps + 1,) float64
        if req.mode != "txt2img":
            sigmas = strength_sigmas(sigmas, req.strength)
        encoder = PromptEncoder(self.bundle, req.clip_skip)
        total = len(req.prompts)
        starts = range(0, total, req.batch_size)
        bar = None
        if req.progress:
            from tqdm import tqdm  # noqa: PLC0415

            bar = tqdm(total=len(starts) * (len(sigmas) - 1), unit="step", desc=req.mode)

        def step_done(step: Step) -> None:
            if bar is not None:
                bar.update(1)
            if req.callback is not None:
                req.callback(step)

        latents, pixels = [], []
        try:
            with torch.no_grad():
                for start in starts:
                    rows = list(range(start, min(total, start + req.batch_size)))
                    z = self._sample(req, rows, encoder, denoiser, sigmas, step_done)  # (b, C, h, w)
                    latents.append(z)
                    pixels += [self._decode(z[j : j + 1], req.tile) for j in range(z.shape[0])]
        finally:
            if bar is not None:
                bar.close()
        pixels = torch.cat(pixels)  # (N, H, W, 3)
        return GenerationResult(pixels_to_pil(pixels), self._params(req), torch.cat(latents), pixels)

    def _sample(self, req: Request, rows: list[int], encoder: PromptEncoder, denoiser, sigmas: Tensor,
                callback) -> Tensor:  # fmt: skip
        """Final latents (b, C, h, w) of the images ``rows``, in one network batch."""
        device, dtype, f = self.device, self.dtype, self.factor
        h, w, c = req.height // f, req.width // f, self.bundle.config.vae.latent_channels
        gens = generators([req.seeds[k] for k in rows])
        cond, uncond = encoder.conds([req.prompts[k] for k in rows], [req.negatives[k] for k in rows],
                                     height=req.height, width=req.width, guided=req.guided,
                                     **(req.sdxl_sizes or {}))  # fmt: skip
        per_prompt = [k // req.n for k in rows]
        images = None if req.init_images is None else [req.init_images[p] for p in per_prompt]
        masks = None if req.masks is None else [req.masks[p] for p in per_prompt]
        pure_noise = req.mode == "txt2img" or (req.mode == "inpaint" and req.strength == 1.0)
        needs_z0 = not pure_noise or req.inpaint == "blend"  # diffusers' 4-channel inpainting encodes it anyway

        z0 = self._encode(images, gens, req.tile) if needs_z0 else None  # 1st draw of each generator
        if req.latents is not None:  # 2nd: the starting noise
            noise = req.latents[rows].to(device, dtype)
        else:
            noise = randn_per_sample(gens, (c, h, w), device, dtype)  # (b, C, h, w)
        if pure_noise:
            x = noise * float((1 + sigmas[0] ** 2) ** 0.5)
        else:
            x = noised(z0, noise, float(sigmas[0]))

        mask_lat = None
        if masks is not None:
            mask_lat = torch.cat([latent_mask(m, h, w) for m in masks]).to(device, dtype)  # (b, 1, h, w)
        if self.base_in_channels == 2 * c + 1:  # inpainting U-Net: + mask + masked image latent
            if masks is None:  # nothing is known: generate everywhere, over a blank (0) image
                mask_lat = torch.ones(len(rows), 1, h, w, device=device, dtype=dtype)
                masked = [torch.zeros(1, 3, req.height, req.width)] * len(rows)
            else:
                masked = [im * (m < 0.5) for im, m in zip(images, masks)]  # (1, 3, H, W) each, known part only
            concat = torch.cat([mask_lat, self._encode(masked, gens, req.tile)], dim=1)  # 3rd draw; (b, 1 + C, h, w)
            cond = replace(cond, concat=concat)
            uncond = None if uncond is None else replace(uncond, concat=concat)

        sc = req.sampler
        if self.bundle.conditions is not None:  # the further conditions' values (inference/conditions.py)
            extra = condition_extra(self.bundle, req, per_prompt, (h, w), device)
            cond = replace(cond, extra=extra)
            uncond = None if uncond is None else replace(uncond, extra=extra)
            set_control_windows(denoiser, req, sigmas)
        if req.condition_scales:
            names = list(req.condition_scales)
            conds, scales = guided_branches(cond, uncond, names, [req.condition_scales[k] for k in names], sc.cfg_scale)
            denoise = guide(denoiser, conds, scales, chain=True, rescale=sc.guidance_rescale)
        elif req.guided:
            denoise = cfg(denoiser, cond, uncond, sc.cfg_scale, sc.guidance_rescale)
        else:
            denoise = lambda x, sigma: denoiser(x, sigma, cond)  # noqa: E731
        blend = req.mode == "inpaint" and req.inpaint == "blend"
        if blend:
            denoise = inpaint_denoiser(denoise, z0, mask_lat, noise)
        sample = configured_sampler(sc, _load_teleport_stats(sc))  # get_sampler(sc.name), with teleport if set
        x = sample(denoise, x, sigmas, noise=per_sample_noise(gens, x), callback=callback, **sampler_options(sc))
        return blend_known(x, z0, mask_lat) if blend else x

    def _encode(self, images: list[Tensor], gens: list[torch.Generator], tile: int | None) -> Tensor:
        """(1, 3, H, W) images in [-1, 1] -> (b, C, h, w) posterior samples, image j drawn from gens[j], one by one."""
        vae, f = self.bundle.vae, self.factor
        dtype = next(vae.parameters()).dtype
        kw = {} if tile is None else dict(tile=tile * f, tile_overlap=(tile // 4) * f)
        out = [vae.encode(im.to(self.device, dtype), sample=True, generator=[g], **kw) for im, g in zip(images, gens)]
        return torch.cat(out).to(self.dtype)

    def _decode(self, z: Tensor, tile: int | None) -> Tensor:
        """(1, C, h, w) latent -> (1, H, W, 3) float32 pixels in [0, 1] (NaN-safe decode)."""
        vae = self.bundle.vae
        z = z.to(next(vae.parameters()).dtype)
        image = vae.decode(z) if tile is None else vae.decode(z, tile=tile, tile_overlap=tile // 4)
        return to_pixels(image)

    def _params(self, req: Request) -> list[GenerationParams]:
        sc = req.sampler
        return [
            GenerationParams(
                prompt=p, negative=q, steps=sc.steps, sampler=sc.name, schedule=sc.sigma_spacing,
                cfg_scale=sc.cfg_scale, seed=s, width=req.width, height=req.height, model=self.name,
                model_hash=self.model_hash, strength=None if req.mode == "txt2img" else req.strength,
                guidance_rescale=sc.guidance_rescale, clip_skip=req.clip_skip, eta=sc.eta, mode=req.mode,
            )  # fmt: skip
            for p, q, s in zip(req.prompts, req.negatives, req.seeds)
        ]


# ------------------------------------------------------------------------------------------------ helpers


def _sdxl_sizes(family: str, original_size, crop_coords, target_size) -> dict | None:
    """SDXL's size conditioning (Podell et al. 2023, sec. 2.2; diffusers' ``original_size``,
    ``crops_coords_top_left``, ``target_size``), each (h, w) or (top, left) integers; None: the defaults."""
    given = {"original_size": original_size, "crop": crop_coords, "target_size": target_size}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    names = {"original_size": "original_size", "crop": "crop_coords", "target_size": "target_size"}
    if family != "sdxl":
        raise ValueError(f"{names[next(iter(given))]}: size conditioning is SDXL's; this model's family is {family!r}")
    for k, v in given.items():
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(a, int) and not isinstance(a, bool)
                                                                    and a >= 0 for a in v)):  # fmt: skip
            raise ValueError(f"{names[k]}: two integers >= 0 ((h, w) or (top, left)), got {v!r}")
        given[k] = tuple(v)
    return given


def _teleport_config(sc: SamplerConfig, teleport, stats) -> SamplerConfig:
    """``teleport``: the fraction of the steps replaced by the closed-form Gaussian solution (ldm/samplers/teleport.py);
    ``teleport_stats``: the Gaussian statistics file ``ldm analyze`` writes (gaussian.safetensors)."""
    if isinstance(teleport, bool) or not isinstance(teleport, (int, float)) or not 0 <= teleport <= 1:
        raise ValueError(f"teleport: a fraction of the steps in [0, 1], got {teleport!r}")
    if teleport > 0 and (stats is None or not Path(stats).is_file()):
        raise ValueError(f"teleport_stats: teleport > 0 needs the Gaussian statistics file (ldm analyze writes "
                         f"gaussian.safetensors), got {stats!r}")  # fmt: skip
    return sc if teleport == 0 else replace(sc, teleport=float(teleport), teleport_stats=str(stats))


def _load_teleport_stats(sc: SamplerConfig):
    from ldm.analysis import load_gaussian  # noqa: PLC0415

    return load_gaussian(sc.teleport_stats) if sc.teleport > 0 else None


def _quantize(sc: SamplerConfig) -> bool:
    """diffusers' multistep schedulers (DPM-Solver, UniPC) feed the network rounded timesteps."""
    return (sc.convention or DEFAULT_CONVENTION.get(sc.name, "euler")) == "multistep"
