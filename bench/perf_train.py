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

from bench.perf_measure import Plan, Table, free, median_ms, randomize_, rel_err, sync
from ldm.conditioning import Cond
from ldm.schedule import ScheduleConfig, make_betas
from ldm.speed import apply_speed
from ldm.unet import UNet
from ldm.unet_keys import diffusers_to_ours


def make_train_step(call, params: list, latents: torch.Tensor):
    """``step()``: one optimizer step of ``call(noisy, t) -> eps`` on ``latents`` (B, 4, h, w); returns the loss."""
    device, batch = latents.device, latents.shape[0]
    betas = make_betas(ScheduleConfig()).to(device)  # SD 1.5's scaled-linear schedule
    acp = torch.cumprod(1 - betas, 0).float()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-6, fused=cuda or None)

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,), device=device)
        a = acp[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
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
        ms = median_ms(step, plan, warmup=2, reps=plan.train_reps, events=True)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if plan.device.startswith("cuda") else float("nan")
        row = dict(case=case, impl=impl, variant=label, ms=ms, img_s=batch / ms * 1e3, flops=flops,
                   tflops=flops / ms / 1e9, mfu=flops / ms / 1e9 / plan.peak, peak_gib=peak)  # fmt: skip
        if first_s > 5:
            row["first_call_s"] = first_s
        if spec is not None:  # the optimised forward against our eager fp32 forward, same weights and inputs
            n = min(batch, 4)
            with torch.no_grad():
                fresh = UNet(cfg).to(plan.device)
                x, tt, c = latents[:n], torch.linspace(17.0, 981.0, n, device=plan.device), context[:n]
                fresh.load_state_dict(model.state_dict())  # the trained weights: compare like with like
                r32 = fresh(x, tt, Cond(context=c))
                with torch.autocast(**amp):
                    o = model(x, tt, Cond(context=c))
                del fresh
            row["err"] = rel_err(o, r32)
            row["ok"] = row["err"] < plan.tol
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
    if ref_benchmark:  # cudnn.benchmark, the process-wide switch anyone can set: measured to change nothing here
        b_row, _ = measure("eager, fused AdamW + cuDNN benchmark", "diffusers", build_ref, ref_call, flops,
                           benchmark=True)  # fmt: skip
        b_row["ratio_img_s"] = b_row["img_s"] / d_row["img_s"]
        table.add(**b_row)
    for label, spec in ours_specs.items():
        if plan.variants and plan.variants not in label:
            continue

        def build_ours(spec=spec):
            with torch.device(plan.device):
                m = UNet(cfg)
            m.load_state_dict(diffusers_to_ours(state, cfg))
            apply_speed(m, plan.speed(spec), training=True)
            return m

        row, _ = measure(label, "ours", build_ours, lambda m, x, t: m(x, t, Cond(context=context)), flops, spec)
        row["ratio_img_s"] = row["img_s"] / d_row["img_s"]
        row["peak_ratio"] = row["peak_gib"] / d_row["peak_gib"] if d_row["peak_gib"] == d_row["peak_gib"] else None
        table.add(**row)
    free()


_T = dict(attention_kernel="fastest", channels_last=False, compile="none", low_precision_norms=False)
TRAIN_EAGER = {
    "eager, SDPA auto": dict(_T, attention_kernel="auto"),
    "SDPA fastest": dict(_T),
    "SDPA fastest + low-precision norms (default)": dict(_T, low_precision_norms=True),
    "+ low-precision norms + channels-last (eager)": dict(_T, low_precision_norms=True, channels_last=True),
}
TRAIN_COMPILE = {
    "compile default + low-precision norms + channels-last": dict(_T, compile="default", low_precision_norms=True,
                                                                  channels_last=True),
    "compile default + low-precision norms (NCHW weights)": dict(_T, compile="default", low_precision_norms=True),
    "compile reduce-overhead (CUDA graphs) + low-precision norms + channels-last": dict(
        _T, compile="reduce-overhead", low_precision_norms=True, channels_last=True),
}
