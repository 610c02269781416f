"""Speed switches on a ControlNet (ldm/speed.py apply_speed, inference/pipeline.py): the same residuals as the plain
network (fp32, to rounding), none of the U-Net-only buffers, the graph runner's ControlNet signature, and the pipeline
giving its switches to every ControlNet of the model, one attached later included.

The CUDA-graph capture itself needs a GPU; bench/controlnet_speed.py checks it there against the eager network.
"""
from __future__ import annotations

import copy

import pytest
import torch

from ldm.bundle import Bundle
from ldm.conditioning import Cond
from ldm.conditions import ConditionSpec
from ldm.controlnet import ControlNet
from ldm.speed import CUDAGraphForward, SpeedConfig, _controlnet_inputs, _flatten, _unflatten, apply_speed, remove_speed
from ldm.transformer import CrossAttention
from ldm.unet import UNet, UNetConfig

from .test_conditions import _model, _randomize


def tiny_controlnet():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.sd15().tiny()).eval()
    net = ControlNet.from_unet(unet, hint_block_channels=(16, 32)).eval()  # hint factor 2
    _randomize(net, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 16, 16, generator=g)
    hint = torch.rand(2, 3, 32, 32, generator=g)
    t = torch.tensor([3.0, 731.0])
    cond = Cond(context=torch.randn(2, 7, unet.cfg.context_dim, generator=g))
    return net, x, hint, t, cond


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_fused_qkv_and_channels_last_give_the_plain_residuals():
    """fused q/k/v and channels-last memory on a ControlNet: every residual within 1e-5 of the plain network's
    (fp32: the fused matmul sums in another order); the U-Net-only fused tables are not built for it."""
    net, x, hint, t, cond = tiny_controlnet()
    plain = copy.deepcopy(net)
    applied = apply_speed(net, SpeedConfig(fused_qkv=True, channels_last=True, fused_emb=True, fused_context_kv=True))
    assert applied.fused_qkv and applied.channels_last and net.speed is applied
    assert not (applied.fused_emb or applied.fused_context_kv or applied.shared_latent)  # U-Net-only: reported off
    assert not net.emb_fused and not net.context_fused and net.context_fused_weight is None  # ControlNet reads neither
    attns = [m for m in net.modules() if isinstance(m, CrossAttention)]
    assert attns and all(m.fused and m.fused_weight is not None for m in attns)  # built at apply time
    with torch.no_grad():
        got, want = net(x, hint, t, cond, scale=0.5), plain(x, hint, t, cond, scale=0.5)
    assert len(got) == len(want) == len(net.block_shapes(2, 16, 16))
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape and rel(g_, w_) < 1e-5
    remove_speed(net)
    assert net.speed is None and "forward" not in net.__dict__
    with torch.no_grad():
        for g_, w_ in zip(net(x, hint, t, cond), plain(x, hint, t, cond)):
            assert torch.equal(g_, w_)  # undone: the plain path, bit for bit


def test_graph_runner_takes_a_controlnet_call_and_falls_back_off_cuda():
    """The runner's ControlNet signature: (x, hint, t, cond, scale) with a scalar time expanded, scale a constant of
    the signature; on the CPU it calls the network itself."""
    net, x, hint, t, cond = tiny_controlnet()
    runner = CUDAGraphForward(net.forward, inputs=_controlnet_inputs)
    with torch.no_grad():
        got, want = runner(x, hint, t, cond, scale=0.5), net(x, hint, t, cond, scale=0.5)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and not runner.graphs
    call = _controlnet_inputs(x, hint, 500.0, cond, 0.5)
    assert torch.equal(call[2], torch.full((2,), 500.0)) and call[4] == 0.5
    tensors, spec = _flatten(call)
    x2, h2, t2, c2, s2 = _unflatten(tensors, spec)
    assert x2 is x and h2 is hint and c2.context is cond.context and c2.vector is None and s2 == 0.5
    assert _flatten(_controlnet_inputs(x, hint, t, cond, 1.0))[1] != spec  # another scale, another graph


def test_pipeline_gives_its_switches_to_controlnets_attached_before_and_after():
    """Pipeline(bundle, speed) applies ``speed`` to the U-Net and to each ControlNet condition's network, and to
    one added to the bundle after the pipeline was built, at the next generation."""
    from inference.conditions import speed_controls
    from inference.pipeline import Pipeline

    b = Bundle(_model([ConditionSpec(type="controlnet", name="edges")])).eval()
    pipe = Pipeline(b, speed=SpeedConfig(fused_qkv=True))
    edges = b.conditions["edges"].net
    assert edges.speed is not None and edges.speed.fused_qkv and b.unet.speed.fused_qkv
    edges.speed = None  # as a ControlNet attached after the pipeline was built
    speed_controls(b, pipe.speed_config)  # what each pipe(...) call does first
    assert edges.speed is not None and edges.speed.fused_qkv


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_pipeline_with_a_controlnet_gives_the_latents_of_the_switches_off():
    """On CUDA, a pipeline with the default switches (the U-Net and the ControlNet replayed from CUDA graphs, fused
    q/k/v, the fastest attention chain, NHWC with the Triton GroupNorm) gives the latents of one with them off, to fp32 rounding, and the
    ControlNet's graph is the one that ran."""
    from inference.pipeline import Pipeline

    b = Bundle(_model([ConditionSpec(type="controlnet", name="edges")])).eval()
    _randomize(b, seed=3)  # every parameter, the zero convolutions too: the control acts
    b = b.to("cuda")
    fast = Pipeline(b)
    slow = Pipeline(copy.deepcopy(b), speed=SpeedConfig(attention_kernel="auto", fused_qkv=False, fused_emb=False,
                                                        fused_context_kv=False, shared_latent=False, cuda_graphs=False,
                                                        channels_last=False, triton_group_norm=False))
    f = b.config.vae.downsample_factor
    img = torch.rand(1, 3, 8 * f, 8 * f, generator=torch.Generator().manual_seed(5))  # an image tensor in [0, 1]
    kw = dict(steps=4, sampler="euler", cfg_scale=3.0, seed=0, width=8 * f, height=8 * f, conditions={"edges": img})
    got, want = fast("a", **kw).latents, slow("a", **kw).latents
    assert rel(got, want) < 1e-4  # fp32; the fused projections sum in another order
    assert b.conditions["edges"].net.forward.graphs and b.unet.forward.graphs  # captured and replayed
