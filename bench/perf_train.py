"""bench/perf.py's training cases: one SD 1.5 training step, ours (per SpeedConfig) against diffusers, same weights.

The step (``make_train_step``): fp32 weights under bf16 autocast, eps-prediction MSE at a uniformly drawn timestep
of the SD 1.5 schedule, fused AdamW (with CUDA); latents and text embeddings precomputed (random), as the trainer's
caches leave them. bench/profile_train.py profiles the same step.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.perf_measure import Plan, Table, free, in_fresh_thread, median_ms, randomize_, rel_err, sync
from ldm.conditioning import Cond
from ldm.schedule import ScheduleConfig, make_betas
from ldm.speed import apply_speed
from ldm.unet import UNet
from ldm.unet_keys import diffusers_to_ours


def alphas_cumprod(device) -> torch.Tensor:
    """(1000,) fp32 alpha-bar of SD 1.5's scaled-linear schedule, on ``device`` (made once per step function: a
    host-to-device copy inside the step would synchronise the host with the GPU every step)."""
    return torch.cumprod(1 - make_betas(ScheduleConfig()), 0).float().to(device)


def noisy_batch(latents: torch.Tensor, acp: torch.Tensor, generator: torch.Generator | None = None):
    """(noisy latents, t, noise) for eps-prediction at uniform timesteps; ``acp`` from ``alphas_cumprod``."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    t = torch.randint(0, len(acp), (latents.shape[0],), generator=generator, device=latents.device)
    a = acp[t].view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise, t, noise


def check_step(model, call, cfg, latents: torch.Tensor, context: torch.Tensor, tol: float, chunk: int = 8) -> dict:
    """One forward + backward of the optimised step (``call`` under bf16 autocast, the batch it was timed at, so
    compiled graphs are reused) against our eager fp32 U-Net with the same weights (in chunks of ``chunk`` images),
    and the same for plain bf16 autocast (that fp32 U-Net, no speed switch, under autocast): ``err`` = max |pred -
    fp32 pred| / max |fp32 pred|; ``grad_err`` = ||grads - fp32 grads|| / ||fp32 grads|| over all parameters,
    ``base_grad_err`` the same for plain bf16 autocast (TF32 is off in bench/perf.py). ``ok``: err < tol and
    grad_err at most 1.5x base_grad_err (the end-to-end rows' rule; bf16 alone gives a few percent at 512 px)."""
    device, batch = latents.device, latents.shape[0]
    noisy, t, noise = noisy_batch(latents, alphas_cumprod(device), torch.Generator(device).manual_seed(11))
    amp = dict(device_type=device.type, dtype=torch.bfloat16)

    def grads_of(m, fn, chunks: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.zero_grad(set_to_none=True)
        preds = []
        for idx in torch.arange(batch, device=device).chunk(chunks):
            pred = fn(noisy[idx], t[idx], context[idx])
            (F.mse_loss(pred.float(), noise[idx], reduction="sum") / noise.numel()).backward()  # sums to the mean
            preds.append(pred.detach().float())
        g = [p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
             for p in m.parameters()]  # fmt: skip
        m.zero_grad(set_to_none=True)
        return torch.cat(preds), g

    def autocast(fn):
        def run(*a):
            with torch.autocast(**amp):
                return fn(*a)
        return run

    pred, grads = grads_of(model, autocast(lambda x, tt, c: call(x, tt)), 1)  # the timed batch: context is all
    fresh = UNet(cfg).to(device)
    fresh.load_state_dict(model.state_dict())
    fresh.train()
    plain = lambda x, tt, c: fresh(x, tt, Cond(context=c))  # noqa: E731
    pred32, grads32 = grads_of(fresh, plain, -(-batch // chunk))
    _, grads_bf16 = grads_of(fresh, autocast(plain), 1)
    del fresh

    def rel(gs):
        num = sum((g - r).square().sum().item() for g, r in zip(gs, grads32))
        return (num / sum(r.square().sum().item() for r in grads32)) ** 0.5

    err, grad_err, base = rel_err(pred, pred32), rel(grads), rel(grads_bf16)
    del grads, grads32, grads_bf16
    free()
    return {"err": err, "grad_err": grad_err, "base_grad_err": base, "ok": err < tol and grad_err <= 1.5 * base}


def make_train_step(call, params: list, latents: torch.Tensor):
    """``step()``: one optimizer step of ``call(noisy, t) -> eps`` on ``latents`` (B, 4, h, w); returns the loss."""
    device = latents.device
    acp = alphas_cumprod(device)
    opt = torch.optim.AdamW(params, lr=1e-6, fused=device.type == "cuda" or None)

    def step():
        noisy, t, noise = noisy_batch(latents, acp)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = call(noisy, t)
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def train_case(plan: Plan, table: Table, case: str, res: int, batch: int, ours_specs: dict,
               ref_benchmark: bool = False) -> None:
    """fp32 weights, bf16 autocast, fused AdamW, MSE on eps; latents and text embeddings precomputed (random)."""
    from diffusers import UNet2DConditionModel

    from ldm.components import unet_config_to_diffusers

    cfg = plan.unet_cfg("sd15")
    side, batch = (16, 2) if plan.tiny else (res // 8, batch)
    dcfg = {k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith("_")}
    with torch.device(plan.device):
        ref = randomize_(UNet2DConditionModel(**dcfg), seed=1)
    state = {k: v.to("cpu") for k, v in ref.state_dict().items()}
    del ref
    free()
    g = torch.Generator(plan.device).manual_seed(5)
    latents = torch.randn(batch, 4, side, side, generator=g, device=plan.device)  # precomputed VAE latents
    context = torch.randn(batch, 77, cfg.context_dim, generator=g, device=plan.device)  # precomputed text
    fused = plan.device.startswith("cuda")
    amp = dict(device_type="cuda" if fused else "cpu", dtype=torch.bfloat16)

    def measure(label, impl, build, call, flops=None, spec=None, benchmark=False):  # benchmark: cudnn.benchmark
        free()
        torch.backends.cudnn.benchmark = benchmark  # process-wide: only the diffusers row that asks for it
        before = 0
        if plan.device.startswith("cuda"):  # the step's own peak: what earlier cases left allocated is subtracted
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        model = build()
        model.train()
        step = make_train_step(lambda x, t: call(model, x, t), list(model.parameters()), latents)
        if flops is None:  # forward + backward of one step, counted once
            with FlopCounterMode(display=False) as fc:
                with torch.autocast(**amp):
                    out = call(model, latents, torch.full((batch,), 500, device=plan.device))
                out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
            flops = fc.get_total_flops()
        torch.manual_seed(0)
        t0 = time.perf_counter()
        step()
        sync(plan.device)
        first_s = time.perf_counter() - t0
        cuda = plan.device.startswith("cuda")
        first_peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else float("nan")
        if cuda:  # the steps after the first (compilation, autotuning and graph capture happen in the first)
            torch.cuda.reset_peak_memory_stats()
        ms = median_ms(step, plan, warmup=2, reps=plan.train_reps, events=True)
        steady = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else float("nan")
        row = dict(case=case, impl=impl, variant=label, ms=ms, img_s=batch / ms * 1e3, flops=flops,
                   tflops=flops / ms / 1e9, mfu=flops / ms / 1e9 / plan.peak, peak_gib=max(first_peak, steady),
                   steady_peak_gib=steady)  # fmt: skip
        if first_s > 5:
            row["first_call_s"] = first_s
        if spec is not None:  # the optimised step against our eager fp32 one: output and gradients
            row.update(check_step(model, lambda x, t: call(model, x, t), cfg, latents, context, plan.tol))
        del model, step
        return row, flops

    def build_ref():
        with torch.device(plan.device):
            m = UNet2DConditionModel(**dcfg)
        m.load_state_dict(state)
        return m

    ref_call = lambda m, x, t: m(x, t, encoder_hidden_states=context).sample  # noqa: E731
    d_row, flops = measure("eager, fused AdamW", "diffusers", build_ref, ref_call)
    table.add(**d_row)
    if ref_benchmark:  # cudnn.benchmark, the process-wide switch anyone can set; in a thread of its own, since
        # PyTorch's cuDNN plan cache is per thread and ignores the flag (before the eleventh session this row reused
        # the plans the row above had cached, so it timed the same kernels)
        b_row, _ = in_fresh_thread(lambda: measure("eager, fused AdamW + cuDNN benchmark", "diffusers", build_ref,
                                                   ref_call, flops, benchmark=True))  # fmt: skip
        b_row["ratio_img_s"] = b_row["img_s"] / d_row["img_s"]
        table.add(**b_row)
    for label, spec in ours_specs.items():
        if not plan.wants(label):
            continue

        def build_ours(spec=spec):
            with torch.device(plan.device):
                m = UNet(cfg)
            m.load_state_dict(diffusers_to_ours(state, cfg))
            apply_speed(m, plan.speed(spec, training=True), training=True)
            return m

        row, _ = measure(plan.label(label, spec, training=True), "ours", build_ours, lambda m, x, t: m(x, t, Cond(context=context)), flops, spec)
        row["ratio_img_s"] = row["img_s"] / d_row["img_s"]
        row["peak_ratio"] = row["peak_gib"] / d_row["peak_gib"] if d_row["peak_gib"] == d_row["peak_gib"] else None
        table.add(**row)
    free()


_T = dict(attention_kernel="fastest", channels_last=False, compile="none", low_precision_norms=False,
          triton_geglu=False, channels_last_grads=False)
TRAIN_EAGER = {
    "eager, SDPA auto": dict(_T, attention_kernel="auto"),
    "SDPA fastest": dict(_T),
    "SDPA fastest + low-precision norms": dict(_T, low_precision_norms=True),
    "SDPA fastest + low-precision norms + Triton GEGLU (default)": dict(_T, low_precision_norms=True,
                                                                         triton_geglu=True),
    "+ low-precision norms + channels-last (eager)": dict(_T, low_precision_norms=True, channels_last=True),
}
TRAIN_COMPILE = {
    "compile reduce-overhead (CUDA graphs) + low-precision norms + channels-last + Triton GEGLU + NHWC conv grads": dict(
        _T, compile="reduce-overhead", low_precision_norms=True, channels_last=True, triton_geglu=True,
        channels_last_grads=True),
    "compile reduce-overhead (CUDA graphs) + low-precision norms + channels-last + Triton GEGLU + NHWC conv grads "
    "+ per-group NHWC GroupNorm": dict(
        _T, compile="reduce-overhead", low_precision_norms=True, channels_last=True, triton_geglu=True,
        channels_last_grads=True, nhwc_group_norm=True),
    "compile default + low-precision norms + channels-last": dict(_T, compile="default", low_precision_norms=True,
                                                                  channels_last=True),
    "compile default + low-precision norms (NCHW weights)": dict(_T, compile="default", low_precision_norms=True),
    "compile reduce-overhead (CUDA graphs) + low-precision norms + channels-last + Triton GEGLU": dict(
        _T, compile="reduce-overhead", low_precision_norms=True, channels_last=True, triton_geglu=True),
    "compile reduce-overhead (CUDA graphs) + low-precision norms + channels-last": dict(
        _T, compile="reduce-overhead", low_precision_norms=True, channels_last=True),
}
