"""ldm/group_norm_triton.py: the two Triton kernels compute F.group_norm (+ SiLU) of channels-last input, checked
against fp64 in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set before the kernels are defined, so in a
subprocess); the switch swaps exactly the norms and the SiLUs it takes over, and back, bit for bit; the speed
defaults; the training config refuses it."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ldm.group_norm_triton as T
from ldm.conditioning import Cond
from ldm.norms import LowPrecisionGroupNorm
from ldm.speed import SpeedConfig, apply_speed, remove_speed
from ldm.unet import UNet, UNetConfig
from ldm.unet_blocks import ResBlock

from .fakes import run_interpreted


def _interpreter_runs_loops() -> bool:
    """Triton 3.6's interpreter turns a runtime loop bound into int() of a 1-element numpy array, which NumPy 2
    refuses (the apply kernel loops over chunks up to S); Triton 3.7 and later pass 0-d arrays."""
    from importlib.metadata import version

    return tuple(int(p) for p in version("triton").split(".")[:2]) >= (3, 7)


INTERPRETED = pytest.mark.skipif(not T.TRITON or not _interpreter_runs_loops(),
                                 reason="needs Triton >= 3.7 (its interpreter runs the kernels on the CPU)")  # fmt: skip


@INTERPRETED
def test_kernels_match_fp64_group_norm_in_the_interpreter():
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        import ldm.group_norm_triton as T
        # (B, C, H, W), groups: SD's 10 channels per group (12 groups a tile, the last tile partial) over 4 chunks;
        # 30 per group; a last chunk of 16 rows; one group; odd sizes; 2 channels per group (32 groups a tile);
        # 146 chunks, the last of 32 rows: each apply program takes 2 row tiles (> 128 chunks)
        cases = [((2, 320, 16, 16), 32), ((1, 960, 8, 8), 32), ((3, 24, 9, 16), 4), ((2, 48, 5, 7), 1),
                 ((2, 64, 8, 8), 32), ((1, 8, 97, 96), 4)]
        assert T._plan(320, 32, 256)[0] == 12 and T._plan(24, 4, 144)[4] == 64  # the cases take those paths
        assert T._plan(8, 4, 97 * 96)[4] == 64 and -(-97 * 96 // 64) == 146 > T._MAX_ROW_PROGRAMS
        for shape, g in cases:
            b, c, h, w = shape
            gen = torch.Generator().manual_seed(c)
            x = torch.randn(shape, generator=gen) * torch.linspace(0.5, 3, c).view(1, c, 1, 1)
            x = (x + torch.linspace(-2, 4, c).view(1, c, 1, 1)).contiguous(memory_format=torch.channels_last)
            wt, bs = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
            for silu in (False, True):
                for affine in (True, False):
                    args = (wt, bs) if affine else (None, None)
                    y = T.group_norm_silu_triton(x, g, *args, 1e-5, silu)
                    ref = F.group_norm(x.double(), g, *(a.double() if a is not None else None for a in args), 1e-5)
                    ref = F.silu(ref) if silu else ref
                    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == x.dtype
                    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                    assert err < 1e-6, (shape, g, silu, affine, err)  # fp32 math; measured 1e-7 - 3e-7
            # bf16: the fp32 result rounded once, as the reference; 1 ulp apart where rounding ties differ
            xb, wb, bb = x.bfloat16(), wt.bfloat16(), bs.bfloat16()
            got = T.group_norm_silu_triton(xb, g, wb, bb, 1e-5, True).float()
            ref = T.group_norm_silu_reference(xb, g, wb, bb, 1e-5, True).float()
            assert ((got - ref).abs() <= 2 ** -7 * ref.abs().clamp_min(1.0)).all(), shape
        print("ok")
    """)
    run_interpreted(script)


@INTERPRETED
def test_switched_unet_runs_the_kernels_and_matches_in_the_interpreter():
    """A tiny U-Net, channels-last, every norm through the kernels (its CPU gate opened), against the plain U-Net:
    fp32 to 1e-5 (the kernels' fp32 sums differ from PyTorch's in the last bits, which the later layers carry)."""
    script = textwrap.dedent("""
        import copy, torch
        import ldm.group_norm_triton as T
        from ldm.conditioning import Cond
        from ldm.unet import UNet, UNetConfig
        calls = []
        T.runs_kernel = lambda x, w: calls.append(1) or (x.dim() == 4 and not torch.is_grad_enabled()
                                                         and x.is_contiguous(memory_format=torch.channels_last))
        torch.manual_seed(0)
        u = UNet(UNetConfig.sd15().tiny()).eval()
        for p in u.parameters():
            p.data.normal_(0, 0.2)
        v = copy.deepcopy(u)
        n = T.set_triton_group_norm(v, True)
        v = v.to(memory_format=torch.channels_last)
        x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([500, 20]), Cond(context=torch.randn(2, 7, 24))
        with torch.no_grad():
            a = u(x, t, cond)
            b = v(x.contiguous(memory_format=torch.channels_last), t, cond)
        err = ((a - b).abs().max() / a.abs().max()).item()
        assert len(calls) == n and err < 1e-5, (len(calls), n, err)
        print("ok")
    """)
    run_interpreted(script)


@INTERPRETED
def test_pipeline_with_a_controlnet_runs_the_kernels_and_matches_in_the_interpreter():
    """The switches as a CUDA pipeline gets them by default (NHWC, the Triton GroupNorm), on the U-Net and its
    ControlNet, kernels run by the interpreter: the latents of the plain pipeline, fp32 to 1e-5, with every norm of
    both networks through the kernels at every step."""
    script = textwrap.dedent("""
        import copy, torch
        import ldm.group_norm_triton as T
        calls = []
        T.runs_kernel = lambda x, w: calls.append(1) or (x.dim() == 4 and not torch.is_grad_enabled()
                                                         and x.is_contiguous(memory_format=torch.channels_last))
        from inference.pipeline import Pipeline
        from ldm.bundle import Bundle
        from ldm.conditions import ConditionSpec
        from ldm.speed import SpeedConfig
        from tests.test_conditions import _model, _randomize
        b = Bundle(_model([ConditionSpec(type="controlnet", name="edges")])).eval()
        _randomize(b, seed=3)  # the zero convolutions too: the control acts
        slow = Pipeline(copy.deepcopy(b), speed=SpeedConfig())  # the CPU defaults: plain
        fast = Pipeline(b, speed=SpeedConfig(channels_last=True, triton_group_norm=True))
        norms = sum(type(m) is T.TritonGroupNorm for m in b.modules())
        assert norms > sum(type(m) is T.TritonGroupNorm for m in b.unet.modules()) > 0  # the ControlNet's too
        f = b.config.vae.downsample_factor
        img = torch.rand(1, 3, 8 * f, 8 * f, generator=torch.Generator().manual_seed(5))
        kw = dict(steps=3, sampler="euler", cfg_scale=3.0, seed=0, width=8 * f, height=8 * f,
                  conditions={"edges": img})
        want = slow("a", **kw).latents
        calls.clear()
        got = fast("a", **kw).latents
        err = float((got - want).abs().max() / want.abs().max())
        assert len(calls) == 3 * norms and err < 1e-5, (len(calls), norms, err)  # one CFG call per step
        print("ok")
    """)
    run_interpreted(script)


def _tiny_unet(**kw) -> UNet:
    torch.manual_seed(0)
    u = UNet(UNetConfig.sd15().tiny(**kw)).eval()
    for p in u.parameters():
        p.data.normal_(0, 0.2)
    return u


def test_switch_takes_over_the_silus_and_gives_them_back():
    u = _tiny_unet()
    keys = list(u.state_dict())
    norms = [m for m in u.modules() if isinstance(m, nn.GroupNorm)]
    silus = sum(isinstance(m, nn.SiLU) for m in u.modules())
    assert T.set_triton_group_norm(u) == len(norms) and all(type(m) is T.TritonGroupNorm for m in norms)
    fused = sum(m.fused_silu for m in norms)
    # ResBlocks' in_layers and out_layers and the U-Net's out: GroupNorm -> SiLU; transformers' norms stand alone
    assert fused == 2 * sum(isinstance(m, ResBlock) for m in u.modules()) + 1
    assert sum(isinstance(m, nn.SiLU) for m in u.modules()) == silus - fused
    assert list(u.state_dict()) == keys
    assert T.set_triton_group_norm(u, False) == len(norms)
    assert all(type(m) is nn.GroupNorm and "fused_silu" not in m.__dict__ for m in norms)
    assert sum(isinstance(m, nn.SiLU) for m in u.modules()) == silus


def test_scale_shift_resblock_keeps_its_silu_and_the_low_precision_class_comes_back():
    block = ResBlock(32, 16, 64, use_scale_shift_norm=True).eval()
    block.in_layers[0].__class__ = LowPrecisionGroupNorm
    T.set_triton_group_norm(block)
    assert block.in_layers[0].fused_silu and type(block.in_layers[1]) is nn.Identity
    assert not block.out_layers[0].fused_silu and type(block.out_layers[1]) is nn.SiLU  # scale, shift come between
    T.set_triton_group_norm(block, False)
    assert type(block.in_layers[0]) is LowPrecisionGroupNorm and type(block.out_layers[0]) is nn.GroupNorm
    assert type(block.in_layers[1]) is nn.SiLU


def test_off_cuda_it_is_the_plain_norm_and_silu_bit_for_bit():
    u = _tiny_unet()
    x = torch.randn(2, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    t, cond = torch.tensor([500, 20]), Cond(context=torch.randn(2, 7, 24))
    with torch.no_grad():
        want = u(x, t, cond)
        T.set_triton_group_norm(u)
        assert torch.equal(u(x, t, cond), want)
    assert not T.runs_kernel(x, None)  # the CPU
    m = T.TritonGroupNorm(4, 8)
    m.fused_silu = True
    y = torch.randn(2, 8, 3, 3)
    assert torch.equal(m(y), F.silu(F.group_norm(y, 4, m.weight, m.bias, m.eps)))


def test_speed_switch_and_its_defaults():
    assert SpeedConfig().resolve("cuda").triton_group_norm == T.TRITON  # eager CUDA inference
    assert not SpeedConfig(compile="default").resolve("cuda").triton_group_norm  # Inductor's norms measured faster
    assert not SpeedConfig().resolve("cuda", training=True).triton_group_norm
    assert not SpeedConfig().resolve("cpu").triton_group_norm
    with pytest.raises(ValueError, match=r"speed\.triton_group_norm"):
        SpeedConfig(triton_group_norm="yes")
    u = _tiny_unet()
    x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([500, 20]), Cond(context=torch.randn(2, 7, 24))
    with torch.no_grad():
        want = u(x, t, cond)
        applied = apply_speed(u, SpeedConfig(triton_group_norm=True, channels_last=True))
        assert applied.triton_group_norm and any(type(m) is T.TritonGroupNorm for m in u.modules())
        torch.testing.assert_close(u(x, t, cond), want, rtol=1e-5, atol=1e-5)  # NHWC convolutions on the CPU
        remove_speed(u)
        assert not any(type(m) is T.TritonGroupNorm for m in u.modules())
        assert torch.equal(u(x, t, cond), want)


def test_the_cli_builds_it():  # the training config's refusal: tests/test_speed_switches.py
    import argparse

    from inference import speed_cli

    p = argparse.ArgumentParser()
    speed_cli.add_speed_arguments(p)
    assert speed_cli.speed_config(p.parse_args(["--triton-group-norm", "off"])).triton_group_norm is False
    with pytest.raises(ValueError, match="--triton-group-norm"):
        speed_cli.speed_config(p.parse_args(["--triton-group-norm", "maybe"]))


@pytest.mark.skipif(not T.TRITON, reason="needs Triton")
@pytest.mark.parametrize("ones", [(), ("HW",), ("HW", "S", "PER", "G")])
def test_kernels_compile_for_hopper_when_integer_arguments_are_one(ones):
    """Triton passes an integer argument equal to 1 as a constant (a 1x1 feature map: H * W = 1), so the kernels
    must compile with those as Python ints; compiled here for sm_90 without a GPU (Triton's own ptxas). A 1x1 map
    once failed on the H200 with "'int' object has no attribute 'to'"."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    meta = {"CPG": 2, "K": 32, "KP": 32, "CHUNK": 64}
    for kernel, types, extra in (
        (T._stats_kernel(), ["*bf16", "*fp32", "*fp32", "i32", "i32", "i32", "i32"], {"CP": 2}),
        (T._apply_kernel(), ["*bf16", "*fp32", "*fp32", "*bf16", "*bf16", "*bf16", "i32", "i32", "i32", "i32", "i32",
                             "fp32"], {"HAS_W": True, "HAS_B": True, "SILU": True, "BLOCK_S": 16, "LANES": 64})):
        names = kernel.arg_names
        consts = {**meta, **extra, **{n: 1 for n in ones if n in names}}
        signature = {n: "constexpr" if n in consts else types[i] for i, n in enumerate(names)}
        src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in consts.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32))


@pytest.mark.skipif(not torch.cuda.is_available() or not T.TRITON, reason="the compiled kernels need a CUDA GPU")
def test_cuda_kernels_match_the_reference():
    # 1x1: Triton passes an integer argument equal to 1 as a constant (H * W here), which the kernel must accept
    for c, side in ((320, 64), (640, 32), (2560, 8), (64, 1)):
        x = torch.randn(2, c, side, side, device="cuda").contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
        got = T.group_norm_silu_triton(x, 32, w, b, 1e-5, True).double()
        ref = F.silu(F.group_norm(x.double(), 32, w.double(), b.double(), 1e-5))
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-6
