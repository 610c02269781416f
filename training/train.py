"""The trainer: one flat loop from a TrainConfig to a trained model bundle, on Accelerate.

    ldm train configs/train/tiny.yaml max_steps=200
    accelerate launch --config_file configs/accelerate/ddp.yaml -m training.train CONFIG [KEY=VALUE ...]
    result = train(load_train_config("configs/train/tiny.yaml"))          # from Python

Read it top to bottom in ``train``: build the bundle and decide what is trained (U-Net, + text towers, or LoRA
adapters only; or, with ``task: vae``, the autoencoder and its discriminator: training/vae_task.py); frozen networks go to the device in the compute dtype, trained ones stay fp32 and go through
``accelerator.prepare``; data; optimizer; EMA; resume; then the loop. One optimizer step:

    for each of grad_accum micro-batches:        (gradients synchronised across processes on the last one only)
        z0 = VAE posterior sample of the images  (or of cached moments)
        cond = text towers(captions, "" with probability cond_dropout.text) [+ SDXL size vector]
        loss = DiffusionLoss(unet)(z0, cond) / grad_accum;  backward
    non-finite loss on any process -> skip: no optimizer step, no EMA update, gradients dropped; counted, and
        max_consecutive_skips in a row stop the run
    clip the gradient norm; optimizer step (the fp16 scaler may skip it: counted too); EMA update
    log (metrics.jsonl + TensorBoard), validation grid (training/finish.py), checkpoint (training/resume.py,
    training/checkpointing.py)

The learning rate is a pure function of the step (nanoGPT's get_lr), so it needs no saved scheduler state.
Every random draw of a sample is keyed by (seed, epoch, index) (training/conditions.py): resuming is exact, and
N processes with batch b take the same steps as 1 process with batch b and grad_accum N. The data workers make
those draws (training/draws.py) with CPU generators: the same numbers on any device, and no per-sample work in the
step (per-sample CUDA generators in the step cost a small model most of its step time).

Distribution (training/distributed.py): DDP (``configs/accelerate/ddp.yaml``) and FSDP (``fsdp.yaml``: the U-Net,
its AdamW states and EMA sharded; gathered for checkpoints, validation and the final bundle) are tested with 2 CPU
processes; DeepSpeed is refused with an explicit error. A failing process stops the others (``dist_timeout_s``).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import autoencoder  # noqa: F401  (registers the VAE component)
import text_encoder  # noqa: F401  (registers the text-tower component)
from autoencoder.loss import VAELoss
from autoencoder.vae import sample_posterior
from ldm.bundle import Bundle, load_bundle
from ldm.checkpoint import CheckpointError
from ldm.config import save_config, to_yaml
from ldm.ema import EMA
from ldm.lora import inject_lora
from ldm.loss import DiffusionLoss
from ldm.model_config import PUBLISHED_MODEL_CHANNELS
from ldm.speed import apply_speed

from . import checkpointing as ckpt
from .condition_setup import add_to_loaded, check_condition_columns, condition_extra, scratch_config, with_condition_columns
from .conditions import TextTowers, TokenCache, batch_sizes, drop_flags, keyed_seed, make_cond
from .draws import KeyedDraws, noise_draw
from .config import OptimConfig, TrainConfig, load_train_config
from .metrics import MetricsLog
from .train_data import ROW_INDEX, BatchStream, cache_latents, open_train_dataset, train_rows
from . import distributed as dist
from .finish import fit_vae_scale, save_final, validate
from .resume import resume, save_state
from .vae_task import VAETrainStep, fixed_images

logger = logging.getLogger("ldm.train")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN / inf loss or gradient."""


class Trainable(nn.Module):
    """The trained parameters under their model names (``unet.input_blocks.0.0.weight``, ``text.0.*``, or the
    LoRA adapters), the very Parameter objects of the networks: one module for the optimizer, EMA and checkpoints."""

    def __init__(self, named: dict[str, nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterDict({name.replace(".", "/"): p for name, p in named.items()})

    def named_tensors(self) -> dict[str, nn.Parameter]:
        return {name.replace("/", "."): p for name, p in self.params.items()}


# ---------------------------------------------------------------------------------------------- building


def build_bundle(cfg: TrainConfig) -> Bundle:
    """From scratch (seeded random init, fp32 on the CPU) or loaded from a checkpoint (its stored dtypes); with
    ``model.vae`` the VAE (weights and config) of another model replaces the bundle's. A model not of the published
    width records the training size (``sample_size``), the size inference samples at by default."""
    if cfg.model.from_scratch:
        torch.manual_seed(cfg.seed)
        bundle = Bundle(scratch_config(cfg.model.model_config(), cfg.conditions)).eval()
        if bundle.conditions is not None:
            bundle.conditions.init_from_unet(bundle.unet)  # a ControlNet starts as a copy of the U-Net's encoder
    else:
        bundle = load_bundle(cfg.model.source, config_overrides=cfg.model.overrides, progress=logger.info)
        add_to_loaded(bundle, cfg.conditions, keyed_seed(cfg.seed, "conditions"))
    if cfg.model.vae is not None:
        donor = load_bundle(cfg.model.vae, progress=logger.info)
        if donor.config.vae.latent_channels != bundle.config.unet.out_channels:
            raise ValueError(f"model.vae: {cfg.model.vae} has {donor.config.vae.latent_channels} latent channels, "
                             f"the U-Net predicts {bundle.config.unet.out_channels}")  # fmt: skip
        bundle.vae = donor.vae.to(torch.float32)
        bundle.config = dataclasses.replace(bundle.config, vae=donor.config.vae)
    if bundle.config.unet.model_channels != PUBLISHED_MODEL_CHANNELS:  # published widths keep their published size
        bundle.config.sample_size = list(cfg.data.size)  # inference's default size (Pipeline.default_size)
    return bundle


def make_optimizer(ocfg: OptimConfig, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    kw = dict(lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps, weight_decay=ocfg.weight_decay)
    if ocfg.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    fused = ocfg.fused if ocfg.fused is not None else device.type == "cuda"
    try:
        return torch.optim.AdamW(params, fused=fused or None, **kw)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"optim.fused: torch's fused AdamW is not available here ({e}); set optim.fused=null") from None


def _unet_side(cfg: TrainConfig, bundle: Bundle, device, weight_dtype) -> dict[str, nn.Parameter]:
    """Set up what task=unet trains (U-Net [+ text towers], or LoRA adapters on a frozen U-Net); their parameters."""
    if cfg.lora is not None:  # frozen base in the compute dtype, fp32 adapters, only they are trained
        bundle.unet.to(dtype=weight_dtype)
        inject_lora(bundle.unet, cfg.lora, generator=torch.Generator().manual_seed(keyed_seed(cfg.seed, "lora")),
                    dtype=torch.float32)  # fmt: skip
        bundle.unet.to(device)
    else:
        bundle.unet.to(device, torch.float32).requires_grad_(cfg.train_unet)
    if bundle.conditions is not None:  # fp32; trained where its spec says train=true
        bundle.conditions.to(device, torch.float32).requires_grad_(False).train()
        for c in bundle.conditions:
            c.requires_grad_(c.spec.train)
    bundle.text.to(device, torch.float32 if cfg.train_text_encoder else weight_dtype)
    bundle.text.requires_grad_(cfg.train_text_encoder)
    bundle.unet.train()
    bundle.text.train(cfg.train_text_encoder)
    named = {f"unet.{n}": p for n, p in bundle.unet.named_parameters() if p.requires_grad}
    if bundle.conditions is not None:
        named |= {f"conditions.{n}": p for n, p in bundle.conditions.named_parameters() if p.requires_grad}
    return named | {f"text.{n}": p for n, p in bundle.text.named_parameters() if p.requires_grad}


def _check_sizes(cfg: TrainConfig, bundle: Bundle) -> None:
    f = bundle.config.vae.downsample_factor
    sizes = [("data.resolution", cfg.data.size)] if not cfg.data.buckets else []
    if cfg.validation.prompts:
        sizes.append(("validation.resolution", cfg.validation.size(cfg.data.size)))
    for key, (h, w) in sizes:
        if h % f or w % f:
            raise ValueError(f"{key}: {h}x{w} is not a multiple of the autoencoder's downsampling factor {f}")


def _check_distribution(accelerator, cfg: TrainConfig | None = None) -> None:
    """DDP and FSDP run; DeepSpeed, and under FSDP what it does not shard, are refused (training/distributed.py)."""
    dist.check_distribution(accelerator, cfg)


# ------------------------------------------------------------------------------------------------- train


def train(cfg: TrainConfig) -> dict:
    """Run ``cfg`` to ``cfg.max_steps``; returns {"state": TrainState, "output_dir": Path, "losses": {step: loss}}."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    # trained text towers may leave blocks unused (SD 2.x reads the penultimate block), and the discriminator waits
    # for vae_loss.disc_start: let DDP allow that
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.train_text_encoder or cfg.task == "vae")
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              kwargs_handlers=[ddp, dist.process_group_kwargs(cfg.dist_timeout_s)])  # fmt: skip
    try:
        return _train(cfg, accelerator)
    except BaseException as e:  # several processes: report and leave now, so torchrun stops the others (no hang)
        if accelerator.num_processes > 1 and not isinstance(e, (SystemExit, KeyboardInterrupt)):
            code = 2 if isinstance(e, (ValueError, CheckpointError)) else 1
            dist.fail_fast(e, accelerator.process_index, code, cfg.dist_timeout_s)
        raise
    finally:
        if accelerator.num_processes == 1:  # Accelerate's state is a process-wide singleton: let another train()
            AcceleratorState._reset_state()  # in this process (tests, notebooks) choose its own mixed precision


def _train(cfg: TrainConfig, accelerator) -> dict:
    from tqdm.auto import tqdm

    _check_distribution(accelerator, cfg)
    device, rank, world, main = accelerator.device, accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if device.type == "cpu" and cfg.mixed_precision == "fp16":
        raise ValueError("mixed_precision: fp16 needs a GPU; use bf16 or no on the CPU")
    cfg.speed.resolve(device, training=True)  # the speed switches' errors for this device, before any loading
    out, weight_dtype = Path(cfg.output_dir), DTYPES[cfg.mixed_precision]
    ckroot = out / "checkpoints"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    if cfg.resume == "latest" and ckpt.find_latest(ckroot) is None:  # before any data or model is loaded
        raise ValueError(f"resume: 'latest' but {ckroot} holds no complete checkpoint (resume=auto starts afresh then)")
    cfg = with_condition_columns(cfg)  # the conditions' columns into the batch
    hf_rows = open_train_dataset(cfg)  # the data first: a wrong path or column fails before any model is loaded
    check_condition_columns(cfg, hf_rows)
    rows = train_rows(cfg, hf_rows)

    # ---- model: what is frozen, what is trained
    bundle = build_bundle(cfg)
    sdxl = bundle.config.family == "sdxl"
    _check_sizes(cfg, bundle)
    bundle.requires_grad_(False)
    vae_step = None
    if cfg.task == "vae":  # the autoencoder and its discriminator are trained (training/vae_task.py)
        bundle.vae.to(device, torch.float32).requires_grad_(True).train()
        torch.manual_seed(keyed_seed(cfg.seed, "discriminator"))
        vae_step = VAETrainStep(bundle.vae, VAELoss(cfg.vae_loss).to(device))
        named = {f"vae.{n}": p for n, p in bundle.vae.named_parameters()}
        named |= {f"disc.{n}": p for n, p in vae_step.criterion.discriminator.named_parameters()}
    else:
        bundle.vae.to(device, weight_dtype)
        named = _unet_side(cfg, bundle, device, weight_dtype)
    towers = TextTowers(bundle.text)
    if vae_step is None:
        applied = apply_speed(bundle.unet, cfg.speed, training=True)  # ldm/speed.py: attention kernel, norms, compile
        if main and device.type == "cuda" and applied.compile == "none" and cfg.max_steps >= 5000:  # a hint, no more
            logger.info("speed: %d steps uncompiled; speed.compile=default measured 1.24-1.42x faster steps for SD 1.5 "
                        "on an H200 after ~4 min of compiling (BENCHMARKS.md)", cfg.max_steps)  # fmt: skip
    sharded = dist.is_sharded(accelerator)
    if sharded:  # FSDP: the U-Net's parameters become shards (DTensors) before the optimizer and EMA see them
        named = dist.shard_bundle_unet(bundle, accelerator, weight_dtype)
    trainable = Trainable(named)
    params = list(trainable.parameters())
    param_names = list(trainable.named_tensors())
    optimizer = make_optimizer(cfg.optim, params, device)
    if vae_step is not None:
        to_prepare = [vae_step]
    else:
        to_prepare = [bundle.network()] + ([towers] if cfg.train_text_encoder else [])  # U-Net (+ conditions)
    if sharded:  # already prepared by shard_unet; accelerate's FSDP2 prepare is not used (training/distributed.py)
        wrapped = [bundle.unet]
    else:
        *wrapped, optimizer = accelerator.prepare(*to_prepare, optimizer)
    unet_w, text_w = wrapped[0], (wrapped[-1] if cfg.train_text_encoder else towers)
    loss_fn = DiffusionLoss(unet_w, bundle.config.diffusion, cfg.loss) if vae_step is None else None
    ema = EMA(trainable, cfg.ema.decay, cfg.ema.warmup, cfg.ema.update_after_step) if cfg.ema else None
    if main:
        n_train = sum(p.numel() for p in params)
        parts = (["U-Net"] if cfg.train_unet else []) + (["text"] if cfg.train_text_encoder else [])
        parts += [f"condition {c.spec.name}" for c in (bundle.conditions or []) if c.spec.train]
        what = "VAE + discriminator" if vae_step is not None else "LoRA" if cfg.lora else " + ".join(parts)
        logger.info("training %s parameters (%s) on %d process(es), %s", f"{n_train:,}", what, world, device)
    # task=vae: the images with the evaluation transform, for the reconstruction grid and the latent scale fit
    eval_rows = train_rows(cfg, rows.rows.hf, eval_transform=True) if vae_step is not None else None
    recon_images = None
    if eval_rows is not None and cfg.validation.recon_images and main:
        recon_images = fixed_images(eval_rows, cfg.validation.recon_images)

    # ---- data
    if cfg.cache.latents:
        rows = cache_latents(rows, bundle.vae, cfg.batch_size, device, weight_dtype, cfg.data.seed,
                             progress=(lambda i, n: logger.info("caching latents %d/%d", i, n)) if main else None)  # fmt: skip
    vae_cfg = bundle.config.vae
    rows = KeyedDraws(rows, cfg.seed, latent_channels=vae_cfg.latent_channels, factor=vae_cfg.downsample_factor,
                      cached=cfg.cache.latents, num_train_timesteps=None if loss_fn is None else loss_fn.num_train_timesteps)  # fmt: skip
    text_cache: dict[str, tuple[Tensor, Tensor | None]] = {}
    token_ids = TokenCache(towers)

    # ---- resume
    state = ckpt.TrainState(world_size=world)
    source = None if cfg.resume == "never" else ckpt.find_latest(ckroot) if cfg.resume in ("auto", "latest") \
        else Path(cfg.resume)  # fmt: skip
    if source is not None:
        state = resume(source, cfg, trainable, param_names, optimizer, ema, rank, world)
        if main:
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", source, state.step, state.epoch,
                        state.batch_in_epoch)  # fmt: skip
    else:
        torch.manual_seed(keyed_seed(cfg.seed, "process", rank))  # dropout etc.: per process, reproducible
        np.random.seed(keyed_seed(cfg.seed, "numpy", rank) % 2**32)
        random.seed(keyed_seed(cfg.seed, "python", rank))
    stream = BatchStream(rows, cfg.batch_size, rank, world, epoch=state.epoch, consumed=state.batch_in_epoch,
                         num_workers=cfg.data.num_workers)  # fmt: skip
    batches = iter(stream)
    metrics = MetricsLog(out / "logs", state.step) if main else None

    def micro_step(epoch: int, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one micro-batch and its parts to log (see the module docstring)."""
        idx = batch[ROW_INDEX].tolist()
        eps = batch["_eps"].to(device)  # (B, z, h, w) the posterior sample's noise, drawn by the data workers
        if vae_step is not None:  # task=vae: the image itself
            return wrapped[0](batch["pixel_values"].to(device, torch.float32), state.step, eps=eps)
        drop_text = drop_flags(cfg.cond_dropout.text, cfg.seed, epoch, idx, "text")
        texts = ["" if d else t for t, d in zip(batch["text"], drop_text.tolist())]
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device, weight_dtype)
            if cfg.cache.latents:  # cached (mean, logvar) stacked on channels
                mean, logvar = pixels.chunk(2, dim=1)
            else:
                mean, logvar = bundle.vae.moments(pixels)  # (B, z, h, w) each
            z0 = bundle.vae.scale_latent(sample_posterior(mean, logvar, eps=eps))
        if cfg.train_text_encoder:
            context, pooled = text_w(token_ids(texts, device))
        else:
            context, pooled = encode_frozen(texts)
        drop_sizes = drop_flags(cfg.cond_dropout.sizes, cfg.seed, epoch, idx, "sizes") if sdxl else None
        cond = make_cond(context, pooled, batch_sizes(batch) if sdxl else None, sdxl=sdxl, drop_sizes=drop_sizes)
        if bundle.conditions is not None:  # values of the further conditions, each dropped independently
            cond = dataclasses.replace(cond, extra=condition_extra(
                bundle.conditions, batch, seed=cfg.seed, epoch=epoch, indices=idx, latent_hw=z0.shape[-2:],
                device=device, vae=bundle.vae))  # fmt: skip
        return loss_fn.compute(z0.float(), cond, noise_draw(batch, device)).loss, {}

    @torch.no_grad()
    def encode_frozen(texts: list[str]) -> tuple[Tensor, Tensor | None]:
        if not cfg.cache.text:
            return towers(token_ids(texts, device))
        new = sorted({t for t in texts if t not in text_cache})
        if new:
            context, pooled = towers(token_ids(new, device))
            for i, t in enumerate(new):
                text_cache[t] = (context[i].cpu(), None if pooled is None else pooled[i].cpu())
        context = torch.stack([text_cache[t][0] for t in texts]).to(device)
        pooled = None if text_cache[texts[0]][1] is None else torch.stack([text_cache[t][1] for t in texts]).to(device)
        return context, pooled

    # ---- the loop
    progress = tqdm(total=cfg.max_steps, initial=state.step, disable=not main, desc="train", dynamic_ncols=True)
    losses: dict[int, float] = {}
    window_images, window_start = 0.0, time.perf_counter()
    last_good: tuple[int, dict] | None = None
    while state.step < cfg.max_steps:
        dist.test_fail_hook(state.step + 1, rank)
        lr = cfg.optim.lr * cfg.lr_schedule.factor(state.step, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_losses, n_images, parts = [], 0, {}
        for micro in range(cfg.grad_accum):
            epoch, consumed, batch = next(batches)
            state.epoch, state.batch_in_epoch = epoch, consumed
            weight = 1.0
            if batch is None:  # no readable image in this batch: take part in the collectives with a zero loss
                if world == 1:
                    continue
                if last_good is None:
                    raise RuntimeError("the first batch of this process holds no readable image")
                (epoch, batch), weight = last_good, 0.0
            else:
                last_good = (epoch, batch)
                n_images += len(batch["text"])
            with ExitStack() as no_sync:
                if micro < cfg.grad_accum - 1:
                    for m in wrapped:
                        no_sync.enter_context(dist.no_sync(accelerator, m))
                loss, logs = micro_step(epoch, batch)
                accelerator.backward(loss * (weight / cfg.grad_accum))
            if weight:
                step_losses.append(loss.detach().float())
                parts = logs
        local = torch.stack(step_losses).mean() if step_losses else torch.zeros((), device=device)
        totals = accelerator.reduce(torch.stack([(~torch.isfinite(local)).float(), local.nan_to_num(0.0),
                                                 torch.tensor(float(n_images), device=device)]), "sum")  # fmt: skip
        loss_nonfinite, mean_loss, step_images = bool(totals[0] > 0), float(totals[1]) / world, float(totals[2])
        nonfinite, grad_norm = loss_nonfinite, float("nan")
        if not nonfinite:
            grad_norm = float(dist.clip_grad_norm(accelerator, params, cfg.grad_clip or float("inf"), sharded))
            nonfinite = not math.isfinite(grad_norm) and cfg.mixed_precision != "fp16"  # fp16: the scaler decides
        if nonfinite:
            optimizer.zero_grad(set_to_none=True)
            state.skipped_nonfinite += 1
            state.consecutive_nonfinite += 1
            if main:
                logger.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", state.step + 1,
                               state.consecutive_nonfinite)  # fmt: skip
            if state.consecutive_nonfinite >= cfg.max_consecutive_skips:
                raise NonFiniteLossError(
                    f"{state.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or gradient "
                    f"(max_consecutive_skips={cfg.max_consecutive_skips}); stopped at step {state.step + 1}. The last "
                    f"checkpoint is {ckpt.find_latest(ckroot)}; try a lower optim.lr or mixed_precision=bf16/no"
                )
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.consecutive_nonfinite = 0
            if accelerator.optimizer_step_was_skipped:
                state.skipped_scaler += 1
            elif ema is not None:
                ema.update(trainable)
        state.step += 1
        state.images_seen += int(step_images)
        window_images += step_images
        losses[state.step] = float("nan") if loss_nonfinite else mean_loss
        progress.update(1)

        if main and (state.step % cfg.log_every == 0 or state.step == cfg.max_steps):
            elapsed = time.perf_counter() - window_start
            values = {"loss": losses[state.step], "lr": lr, "grad_norm": grad_norm, "epoch": state.epoch,
                      "images_per_s": window_images / elapsed if elapsed > 0 else 0.0,
                      "skipped_nonfinite": state.skipped_nonfinite, "skipped_scaler": state.skipped_scaler}  # fmt: skip
            values |= {f"vae/{k}": float(v) for k, v in parts.items()}  # task=vae: the terms, last micro-batch
            metrics.log(state.step, values)
            progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
            window_images, window_start = 0.0, time.perf_counter()
        done = state.step == cfg.max_steps
        due = (cfg.validation.every and state.step % cfg.validation.every == 0) or done
        paused = time.perf_counter()
        if due and (cfg.validation.recon_images if vae_step is not None else cfg.validation.prompts):
            validate(cfg, bundle, trainable, ema, state.step, out, metrics, main, device, recon_images)
            accelerator.wait_for_everyone()
        if done or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
            save_state(cfg, state, trainable, param_names, optimizer, ema, ckroot, accelerator)
        window_start += time.perf_counter() - paused  # throughput counts training only
    progress.close()

    # ---- the deliverables (FSDP: the whole weights gathered by every process, the copy built on rank 0)
    bundle, trainable, ema = dist.full_view(bundle, trainable, ema, main, device)
    if main:
        if vae_step is not None and cfg.vae_fit_scale:
            fit_vae_scale(cfg, bundle, trainable, ema, eval_rows, device)
        save_final(cfg, bundle, trainable, ema, out)
        metrics.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"state": state, "output_dir": out, "losses": losses}


# ---------------------------------------------------------------------------------------------- entry points


def run_args(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"resume={args.resume}"] if getattr(args, "resume", None) else [])
    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        raise ValueError(f"CONFIG: {args.config!r} is an override, not a YAML file; overrides follow a CONFIG (e.g. "
                         f"`ldm train configs/train/shapes.yaml {args.config}`). With no CONFIG, `ldm train` runs the "
                         "embedded default's recipe as it is (training/recipe.py), which takes no overrides")  # fmt: skip
    if args.config is None and args.print_config:
        raise ValueError("--print-config: give a CONFIG (no CONFIG runs the embedded default's recipe, "
                         "configs/train/shapes-vae.yaml then shapes.yaml at CPU scale)")  # fmt: skip
    if args.config is None:  # the embedded default's recipe (training/recipe.py)
        from .recipe import run_default

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        run_default(extra=overrides)
        return 0
    cfg = load_train_config(args.config, overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = train(cfg)
    s = result["state"]
    logger.info("done: %d steps, %d images, %d skipped (non-finite), %d skipped (fp16 scaler)", s.step,
                s.images_seen, s.skipped_nonfinite, s.skipped_scaler)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m training.train CONFIG [KEY=VALUE ...]`` (what ``accelerate launch -m training.train`` runs)."""
    from .cli import DESCRIPTION, add_arguments

    parser = argparse.ArgumentParser(prog="training.train", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_args(args)
    except (ValueError, CheckpointError) as e:  # bad input: one line, exit code 2
        print(f"ldm train: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions ...: one line naming the file, exit code 1
        print(f"ldm train: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
