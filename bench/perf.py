"""Performance, ours vs diffusers, every figure of the performance issue in one process, same random weights.

    python bench/perf.py --out $OUT/perf.json                       # every case (about 6 minutes on an H200)
    python bench/perf.py --only unet_b2,e2e --out $OUT/perf.json    # a subset
    python bench/perf.py --tiny --quick                             # CPU smoke run of every code path, tiny models

Cases (``--only``):

    unet_b2          SD1.5 U-Net, batch 2 (one CFG step), 64x64 latent, eager; ours per speed switch
    unet_b2_compile  the same under torch.compile (default mode) for both; ours also with CUDA graphs, channels-last
                     (+ diffusers' eager kernels alone, replayed from one CUDA graph: is its eager row host-bound?)
    unet_b16         SD1.5 U-Net, batch 16, eager (MFU)
    sdxl_b2          SDXL U-Net, batch 2, 128x128
    vae              VAE decode to 512x512, batch 1
    e2e              txt2img 512x512, 25 steps DPM-Solver++ 2M, CFG 7.5, batch 1: text encoder + U-Net + VAE, against
                     StableDiffusionPipeline on the same weights (saved once as a diffusers folder, loaded by both)
    train256 / train512   one training step (bench/perf_train.py): forward, backward, fused AdamW, bf16 autocast,
                     fp32 weights, latents and text embeddings precomputed; batch 64 at 256 px / batch 32 at 512 px;
                     peak memory
    train256_compile / train512_compile   the same steps with our U-Net compiled: default mode with and without
                     channels-last, reduce-overhead with and without the Triton GEGLU backward and the NHWC convolution
                     gradients (~130-220 s to compile each; pick with --variants "A|B")
    unet_b16_compile / sdxl_b2_compile    batch 16 / SDXL compiled (+ channels-last, + CUDA graphs)

Experiments: ``--compile-mode max-autotune-no-cudagraphs`` for our compiled U-Net cases, ``--inductor KEY=VALUE``
for any torch._inductor.config setting of the run (e.g. force_layout_optimization=true).

Method: bf16 networks (training: fp32 weights under bf16 autocast), CUDA-event timing, median of --reps after
--warmup calls (end to end and training: wall clock around a synchronized call); FLOPs counted once on the
diffusers network with torch.utils.flop_counter; MFU against --peak (790 TFLOP/s: the bf16 matmul rate measured on
the H200). Every optimised path of ours (a SpeedConfig, ldm/speed.py) is compared with our eager fp32 output on the
same inputs: err = max |out - ref| / max |ref|, pass if err < --tol (3e-2, bf16 rounding through ~20 layers), and,
end to end (25 chaotic sampler steps), if it is no worse than 1.5x plain eager bf16's own error. Training rows
are also checked on the gradients (bench/perf_train.py ``check_step``): ||grads - fp32 grads|| / ||fp32 grads|| at
most 1.5x plain bf16 autocast's on the same weights and batch. TF32 is off, so fp32 references are fp32.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.conditioning import Cond  # noqa: E402
from ldm.speed import ATTENTION_KERNELS, CUDAGraphForward, SpeedConfig, apply_speed, remove_speed  # noqa: E402
from ldm.unet import UNet, UNetConfig  # noqa: E402
from ldm.unet_keys import diffusers_to_ours  # noqa: E402

from bench.inductor_flags import add_inductor_flag, apply_inductor_flags  # noqa: E402
from bench.perf_measure import (Plan, Table, back_to_back_ms, count_flops, free, graph_replay, median_ms,  # noqa: E402
                                randomize_, rel_err, sync)
from bench.perf_report import markdown, summary  # noqa: E402
from bench.perf_train import TRAIN_COMPILE, TRAIN_EAGER, train_case  # noqa: E402

CASES = ("unet_b2", "unet_b2_compile", "unet_b16", "unet_b16_compile", "sdxl_b2", "sdxl_b2_compile", "vae", "e2e",
         "train256", "train512", "train256_compile", "train512_compile")
OFF = dict(attention_kernel="auto", fused_qkv=False, fused_emb=False, fused_context_kv=False, channels_last=False,
           cuda_graphs=False, low_precision_norms=False)  # the eager baseline


# ------------------------------------------------------------------------------------------------ U-Net


def unet_pair(plan: Plan, name: str):
    """(cfg, diffusers U-Net, our U-Net) in fp32 on the device, identical random weights."""
    from diffusers import UNet2DConditionModel

    from ldm.components import unet_config_to_diffusers

    cfg = plan.unet_cfg(name)
    dcfg = {k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith("_")}
    with torch.device(plan.device):
        ref = UNet2DConditionModel(**dcfg).eval()
        randomize_(ref, seed=1)
        ours = UNet(cfg).eval()
    ours.load_state_dict(diffusers_to_ours(ref.state_dict(), cfg), strict=True)
    return cfg, ref, ours


def unet_inputs(plan: Plan, cfg: UNetConfig, ref, batch: int, hw: int):
    g = torch.Generator(plan.device).manual_seed(2)
    dev = plan.device
    x = torch.randn(batch, 4, hw, hw, generator=g, device=dev)
    t = torch.linspace(17.0, 981.0, batch, device=dev)
    ctx = torch.randn(batch, 77, cfg.context_dim, generator=g, device=dev)
    kw, vec = {}, None
    if cfg.adm_in_channels:
        te = torch.randn(batch, cfg.adm_in_channels - 6 * 256, generator=g, device=dev)
        ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch, device=dev)
        kw["added_cond_kwargs"] = {"text_embeds": te, "time_ids": ids}
        with torch.no_grad():
            vec = torch.cat([te, ref.add_time_proj(ids.flatten()).reshape(batch, -1).to(te.dtype)], -1)
    return x, t, ctx, kw, vec


def cast_inputs(dtype, x, ctx, kw, vec):
    kwd = {"added_cond_kwargs": {k: v.to(dtype) for k, v in kw["added_cond_kwargs"].items()}} if kw else {}
    return x.to(dtype), ctx.to(dtype), kwd, None if vec is None else vec.to(dtype)


def unet_case(plan: Plan, table: Table, case: str, name: str, batch: int, hw: int, variants: dict, compiled: bool):
    batch, hw = plan.batch(batch), plan.hw(hw)
    cfg, ref, ours = unet_pair(plan, name)
    x, t, ctx, kw, vec = unet_inputs(plan, cfg, ref, batch, hw)
    half = batch // 2  # a CFG batch: the first half's latents and times under both halves' texts
    cfg_rows = (torch.cat([x[:half]] * 2), torch.cat([t[:half]] * 2))
    with torch.no_grad():
        ref32 = ours(x, t, Cond(context=ctx, vector=vec))  # our eager fp32 output: every variant's reference
        ref32_cfg = ours(*cfg_rows, Cond(context=ctx)) if any(v.get("cfg_batch") for v in variants.values()) else None
        d32 = ref(x, t, encoder_hidden_states=ctx, **kw).sample
    table.add(case=case, impl="parity", variant="fp32 ours vs diffusers", err=rel_err(ref32, d32))
    del d32
    ref, ours = ref.to(plan.dtype), ours.to(plan.dtype)
    xb, cb, kwb, vb = cast_inputs(plan.dtype, x, ctx, kw, vec)
    cond = Cond(context=cb, vector=vb)
    f_ref = lambda: ref(xb, t, encoder_hidden_states=cb, **kwb).sample  # noqa: E731
    with torch.no_grad():
        flops = count_flops(f_ref)
        d_ms = median_ms(f_ref, plan)
        d_b2b = back_to_back_ms(f_ref, plan) if compiled else None  # the compiled case: the CFG-step goal's table
        table.add(case=case, impl="diffusers", variant="eager", ms=d_ms, ms_b2b=d_b2b, flops=flops,
                  tflops=flops / d_ms / 1e9, mfu=flops / d_ms / 1e9 / plan.peak, err=rel_err(f_ref(), ref32))  # fmt: skip
        dc_ms = None
        if compiled and plan.device.startswith("cuda"):  # is diffusers' eager row host-bound on this machine?
            label = "eager, its kernels alone (one CUDA graph: no host launch time)"
            try:
                replay = graph_replay(f_ref)
            except RuntimeError as e:  # a capture failure: say so, go on
                table.add(case=case, impl="diffusers", variant=label, error=f"{type(e).__name__}: {str(e)[:200]}")
            else:
                g_ms = median_ms(replay, plan)
                table.add(case=case, impl="diffusers", variant=label, ms=g_ms, ms_b2b=back_to_back_ms(replay, plan),
                          ratio=g_ms / d_ms, tflops=flops / g_ms / 1e9, mfu=flops / g_ms / 1e9 / plan.peak)
                del replay
        if compiled:
            cref = torch.compile(ref)
            t0 = time.perf_counter()
            cref(xb, t, encoder_hidden_states=cb, **kwb)
            sync(plan.device)
            compile_s = time.perf_counter() - t0
            fc = lambda: cref(xb, t, encoder_hidden_states=cb, **kwb).sample  # noqa: E731
            dc_ms = median_ms(fc, plan, warmup=3)
            table.add(case=case, impl="diffusers", variant="torch.compile default", ms=dc_ms, compile_s=compile_s,
                      ratio=dc_ms / d_ms, tflops=flops / dc_ms / 1e9, err=rel_err(fc(), ref32))  # fmt: skip
        for label, spec in variants.items():
            spec = dict(spec)
            graphs_on_top = spec.pop("graphs_on_top", False)
            # cfg_batch: UNet.forward's one latent under k conditions (x, t of batch / 2 rows, the texts of batch rows:
            # what guidance passes with speed.shared_latent); the same work as a CFG step, checked against the
            # fp32 U-Net on the latent twice
            args = ((xb[:half], t[:half], Cond(context=cb)) if spec.pop("cfg_batch", False) else (xb, t, cond))
            want = ref32_cfg if len(args[0]) != len(xb) else ref32
            if plan.device == "cpu" and (graphs_on_top or spec.get("cuda_graphs")):
                continue  # CUDA only
            t0 = time.perf_counter()
            applied = apply_speed(ours, plan.speed(spec))
            if graphs_on_top:  # the same compiled body, wrapped in our CUDA-graph runner: no second compilation
                ours.forward = CUDAGraphForward(ours.forward)
            out = ours(*args)
            sync(plan.device)
            first_s = time.perf_counter() - t0
            f = lambda: ours(*args)  # noqa: E731
            ms = median_ms(f, plan, warmup=3 if compiled else None)
            b2b = back_to_back_ms(f, plan) if compiled else None
            err = rel_err(out, want)
            row = dict(case=case, impl="ours", variant=plan.label(label, spec), ms=ms, ratio=ms / d_ms,
                       tflops=flops / ms / 1e9, mfu=flops / ms / 1e9 / plan.peak, err=err, ok=err < plan.tol,
                       speed=applied.describe())  # fmt: skip
            if graphs_on_top:  # what SpeedConfig(compile="default", cuda_graphs=True / null) applies in one go
                row["speed"] = row["speed"].replace("cuda_graphs=False", "cuda_graphs=True")
            if dc_ms:
                row["ratio_vs_compiled"] = ms / dc_ms
            if b2b is not None:
                row["ms_b2b"], row["ratio_b2b"] = b2b, b2b / d_b2b
            if first_s > 5:
                row["first_call_s"] = first_s
            table.add(**row)
        remove_speed(ours)
    del ref, ours
    free()


def unet_variants(channels_last_eager: bool) -> dict:
    v = {
        "eager, SDPA auto (baseline)": dict(OFF),
        "SDPA fastest (cuDNN first)": dict(OFF, attention_kernel="fastest"),
        "+ fused QKV": dict(OFF, attention_kernel="fastest", fused_qkv=True),
    }
    if channels_last_eager:
        v["+ fused QKV + channels-last (eager)"] = dict(OFF, attention_kernel="fastest", fused_qkv=True,
                                                        channels_last=True)  # fmt: skip
    v["+ fused QKV + CUDA graphs = default"] = dict(OFF, attention_kernel="fastest", fused_qkv=True, cuda_graphs=True)
    v["eager, SDPA auto (baseline, timed again)"] = dict(OFF)  # the spread between two timings of one version
    return v


def compile_variants(channels_last_only: bool = False, mode: str = "default") -> dict:
    base = dict(attention_kernel="fastest", fused_qkv=True, cuda_graphs=False, compile=mode, channels_last=True)
    if channels_last_only or mode != "default":  # one compilation
        return {f"compile {mode} + channels-last": dict(base),
                f"compile {mode} + channels-last + CUDA graphs": dict(base, graphs_on_top=True)}
    # (NCHW compiled: 7.04 ms with graphs at batch 2, second session; per-layer emb / context projections: 6.56 ms
    # with graphs, sixth session; not timed again)
    return {
        "compile default + channels-last": dict(base),
        "compile default + channels-last + CUDA graphs": dict(base, graphs_on_top=True),
        "compile default + channels-last + CUDA graphs, the CFG batch as one latent under both texts": dict(
            base, graphs_on_top=True, cfg_batch=True),
    }


# ------------------------------------------------------------------------------------------------ VAE


def vae_case(plan: Plan, table: Table) -> None:
    from diffusers import AutoencoderKL as RefVAE

    from autoencoder import AutoencoderConfig, AutoencoderKL
    from autoencoder.keys import config_to_diffusers, diffusers_to_ours as vae_d2o

    cfg = AutoencoderConfig.tiny() if plan.tiny else AutoencoderConfig.sd()
    with torch.device(plan.device):
        ref = randomize_(RefVAE(**config_to_diffusers(cfg)).eval(), seed=3)
        ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(vae_d2o(ref.state_dict(), cfg), strict=True)
    side = plan.hw(64)
    g = torch.Generator(plan.device).manual_seed(4)
    z = torch.randn(1, cfg.latent_channels, side, side, device=plan.device, generator=g)
    with torch.no_grad():
        ref32 = ours.decode(z)
        ref, ours = ref.to(plan.dtype), ours.to(plan.dtype)
        zb = z.to(plan.dtype)
        fr = lambda: ref.decode(zb / cfg.scale_factor).sample  # noqa: E731
        fo = lambda: ours.decode(zb)  # noqa: E731
        d_ms = median_ms(fr, plan)
        table.add(case="vae", impl="diffusers", variant="eager", ms=d_ms, err=rel_err(fr(), ref32))
        ms = median_ms(fo, plan)
        table.add(case="vae", impl="ours", variant="eager", ms=ms, ratio=ms / d_ms, err=rel_err(fo(), ref32))
    del ref, ours
    free()


# ------------------------------------------------------------------------------------------------ end to end


def e2e_case(plan: Plan, table: Table, e2e_compile: bool = True) -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from inference.pipeline import Pipeline
    from ldm.bundle import Bundle, save_bundle
    from ldm.model_config import ModelConfig
    from tests.fakes import SD_SCHEDULE

    tok = _hf_tokenizer()
    tok.model_max_length = 77
    cfg = ModelConfig.tiny("sd1") if plan.tiny else ModelConfig.sd15()
    try:  # built on the device: the CPU's initialisation of 1e9 parameters takes tens of seconds
        with torch.device(plan.device):
            b = Bundle(cfg)
    except Exception:  # noqa: BLE001
        b = Bundle(cfg).to(plan.device)
    for i, part in enumerate((b.unet, b.vae, *b.text)):
        randomize_(part, seed=10 + i)
    with torch.no_grad():  # random decoders overshoot [-1, 1]: scale the output so images are not all clipped
        b.vae.decoder.conv_out.weight.mul_(0.25)
        b.vae.decoder.conv_out.bias.mul_(0.25)
    root = Path(tempfile.mkdtemp()) / "sd15-random"
    save_bundle(b.to(torch.bfloat16 if plan.device != "cpu" else torch.float32), root, format="diffusers")
    del b
    free()
    side = 32 if plan.tiny else 512
    steps = 3 if plan.tiny else 25
    prompt, negative = "a photograph of an astronaut riding a horse", "blurry, low quality"
    kw = dict(steps=steps, sampler="dpmpp_2m", cfg_scale=7.5, width=side, height=side, seed=1, negative=negative)
    dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[plan.dtype]
    reps = max(3, min(plan.reps, 5))

    def ours_run(pipe):
        return pipe(prompt, **kw).pixels

    p32 = Pipeline.load(root, device=plan.device, dtype="fp32", speed=SpeedConfig(**OFF))
    ref32 = ours_run(p32)
    del p32
    free()
    ref = StableDiffusionPipeline.from_pretrained(root, tokenizer=tok, torch_dtype=plan.dtype).to(plan.device)
    ref.scheduler = DPMSolverMultistepScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1)
    ref.set_progress_bar_config(disable=True)

    def ref_run():
        g = torch.Generator("cpu").manual_seed(1)
        return ref(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5, height=side,
                   width=side, generator=[g], output_type="np").images  # fmt: skip

    d_ms = median_ms(ref_run, plan, warmup=1, reps=reps, events=False)
    d_img = torch.from_numpy(ref_run()).to(ref32.device)
    table.add(case="e2e", impl="diffusers", variant=f"StableDiffusionPipeline eager {dtype_name}", ms=d_ms,
              err=rel_err(d_img, ref32))  # fmt: skip
    del ref
    free()
    base_err = None
    variants = [("eager (speed off)", OFF), ("default speed (SpeedConfig())", {})]
    if e2e_compile:
        variants.append(("compile default (+ channels-last, CUDA graphs by auto)", dict(compile="default")))
    for label, spec in variants:
        pipe = Pipeline.load(root, device=plan.device, dtype=dtype_name, speed=plan.speed(spec))
        t0 = time.perf_counter()
        first = ours_run(pipe)  # the first image: compilation, graph capture
        first_s = time.perf_counter() - t0
        ms = median_ms(lambda: ours_run(pipe), plan, warmup=1, reps=reps, events=False)
        err = rel_err(first, ref32)
        base_err = err if base_err is None else base_err
        table.add(case="e2e", impl="ours", variant=plan.label(label, spec), ms=ms, ratio=ms / d_ms, err=err,
                  first_image_s=first_s, ok=err < max(plan.tol, 1.5 * base_err),
                  speed=pipe.bundle.unet.speed.describe())  # fmt: skip
        del pipe
        free()


def _hf_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): i for tok, i in st.encoder.items()}
    merges = [pair for pair, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_cases = [c for c in CASES if not c.endswith("_compile") or c == "unet_b2_compile"]
    ap.add_argument("--only", default=",".join(default_cases),
                    help="comma-separated cases (default: all but the compiled b16, SDXL and training ones): "
                    + ", ".join(CASES))  # fmt: skip
    ap.add_argument("--out", default="perf.json")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up, 3 repetitions")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks the code paths only)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--train-reps", type=int, default=20)
    ap.add_argument("--peak", type=float, default=790.0, help="bf16 matmul peak in TFLOP/s for MFU")
    ap.add_argument("--tol", type=float, default=3e-2)
    ap.add_argument("--variants", default="", help="training cases: only our variants whose label contains this (or one of "
                                                      "several, separated by |)")
    ap.add_argument("--compile-mode", default="default", choices=("default", "max-autotune-no-cudagraphs"),
                    help="our mode in the compiled U-Net cases (channels-last only, one compilation each)")
    add_inductor_flag(ap)  # both libraries' compilations
    ap.add_argument("--attention-kernel", default="fastest", choices=ATTENTION_KERNELS,
                    help="our attention kernel wherever a variant uses the default 'fastest' (e.g. fa4)")
    ap.add_argument("--conv-plans", default=None, metavar="FILE",
                    help="our inference variants run the measured cuDNN convolution plans of FILE (speed.conv_plans; "
                         "bench/cudnn_knobs.py --write-plans)")
    ap.add_argument("--no-e2e-compile", action="store_true", help="skip the compiled end-to-end variant (~1 min)")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"--only: unknown case {bad[0]!r}; one of: {', '.join(CASES)}")
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    quick = args.quick or args.tiny
    plan = Plan(device=device, dtype=torch.bfloat16, tiny=args.tiny, warmup=1 if quick else 5,
                reps=3 if quick else args.reps, train_reps=3 if quick else args.train_reps, peak=args.peak,
                tol=args.tol, variants=args.variants, attention_kernel=args.attention_kernel,
                conv_plans=args.conv_plans)  # fmt: skip
    train = [c for c in cases if c.startswith("train")]
    labels = [lb for c in train for lb in (TRAIN_COMPILE if c.endswith("_compile") else TRAIN_EAGER)]
    for v in plan.variant_filters():  # a filter that matches nothing would skip every row of ours without a word
        if not any(v in lb for lb in labels):
            ap.error(f"--variants: {v!r} matches no variant of the training cases in --only "
                     f"({', '.join(train) or 'none'}); their variants: {'; '.join(labels) or '-'}")
    apply_inductor_flags(ap, args.inductor)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    table = Table(plan)
    import diffusers

    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "cases": cases, "reps": plan.reps,
            "train_reps": plan.train_reps, "inductor": args.inductor,
            "attention_kernel": args.attention_kernel, "conv_plans": args.conv_plans}  # fmt: skip
    print(json.dumps(meta), flush=True)
    runs = {
        "unet_b2": lambda: unet_case(plan, table, "unet_b2", "sd15", 2, 64, unet_variants(True), False),
        "unet_b2_compile": lambda: unet_case(plan, table, "unet_b2_compile", "sd15", 2, 64,
                                             compile_variants(mode=args.compile_mode), True),
        "unet_b16": lambda: unet_case(plan, table, "unet_b16", "sd15", 16, 64, unet_variants(True), False),
        "unet_b16_compile": lambda: unet_case(plan, table, "unet_b16_compile", "sd15", 16, 64,
                                              compile_variants(True, args.compile_mode), False),
        "sdxl_b2": lambda: unet_case(plan, table, "sdxl_b2", "sdxl", 2, 128, unet_variants(False), False),
        "sdxl_b2_compile": lambda: unet_case(plan, table, "sdxl_b2_compile", "sdxl", 2, 128,
                                             compile_variants(True, args.compile_mode), False),
        "vae": lambda: vae_case(plan, table),
        "e2e": lambda: e2e_case(plan, table, not args.no_e2e_compile),
        "train256": lambda: train_case(plan, table, "train256", 256, 64, TRAIN_EAGER, ref_benchmark=True),
        "train512": lambda: train_case(plan, table, "train512", 512, 32, TRAIN_EAGER, ref_benchmark=True),
        "train256_compile": lambda: train_case(plan, table, "train256_compile", 256, 64, TRAIN_COMPILE),
        "train512_compile": lambda: train_case(plan, table, "train512_compile", 512, 32, TRAIN_COMPILE),
    }
    failures = []
    for c in cases:
        torch._dynamo.reset()  # each case compiles from scratch: no guards or dynamic-shape marks from the last one
        torch.backends.cudnn.benchmark = False  # the default; only the diffusers "+ cuDNN benchmark" row sets it
        t0 = time.perf_counter()
        try:
            runs[c]()
        except Exception as e:  # noqa: BLE001 - one failing case must not lose the others' numbers
            import traceback

            traceback.print_exc()
            failures.append(f"{c}: {type(e).__name__}: {e}")
            free()
        print(f"# {c}: {time.perf_counter() - t0:.0f} s", flush=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": table.rows, "failures": failures}, indent=1))
    print()
    print(markdown(table.rows))
    print()
    for line in summary(table.rows):
        print("- " + line)
    for f in failures:
        print("FAILED " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
