"""Speed switches for the U-Net: ``SpeedConfig`` and ``apply_speed(unet, cfg)``, in place, weights untouched.

    apply_speed(pipe.bundle.unet, SpeedConfig())                      # the defaults: the fastest correct ones
    apply_speed(unet, SpeedConfig(compile="default", channels_last=True), training=True)

A ControlNet (ldm/controlnet.py) takes the same switches but the U-Net-only fused_emb, fused_context_kv and
shared_latent; the pipeline applies its SpeedConfig to every ControlNet of the model (inference/conditions.py
speed_controls). The SD 1.5 ControlNet's call in the CFG step: 11.0 ms eager, 5.34 ms with the defaults (CUDA
graphs, fused q/k/v), 2.89 ms compiled; diffusers' ControlNetModel 13.3 ms (bench/controlnet_speed.py, BENCHMARKS.md).

Each switch is a runtime transformation: parameter names, shapes and the state dict stay as they are, so
checkpoints load and save the same. ``None`` (``auto``) means "on where it was measured to help" (BENCHMARKS.md,
"Performance"): on CUDA, off on the CPU, where every default is a no-op and the eager path stays bit for bit
what it was.

    attention_kernel  fastest: SDPA with priority cuDNN > flash > memory-efficient > math (cuDNN measured 1.3-1.8x
                      faster than flash on the H200; the priority list falls through where cuDNN cannot run, e.g.
                      fp32); auto: PyTorch's own choice; or pin one (ldm/attention.py); fa4: FlashAttention-4
                      for the long self-attention (>= 2048 keys; with gradients, head dims padded to a multiple of 32)
                      (optional flash-attn-4 package, ldm/attention_fa4.py), fastest elsewhere. On the CPU
                      ``fastest`` and ``fa4`` keep the U-Net's configured kernel.
    fused_qkv         one matmul for q, k, v of self-attention and one for k, v of cross-attention, through weights
                      concatenated once and cached (ldm/transformer.py, CrossAttention.fuse_projections).
                      Inference only: with gradients the separate projections run. auto: on with CUDA, inference.
    fused_emb         one matmul for every ResBlock's time-embedding projection (22 matmuls of 2-4 rows in SD 1.5),
                      through weights concatenated once and cached (ldm/fused_projections.py, fuse_emb_projections);
                      each block reads its columns. Inference only. auto: on with CUDA, inference.
    fused_context_kv  one matmul for every cross-attention's keys and values of the text context (16 in SD 1.5),
                      likewise cached (ldm/fused_projections.py, fuse_context_projections); acts where fused_qkv does.
                      auto: on with CUDA, inference.
    shared_latent     classifier-free guidance hands the U-Net the latent once with the k conditions' contexts
                      (ldm/guidance.py, UNet.forward), not k copies of it: the layers before the first
                      cross-attention (conv_in, the first ResBlock and self-attention) run on one copy; the compiled
                      SD 1.5 CFG step 6.06 -> 5.94 ms (BENCHMARKS.md). Only for a plain U-Net and text-only
                      conditions (SDXL's pooled vector, concat, ControlNet / registered conditions keep the copies).
                      The same values; on the CPU a batch of one image then runs those layers on 1 row, which oneDNN
                      rounds differently from 2, so auto keeps it off there (image k of a batch stays bit for bit
                      the image alone). Inference only. auto: on with CUDA, inference.
    channels_last     convolution weights (and so activations) in NHWC. cuDNN's bf16 convolutions run NHWC natively,
                      but PyTorch's eager CUDA GroupNorm copies NHWC input to NCHW, so eager loses what the
                      convolutions gain unless triton_group_norm takes the norms; compiled, Inductor writes GroupNorm
                      for either layout. auto: on with CUDA when compiled or with triton_group_norm.
    compile           none | default | max-autotune | max-autotune-no-cudagraphs | reduce-overhead: torch.compile of
                      the U-Net's body (``_forward``; input checks and the SDPA kernel context stay eager, so the
                      trace sees the pinned kernel). ~50 s of compilation for SD 1.5: off by default.
    cuda_graphs       capture the whole U-Net call once per input shape and replay it (CUDAGraphForward):
                      removes the ~1,000 kernel launches' host cost, which dominates at batch 2. Inference only
                      (no gradients), CUDA only; the inputs are copied into static buffers, the output is cloned.
                      auto: on with CUDA for inference unless compile is reduce-overhead (which captures its own).
    low_precision_norms  GroupNorm / LayerNorm in the autocast dtype (bf16) instead of autocast's fp32 (ldm/norms.py):
                      half the bytes for each norm, the SiLU after it and what the backward keeps. Acts only under
                      autocast (training with mixed precision); a no-op for fp32 or bf16-weight inference.
                      auto: on with CUDA.
    triton_geglu      GEGLU's backward as one Triton kernel that computes each (a, gate) pair once (ldm/geglu.py):
                      Inductor's kernel recomputes the erf per output element: 12.4 -> 4.8 ms per SD 1.5 training
                      step at 512 px, batch 32; the compiled step 237.6 -> 231.6 ms. Acts only when gradients flow,
                      on CUDA, with Triton installed.
                      auto: on with CUDA.
    channels_last_grads  convolutions' backward through ``ldm::conv2d_backward`` (ldm/conv_grad.py), which asks for
                      the output gradient and the input in NHWC, so that Inductor writes them NHWC instead of ATen
                      copying them there inside ``convolution_backward`` (13.6 ms of copies per compiled SD 1.5 step
                      at 512 px, batch 32; that step 223.3 -> 214.0 ms with fa4, 1.50x diffusers with cuDNN). Same
                      kernels, same values. Acts only when gradients flow. auto: on with CUDA for compiled
                      channels-last training.
    nhwc_group_norm   GroupNorm computed from the channels-last (B, H*W, G, C/G) view (ldm/norm_nhwc.py): one
                      reduction per group that walks its contiguous channels row by row, then one coalesced pass to
                      normalise; Inductor's decomposition of GroupNorm reads channels-last memory in NCHW order, one
                      element per row step (11-17 us per 64x64-level norm in the compiled SD 1.5 CFG step). Same
                      normalisation in fp32. Acts only on 4-D channels-last inputs. Measured on the compiled CFG
                      step: 5.967 -> 5.705 ms (BENCHMARKS.md, tenth session); SDXL 30.29 -> 29.71 ms, batch 16
                      unchanged; compiled training 221.1 -> 218.1 ms at 512 px and 102.7 -> 101.0 ms at 256 px,
                      0.5-1.9 GiB less peak memory (eleventh session). Without compile it is a chain of PyTorch
                      ops, and triton_group_norm takes the norms there. auto: on with CUDA when compiled
                      (inference and training).
    triton_group_norm GroupNorm + the SiLU after it as two Triton kernels over NHWC activations
                      (ldm/group_norm_triton.py: per-chunk statistics, then combine, normalise, SiLU in one pass;
                      fp32 math, deterministic).
                      Eager, PyTorch's GroupNorm copies NHWC to NCHW and back (50-150 us per 64x64-level norm;
                      23-37 us here, 5-12 us at the lower levels), so with it channels_last pays off without
                      compiling: the SD 1.5 CFG step in the default path (CUDA graphs, no compile) 11.36 -> 7.04 ms
                      (BENCHMARKS.md, ninth session).
                      Compiled, Inductor's fused norms were faster in the step (5.89 vs 6.57 ms): auto off there.
                      Inference only (no gradients). auto: on with CUDA for inference when not compiled.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .attention import SDPA_KERNELS
from .attention_fa4 import require_fa4
from .config import check_choices, choice
from .conditioning import Cond
from .conv_grad import set_channels_last_grads
from .conv_plans import matching_convs, require_plans, set_conv_plans
from .group_norm_triton import TRITON, set_triton_group_norm
from .norm_nhwc import set_nhwc_group_norm
from .norms import set_low_precision_norms

COMPILE_MODES = ("none", "default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
ATTENTION_KERNELS = tuple(SDPA_KERNELS)  # auto | cudnn | flash | efficient | math | fastest | fa4


@dataclass
class SpeedConfig:
    attention_kernel: str = choice("fastest", *ATTENTION_KERNELS)
    fused_qkv: Optional[bool] = None  # None: auto (CUDA inference)
    fused_emb: Optional[bool] = None  # None: auto (CUDA inference)
    fused_context_kv: Optional[bool] = None  # None: auto (CUDA inference)
    shared_latent: Optional[bool] = None  # None: auto (CUDA inference)
    channels_last: Optional[bool] = None  # None: auto (CUDA, compiled or with triton_group_norm)
    compile: str = choice("none", *COMPILE_MODES)
    cuda_graphs: Optional[bool] = None  # None: auto (CUDA inference, unless compile=reduce-overhead)
    low_precision_norms: Optional[bool] = None  # None: auto (CUDA); acts only under autocast
    triton_geglu: Optional[bool] = None  # None: auto (CUDA); acts only with gradients
    channels_last_grads: Optional[bool] = None  # None: auto (CUDA, compiled channels-last training)
    nhwc_group_norm: Optional[bool] = None  # None: auto (CUDA inference, compiled)
    triton_group_norm: Optional[bool] = None  # None: auto (CUDA inference, not compiled)
    conv_plans: Optional[str] = None  # a plans file of bench/cudnn_knobs.py: measured cuDNN kernels (CUDA inference)

    def __post_init__(self) -> None:
        check_choices(self, "speed")
        for name in (f.name for f in fields(self) if f.type == "Optional[bool]"):  # the on / off / auto switches
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"speed.{name}: must be true, false or null (auto), got {v!r}")
        if self.conv_plans is not None and not isinstance(self.conv_plans, str):
            raise ValueError(f"speed.conv_plans: must be a file name or null, got {self.conv_plans!r}")
        if self.cuda_graphs and self.compile == "reduce-overhead":
            raise ValueError("speed.cuda_graphs: compile=reduce-overhead already captures CUDA graphs; set "
                             "speed.cuda_graphs=false or another speed.compile mode")  # fmt: skip

    def resolve(self, device: torch.device | str, training: bool = False) -> "ResolvedSpeed":
        """Concrete switches for a U-Net on ``device``; ``training``: gradients flow (no graphs, no fused cache)."""
        cuda = torch.device(device).type == "cuda"
        if training and self.cuda_graphs:
            raise ValueError("speed.cuda_graphs: CUDA graphs are for inference; set speed.cuda_graphs=false (or "
                             "null) for training, or compile=reduce-overhead")  # fmt: skip
        if not cuda and self.cuda_graphs:
            raise ValueError(f"speed.cuda_graphs: needs a CUDA device, the U-Net is on {device}")
        if self.conv_plans and training:
            raise ValueError("speed.conv_plans: measured cuDNN plans are for inference (no gradients); leave it unset "
                             "for training")  # fmt: skip
        if self.conv_plans and not cuda:
            raise ValueError(f"speed.conv_plans: cuDNN plans need a CUDA device, the U-Net is on {device}")
        compiled = self.compile != "none"
        kernel = self.attention_kernel
        if kernel in ("fastest", "fa4") and not cuda:
            kernel = None  # keep the configured one
        if kernel == "fa4":
            require_fa4()  # the error names the missing package
        # the Triton GroupNorm: on for eager CUDA inference, where PyTorch's GroupNorm copies NHWC input to NCHW;
        # compiled, Inductor's own fused norms measured faster in the step (BENCHMARKS.md, ninth session)
        triton_gn = _auto(self.triton_group_norm, cuda and not training and not compiled and TRITON)
        channels_last = _auto(self.channels_last, cuda and (compiled or triton_gn))
        return ResolvedSpeed(
            attention_kernel=kernel,
            fused_qkv=_auto(self.fused_qkv, cuda and not training),
            fused_emb=_auto(self.fused_emb, cuda and not training),
            fused_context_kv=_auto(self.fused_context_kv, cuda and not training),
            shared_latent=_auto(self.shared_latent, cuda and not training),
            channels_last=channels_last,
            compile=self.compile,
            cuda_graphs=_auto(self.cuda_graphs, cuda and not training and self.compile != "reduce-overhead"),
            low_precision_norms=_auto(self.low_precision_norms, cuda),
            triton_geglu=_auto(self.triton_geglu, cuda),
            channels_last_grads=_auto(self.channels_last_grads, cuda and training and channels_last and compiled),
            nhwc_group_norm=_auto(self.nhwc_group_norm, cuda and compiled and not triton_gn),
            triton_group_norm=triton_gn,
            conv_plans=self.conv_plans or None,
        )


def _auto(value: Optional[bool], default: bool) -> bool:
    return default if value is None else value


@dataclass(frozen=True)
class ResolvedSpeed:
    attention_kernel: Optional[str]  # None: the U-Net's configured kernel, untouched
    fused_qkv: bool
    channels_last: bool
    compile: str
    cuda_graphs: bool
    low_precision_norms: bool = False
    triton_geglu: bool = False
    channels_last_grads: bool = False
    nhwc_group_norm: bool = False
    fused_emb: bool = False
    fused_context_kv: bool = False
    shared_latent: bool = False
    triton_group_norm: bool = False
    conv_plans: Optional[str] = None

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


def apply_speed(unet: nn.Module, cfg: SpeedConfig | None = None, *, training: bool = False) -> ResolvedSpeed:
    """Apply ``cfg`` (default: SpeedConfig()) to a UNet (ldm/unet.py) or a ControlNet (ldm/controlnet.py) in place,
    on the device it is on now. A ControlNet gets every switch but the U-Net-only ones (fused_emb, fused_context_kv,
    shared_latent: its forward reads none of them); its CUDA graphs replay (x, hint, t, cond, scale).

    Call it after the weights are loaded and the network is moved. Calling it again first undoes the previous
    switches (``remove_speed``). Returns what was applied (also kept as ``unet.speed``)."""
    from .transformer import GEGLU, CrossAttention, SpatialTransformer  # noqa: PLC0415

    cfg = cfg if cfg is not None else SpeedConfig()
    remove_speed(unet)
    first = next(unet.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    r = cfg.resolve(device, training)
    if not _is_unet(unet):  # a ControlNet: its forward reads none of the U-Net-only switches, so they are off
        r = replace(r, fused_emb=False, fused_context_kv=False, shared_latent=False)
    if r.attention_kernel is not None and hasattr(unet, "set_attention_backend"):
        backend = next((m.backend for m in unet.modules() if isinstance(m, CrossAttention)), "sdpa")
        unet.set_attention_backend(backend, r.attention_kernel)
    for m in unet.modules():
        if isinstance(m, CrossAttention):
            m.fuse_projections(r.fused_qkv)
            if r.fused_qkv:
                m.fused_projection()  # built now, eagerly, so a compiled graph only reads the buffer
        if isinstance(m, SpatialTransformer):
            m.channels_last = r.channels_last
        if isinstance(m, GEGLU):
            m.triton_backward = r.triton_geglu
    if hasattr(unet, "fuse_emb_projections"):  # after the layers' fuse_projections: the context k, v needs them
        unet.fuse_emb_projections(r.fused_emb)
        unet.fuse_context_projections(r.fused_context_kv)
        if r.fused_emb:
            unet.fused_emb_projection()  # built now, eagerly, so a compiled graph only reads the buffers
        if r.fused_context_kv:
            unet.fused_context_projection()
    if hasattr(unet, "share_latent"):
        unet.share_latent = r.shared_latent
    if r.low_precision_norms:
        set_low_precision_norms(unet, True)
    if r.triton_group_norm:  # after the low-precision switch: it keeps the class it replaces; before the NHWC one
        set_triton_group_norm(unet, True)
    if r.nhwc_group_norm:  # after the low-precision switch: it keeps the class it replaces
        set_nhwc_group_norm(unet, True)
    if r.channels_last_grads:
        set_channels_last_grads(unet, True)
    if r.conv_plans:  # the file, the package, the GPU and cuDNN checked here, before any compilation
        table = require_plans(r.conv_plans, device)
        if set_conv_plans(unet, table) and not matching_convs(unet, table):
            warnings.warn(f"speed.conv_plans: {r.conv_plans} has no plan for any convolution of this "
                          f"{type(unet).__name__} (weight shapes and dtype {first.dtype}): every convolution runs "
                          "F.conv2d; measure this model with bench/cudnn_knobs.py --write-plans", RuntimeWarning,
                          stacklevel=2)  # fmt: skip
        if not r.cuda_graphs and r.compile != "reduce-overhead":
            # each planned call goes through the cuDNN frontend on the host: compiled without graphs the SD1.5 CFG
            # step measured 18.5 ms with plans vs 13.6 ms without (BENCHMARKS.md, thirteenth session)
            warnings.warn("speed.conv_plans without CUDA graphs: each planned convolution costs host time, so the "
                          "U-Net step is likely slower than without plans; set speed.cuda_graphs=true (or null, "
                          "auto) or leave speed.conv_plans unset", RuntimeWarning, stacklevel=2)  # fmt: skip
    if r.channels_last:
        unet.to(memory_format=torch.channels_last)
    if r.compile != "none" and hasattr(unet, "_forward"):
        mode = None if r.compile == "default" else r.compile
        # the body; checks + kernel context stay eager. dynamic=False: each input shape gets its own static graph
        # (what CUDA graphs replay anyway), never a symbolic-shape recompile of a second shape
        unet._forward = torch.compile(unet._forward, mode=mode, dynamic=False)
    if r.cuda_graphs:
        inputs = _controlnet_inputs if _is_controlnet(unet) else _unet_inputs  # the call's signature
        unet.forward = CUDAGraphForward(unet.forward, inputs=inputs)
    unet.speed = r
    return r


def _is_unet(net: nn.Module) -> bool:
    from .unet import UNet  # noqa: PLC0415

    return isinstance(net, UNet)


def _is_controlnet(net: nn.Module) -> bool:
    from .controlnet import ControlNet  # noqa: PLC0415

    return isinstance(net, ControlNet)


def remove_speed(unet: nn.Module) -> None:
    """Undo ``apply_speed``: eager forward, separate projections, NCHW weights, the configured attention kernel."""
    from .transformer import GEGLU, CrossAttention, SpatialTransformer  # noqa: PLC0415

    if getattr(unet, "speed", None) is None:
        return
    for name in ("forward", "_forward"):
        unet.__dict__.pop(name, None)  # instance attributes shadowing the class's methods
    for m in unet.modules():
        if isinstance(m, CrossAttention):
            m.fuse_projections(False)
        if isinstance(m, SpatialTransformer):
            m.channels_last = False
        if isinstance(m, GEGLU):
            m.triton_backward = False
    if hasattr(unet, "fuse_emb_projections"):
        unet.fuse_emb_projections(False)
        unet.fuse_context_projections(False)
    if hasattr(unet, "share_latent"):
        unet.share_latent = False
    if unet.speed.triton_group_norm:  # first: it restores the low-precision class
        set_triton_group_norm(unet, False)
    if unet.speed.nhwc_group_norm:  # likewise
        set_nhwc_group_norm(unet, False)
    if unet.speed.low_precision_norms:
        set_low_precision_norms(unet, False)
    if unet.speed.channels_last_grads:
        set_channels_last_grads(unet, False)
    if unet.speed.conv_plans:
        set_conv_plans(unet, None)
    if unet.speed.channels_last:
        unet.to(memory_format=torch.contiguous_format)
    if unet.speed.attention_kernel is not None and hasattr(unet, "set_attention_backend"):
        backend = next((m.backend for m in unet.modules() if isinstance(m, CrossAttention)), "sdpa")
        unet.set_attention_backend(backend, unet.cfg.sdpa_kernel)
    unet.speed = None


# ------------------------------------------------------------------------------------------------ CUDA graphs


def _flatten(args: tuple) -> tuple[list[Tensor], Any]:
    """The tensors of a call's positional arguments in a fixed order (tensors, and a Cond's tensor fields), and a
    hashable description of where they go; other arguments (None, numbers) are constants of the description."""
    tensors, spec = [], []
    for a in args:
        if isinstance(a, Tensor):
            tensors.append(a)
            spec.append("t")
        elif isinstance(a, Cond):
            spec.append(("cond", _flatten_cond(a, tensors)))
        else:
            spec.append(("const", a))
    return tensors, tuple(spec)


def _flatten_cond(cond: Cond, tensors: list[Tensor]) -> tuple:
    spec = []
    for f in fields(Cond):
        v = getattr(cond, f.name)
        if v is None:
            spec.append((f.name, None))
        elif isinstance(v, Tensor):
            tensors.append(v)
            spec.append((f.name, "t"))
        elif isinstance(v, dict):
            keys = tuple(sorted(v))
            tensors += [v[k] for k in keys]
            spec.append((f.name, ("d", keys)))
        else:
            tensors += list(v)
            spec.append((f.name, ("l", len(v))))
    return tuple(spec)


def _unflatten(tensors: list[Tensor], spec) -> tuple:
    rest = list(tensors)
    args = []
    for item in spec:
        if item == "t":
            args.append(rest.pop(0))
        elif item[0] == "cond":
            args.append(_unflatten_cond(rest, item[1]))
        else:
            args.append(item[1])
    return tuple(args)


def _unflatten_cond(rest: list[Tensor], spec) -> Cond:
    kw = {}
    for name, kind in spec:
        if kind is None:
            kw[name] = None
        elif kind == "t":
            kw[name] = rest.pop(0)
        elif kind[0] == "d":
            kw[name] = {k: rest.pop(0) for k in kind[1]}
        else:
            kw[name] = tuple(rest.pop(0) for _ in range(kind[1]))
    return Cond(**kw)


def _times(t, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t  # (B,)


def _unet_inputs(x: Tensor, t, cond: Cond | None = None, adapter=None) -> tuple | None:
    """UNet.forward's arguments as the graph takes them, (x, t (B,), cond); None (run eagerly) with T2I-Adapter
    features."""
    if adapter is not None:
        return None
    return x, _times(t, x), cond if cond is not None else Cond()


def _controlnet_inputs(x: Tensor, hint: Tensor, t, cond: Cond | None = None, scale: float = 1.0) -> tuple:
    """ControlNet.forward's arguments as the graph takes them, (x, hint, t (B,), cond, scale); ``scale`` is part of
    the signature (a new value captures another graph)."""
    return x, hint, _times(t, x), cond if cond is not None else Cond(), float(scale)


def _clone(out):
    return out.clone() if isinstance(out, Tensor) else type(out)(o.clone() for o in out)


class CUDAGraphForward:
    """``fn(x, t, cond)`` (a U-Net's forward; with ``inputs=_controlnet_inputs`` a ControlNet's, ``fn(x, hint, t,
    cond, scale)``) replayed from a CUDA graph captured once per input signature (shapes, dtypes, strides, which
    condition fields are set, the constants). Falls back to ``fn`` with gradients on, off CUDA, with T2I-Adapter
    features, or, after a warning, for good if a capture fails (e.g. code that reads a value on the host).

    The graph reads the parameters where they are: in-place weight changes (load_state_dict, merge_lora) are seen.
    What the host decided at capture is not: replaced parameter tensors, modules added or swapped (inject_lora,
    load_lora), Python-side settings (set_lora_scale, set_attention_backend); call ``reset()`` (or ``apply_speed``
    again) after those."""

    def __init__(self, fn: Callable, max_graphs: int = 4, inputs: Callable = _unet_inputs):
        self.fn = fn
        self.inputs = inputs  # (*args, **kwargs) -> fn's positional arguments with tensor times, or None: eager
        self.max_graphs = max_graphs
        self.graphs: OrderedDict = OrderedDict()  # signature -> (static inputs, graph, static output)
        self.failed: str | None = None

    def reset(self) -> None:
        self.graphs.clear()

    def __call__(self, *args, **kwargs):
        call = self.inputs(*args, **kwargs)  # fn's positional arguments, normalised; None: run eagerly
        if (call is None or self.failed or not call[0].is_cuda or torch.is_grad_enabled()
                or torch.cuda.is_current_stream_capturing()):  # fmt: skip
            return self.fn(*args, **kwargs)
        tensors, spec = _flatten(call)
        key = (spec, tuple((tuple(a.shape), a.dtype, a.stride(), a.device) for a in tensors))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(tensors, spec)
            if entry is None:
                return self.fn(*call)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        static_in, graph, static_out = entry
        for s, a in zip(static_in, tensors):
            s.copy_(a)
        graph.replay()
        return _clone(static_out)  # the next replay overwrites static_out

    def _capture(self, tensors: list[Tensor], spec):
        static_in = [a.clone() for a in tensors]
        args = _unflatten(static_in, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):  # warm-up: lazy inits, cuDNN/cuBLAS plans, autotuning happen here
                for _ in range(2):
                    self.fn(*args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.fn(*args)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"speed.cuda_graphs: capture failed ({self.failed}); running the U-Net eagerly",
                          RuntimeWarning, stacklevel=3)  # fmt: skip
            return None
        return static_in, graph, static_out
