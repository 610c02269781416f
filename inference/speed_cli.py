"""The U-Net's speed switches on the command line (``ldm txt2img`` / ``img2img`` / ``inpaint``): the flags and the
SpeedConfig (ldm/speed.py) they build. Every default is the library's, the fastest correct one for the device."""
from __future__ import annotations

import argparse

from .convert import _choice

# ldm/speed.py's lists, written out so that --help does not import torch (tests/test_speed_switches.py checks them)
COMPILE_MODES = ("none", "default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
ATTENTION_KERNELS = ("auto", "cudnn", "flash", "efficient", "math", "fastest", "fa4")

_ON_OFF_FLAGS = (  # speed switches given as auto|on|off: flag, help (the SpeedConfig field is the flag in snake case)
    ("channels-last", "NHWC convolutions (auto: on with CUDA when compiled or with --triton-group-norm)"),
    ("triton-group-norm", "GroupNorm + SiLU of NHWC activations as two Triton kernels (auto: on with CUDA when not "
                          "compiled)"),
    ("nhwc-group-norm", "GroupNorm reduced per group over NHWC memory, for torch.compile (auto: on with CUDA when "
                        "compiled)"),
    ("fused-qkv", "one matmul for q, k, v (auto: on with CUDA)"),
    ("fused-emb", "one matmul for every ResBlock's time-embedding projection (auto: on with CUDA)"),
    ("fused-context-kv", "one matmul for every cross-attention's k, v of the text (auto: on with CUDA; acts with "
                         "--fused-qkv)"),
    ("shared-latent", "guidance hands the U-Net the latent once with every condition's text, not one copy per "
                      "condition (auto: on with CUDA)"),
    ("cuda-graphs", "replay the U-Net call from a CUDA graph (auto: on with CUDA)"),
)


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    """The U-Net's speed switches (ldm/speed.py SpeedConfig); every default is the library's, the fastest correct."""
    g = p.add_argument_group("speed (ldm/speed.py; defaults: the fastest correct ones for the device)")
    g.add_argument("--compile", action="store_true", help="torch.compile the U-Net (mode: default): ~50 s more for "
                   "the first image, ~40%% less time per step after it (default: off)")  # fmt: skip
    g.add_argument("--compile-mode", default=None, metavar="MODE",
                   help=f"torch.compile mode, implies --compile: {', '.join(COMPILE_MODES)}")
    g.add_argument("--attention-kernel", default="fastest", metavar="KERNEL",
                   help=f"SDPA kernel: {', '.join(ATTENTION_KERNELS)} (default: %(default)s = cuDNN first on CUDA; fa4 = "
                   "FlashAttention-4 for the long self-attention, needs pip install flash-attn-4)")
    for flag, what in _ON_OFF_FLAGS:
        g.add_argument(f"--{flag}", default="auto", metavar="auto|on|off", help=f"{what} (default: %(default)s)")
    g.add_argument("--conv-plans", default=None, metavar="FILE",
                   help="cuDNN convolution kernels measured for this GPU (a plans file of bench/cudnn_knobs.py "
                        "--write-plans; needs pip install nvidia-cudnn-frontend==1.16.0; CUDA only; faster only with "
                        "CUDA graphs, which are on by default; default: off)")


def speed_config(args: argparse.Namespace):
    """SpeedConfig from the speed flags; ValueError naming the flag."""
    from ldm.speed import SpeedConfig  # noqa: PLC0415

    mode = args.compile_mode if args.compile_mode is not None else ("default" if args.compile else "none")
    _choice("--compile-mode", mode, COMPILE_MODES)
    _choice("--attention-kernel", args.attention_kernel, ATTENTION_KERNELS)
    tri = {"auto": None, "on": True, "off": False}
    flags = {}
    for flag, _ in _ON_OFF_FLAGS:
        value = getattr(args, flag.replace("-", "_"))
        _choice(f"--{flag}", value, tuple(tri))
        flags[flag.replace("-", "_")] = tri[value]
    if args.conv_plans:  # the file read and checked now, before a model loads
        from ldm.conv_plans import load_plans  # noqa: PLC0415

        try:
            load_plans(args.conv_plans)
        except ValueError as e:
            raise ValueError(f"--conv-plans: {e}") from None
    try:
        return SpeedConfig(attention_kernel=args.attention_kernel, compile=mode, conv_plans=args.conv_plans, **flags)
    except ValueError as e:  # "speed.cuda_graphs: ..." -> "--cuda-graphs: ..."
        key, _, rest = str(e).partition(": ")
        flag = {"compile": "compile-mode"}.get(key.removeprefix("speed."), key.removeprefix("speed.")).replace("_", "-")
        raise ValueError(f"--{flag}: {rest}") from None
