"""The measuring side of bench/perf.py: the run's sizes (Plan), timing (CUDA events or a synchronized wall clock,
median), FLOP counting, the error against a reference, full-size random weights, the printed result table."""
from __future__ import annotations

import gc
import json
import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm.speed import SpeedConfig
from ldm.unet import UNetConfig

@dataclass
class Plan:
    """Sizes of a run: the issue's (default) or tiny ones for a CPU smoke run (--tiny)."""

    device: str
    dtype: torch.dtype
    tiny: bool
    warmup: int
    reps: int
    train_reps: int
    peak: float
    tol: float
    variants: str = ""  # training cases: only our variants whose label contains this (empty: all)
    attention_kernel: str = "fastest"  # --attention-kernel: replaces "fastest" in our speed configs
    conv_plans: str | None = None  # --conv-plans: measured cuDNN convolution plans in our inference configs

    def variant_filters(self) -> list[str]:
        """--variants split at "|" (empty: no filter)."""
        return self.variants.split("|") if self.variants else []

    def wants(self, label: str) -> bool:
        """Whether our training variant ``label`` is run: every one without --variants, else those it names."""
        return not self.variants or any(v in label for v in self.variant_filters())

    def _replaces_fastest(self, spec: dict) -> bool:
        return spec.get("attention_kernel", "fastest") == "fastest"

    def speed(self, spec: dict, training: bool = False) -> SpeedConfig:
        """Our SpeedConfig for a variant, with this run's attention kernel where the variant asks for the fastest
        and, at inference, this run's convolution plans (``speed.conv_plans`` is inference only)."""
        if self._replaces_fastest(spec):
            spec = dict(spec, attention_kernel=self.attention_kernel)
        if self.conv_plans and not training:
            spec = dict(spec, conv_plans=self.conv_plans)
        return SpeedConfig(**spec)

    def label(self, label: str, spec: dict, training: bool = False) -> str:
        """A row's variant label, naming this run's attention kernel where it replaced the fastest (``speed``)."""
        if self.attention_kernel != "fastest" and self._replaces_fastest(spec):
            label = f"{label} [attention_kernel={self.attention_kernel}]"
        if self.conv_plans and not training:
            label = f"{label} [conv_plans]"
        return label

    def unet_cfg(self, name: str) -> UNetConfig:
        cfg = UNetConfig.sdxl_base() if name == "sdxl" else UNetConfig.sd15()
        if not self.tiny:
            return cfg
        return cfg.tiny(adm_in_channels=16 + 6 * 256) if cfg.adm_in_channels else cfg.tiny()

    def hw(self, hw: int) -> int:
        return 16 if self.tiny else hw

    def batch(self, b: int) -> int:
        return min(b, 4) if self.tiny else b


# ------------------------------------------------------------------------------------------------ measuring


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, plan: Plan, warmup: int | None = None, reps: int | None = None, events: bool = True) -> float:
    """Median time of ``fn()`` in ms: CUDA events around each call (``events``), else a synchronized wall clock."""
    for _ in range(plan.warmup if warmup is None else warmup):
        fn()
    sync(plan.device)
    times = []
    for _ in range(plan.reps if reps is None else reps):
        if events and plan.device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            sync(plan.device)
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def graph_replay(fn):
    """``fn`` (CUDA work, no host reads) captured once in a CUDA graph; returns the graph's ``replay``: the same
    kernels without the host's launch work. Times an eager network's kernels alone, the bound its eager time
    approaches on a host fast enough to keep the GPU busy."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: lazy inits, cuDNN / cuBLAS plans
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def back_to_back_ms(fn, plan: Plan, calls: int = 10, rounds: int = 10) -> float:
    """Median over ``rounds`` of the time per call of ``calls`` calls issued back to back (one pair of CUDA events
    around them), as a sampling loop issues U-Net steps: the host's work for call n + 1 overlaps the GPU's work for
    call n. ``median_ms`` times each call alone, so it also counts the host's time before the first kernel
    (~0.1 ms for a graph replay); where the host is the bottleneck (eager diffusers) the two agree."""
    for _ in range(3):
        fn()
    sync(plan.device)
    times = []
    for _ in range(rounds):
        if plan.device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(calls):
                fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(plan.device)
            times.append(1e3 * (time.perf_counter() - t0) / calls)
    return statistics.median(times)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().cpu(), ref.float().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, drawn where it lives: weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2),
    biases ~ N(0, 0.05^2) (as tests/test_unet_parity.randomize_, which draws on the CPU and is slow at full size)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            g = torch.Generator(p.device).manual_seed(seed * 100_003 + i)
            r = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            if p.ndim == 0:
                continue
            if name.endswith("bias"):
                p.copy_(0.05 * r)
            elif p.ndim == 1:  # norm scales
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))
    return model


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Table:
    def __init__(self, plan: Plan):
        self.rows: list[dict] = []
        self.plan = plan

    def add(self, **row) -> dict:
        self.rows.append(row)
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        return row


def in_fresh_thread(fn, *args, cudnn: dict | None = None):
    """``fn(*args)`` in a new thread, with the ``torch.backends.cudnn`` attributes in ``cudnn`` (e.g.
    ``{"benchmark": True, "benchmark_limit": 0}``) set for its duration; returns its result or re-raises its
    exception here.

    PyTorch keeps the cuDNN convolution plans it picked in a thread-local cache (aten/src/ATen/native/cudnn/
    Conv_v8.cpp, ``thread_local BenchmarkCache``) keyed by shapes, dtypes, alignment, ``deterministic`` and
    ``allow_tf32``, but not by ``cudnn.benchmark``. In one thread, a shape once run with the heuristics' plan keeps
    it after ``cudnn.benchmark = True`` (and the other way round). A fresh thread starts with an empty cache, so each
    variant compiled, warmed up and captured in its own thread gets the plans its own flags choose. CUDA graphs
    captured there replay from any thread. (Not ``torch.backends.cudnn.flags``: its defaults switch cuDNN off.)"""
    import threading

    backend = torch.backends.cudnn
    for key in cudnn or {}:
        if key not in ("benchmark", "benchmark_limit", "deterministic", "allow_tf32"):
            raise ValueError(f"cudnn.{key}: not a flag this helper sets (benchmark, benchmark_limit, deterministic, "
                             "allow_tf32)")
    box: dict = {}

    def run():
        try:
            box["out"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            box["err"] = e

    old = {k: getattr(backend, k) for k in cudnn or {}}
    try:
        for k, v in (cudnn or {}).items():
            setattr(backend, k, v)
        t = threading.Thread(target=run)
        t.start()
        t.join()
    finally:
        for k, v in old.items():
            setattr(backend, k, v)
    if "err" in box:
        raise box["err"]
    return box["out"]
