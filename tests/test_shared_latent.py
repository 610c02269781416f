"""One latent under k conditions (UNet.forward with cond.context of k B rows; speed.shared_latent in guidance):
the same output as the U-Net on k copies of the latent, the layers before the first cross-attention really run
on B rows, conditions that would need their own rows are named errors, and guidance uses it only where the switch
and the network allow. Tiny random U-Nets, fp32, CPU; the reference is the U-Net on torch.cat([x] * k)."""
from __future__ import annotations

import argparse

import pytest
import torch

from inference import generate_cli
from ldm.conditioning import Cond
from ldm.denoiser import Denoiser
from ldm.guidance import cfg as cfg_guidance
from ldm.guidance import guide
from ldm.schedule import DiscreteSchedule, ScheduleConfig
from ldm.speed import SpeedConfig, apply_speed, remove_speed
from tests.test_speed_switches import rel, tiny

TOL = 1e-5  # fp32; the eager CPU path is bit for bit here, the fused / channels-last one within ~2e-6


def contexts(cond: Cond, k: int) -> torch.Tensor:
    """k blocks of B context rows: the given one, then k - 1 other random ones."""
    g = torch.Generator().manual_seed(7)
    c = cond.context
    return torch.cat([c] + [torch.randn(c.shape, generator=g) for _ in range(k - 1)])  # (k B, T, D)


def rows_seen(net) -> dict:
    """Rows of the input of conv_in and of the first self-attention, recorded by forward hooks."""
    seen = {}
    first_block = next(m for m in net.modules() if type(m).__name__ == "BasicTransformerBlock")
    for key, module in (("conv_in", net.input_blocks[0]), ("attn1", first_block.attn1), ("attn2", first_block.attn2)):

        def hook(_module, args, _out, key=key) -> None:  # None: the output is left as it is
            seen.setdefault(key, args[0].shape[0])

        module.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("name", ["sd15", "sd21"])
@pytest.mark.parametrize("batch, k", [(2, 2), (1, 3)])
def test_one_latent_under_k_conditions_is_the_unet_on_k_copies(name, batch, k):
    net, x, t, cond = tiny(name)
    x, t, ctx = x[:batch], t[:batch], contexts(Cond(context=cond.context[:batch]), k)
    with torch.no_grad():
        ref = net(torch.cat([x] * k), torch.cat([t] * k), Cond(context=ctx))  # (k B, C, H, W)
        seen = rows_seen(net)
        out = net(x, t, Cond(context=ctx))
    assert out.shape == ref.shape and rel(out, ref) < TOL
    assert seen == {"conv_in": batch, "attn1": batch, "attn2": k * batch}  # the prefix ran once, on B rows


def test_with_the_speed_switches():
    net, x, t, cond = tiny("sd15")
    ctx = contexts(cond, 2)
    with torch.no_grad():
        ref = net(torch.cat([x, x]), torch.cat([t, t]), Cond(context=ctx))
        apply_speed(net, SpeedConfig(fused_qkv=True, fused_emb=True, fused_context_kv=True, channels_last=True))
        assert rel(net(x, t, Cond(context=ctx)), ref) < TOL


@pytest.mark.parametrize("field", ["vector", "concat", "control", "adapter"])
def test_other_conditions_are_named_errors(field):
    net, x, t, cond = tiny("sd15")
    ctx = contexts(cond, 2)
    kw, adapter = {}, None
    if field == "vector":
        kw["vector"] = torch.zeros(4, 3)
    elif field == "concat":
        kw["concat"] = torch.zeros(2, 1, 16, 16)
    elif field == "control":
        kw["control"] = (torch.zeros(1),)
    else:
        adapter = [torch.zeros(1)]
    name = "adapter" if field == "adapter" else f"cond.{field}"
    with pytest.raises(ValueError, match=rf"cond\.context has 4 rows for x's 2: .*not {name}"):
        net(x, t, Cond(context=ctx, **kw), adapter)


@pytest.mark.parametrize("rows", [3, 1])
def test_other_context_batches_are_still_errors(rows):
    net, x, t, cond = tiny("sd15")
    with pytest.raises(ValueError, match=r"cond\.context: expected \(2, T, \d+\)"):
        net(x, t, Cond(context=torch.zeros(rows, 7, cond.context.shape[2])))


def denoiser_on(net) -> Denoiser:
    return Denoiser(net, DiscreteSchedule(ScheduleConfig()), "eps")


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_with_the_switch_equals_guidance_without(rescale):
    net, x, t, cond = tiny("sd15")
    uncond = Cond(context=contexts(cond, 2)[2:])
    sigma = torch.tensor([0.5, 7.0])
    den = denoiser_on(net)
    with torch.no_grad():
        ref = cfg_guidance(den, cond, uncond, 6.0, rescale)(x, sigma)
        seen = rows_seen(net)
        net.share_latent = True
        assert den.shares_latent
        out = cfg_guidance(den, cond, uncond, 6.0, rescale)(x, sigma)
    assert rel(out, ref) < TOL
    assert seen["conv_in"] == 2 and seen["attn2"] == 4  # one latent of 2 rows, two conditions


def test_guidance_keeps_copies_where_it_must():
    net, x, t, cond = tiny("sd15")
    assert not denoiser_on(net).shares_latent  # the switch is off unless apply_speed (or the user) turns it on
    net.share_latent = True
    seen = rows_seen(net)
    sigma = torch.tensor([1.0, 2.0])
    with torch.no_grad():  # a wrapper around the U-Net (as ldm/conditions/ builds): one row of x per condition row
        wrapped = denoiser_on(lambda x_, t_, c: net(x_, t_, Cond(context=c.context)))
        assert not wrapped.shares_latent
        guide(wrapped, [Cond(context=cond.context), cond], [3.0])(x, sigma)
    assert seen["conv_in"] == 4
    calls = []  # a condition with rows of its own (concat): copies of x, one per condition, even with the switch on
    spy = denoiser_on(net)
    spy.forward = lambda x_, s, c_: calls.append(x_.shape[0]) or x_
    c = Cond(context=cond.context, concat=torch.zeros(2, 1, 16, 16))
    guide(spy, [c, c], [3.0])(x, sigma)
    assert spy.shares_latent and calls == [4]


def test_switch_auto_rules_cli_and_training_config():
    from training.config import load_train_config

    assert SpeedConfig().resolve("cuda").shared_latent and not SpeedConfig().resolve("cpu").shared_latent
    assert not SpeedConfig().resolve("cuda", training=True).shared_latent
    net = tiny("sd15")[0]
    apply_speed(net, SpeedConfig(shared_latent=True))
    assert net.share_latent and denoiser_on(net).shares_latent
    remove_speed(net)
    assert not net.share_latent
    p = argparse.ArgumentParser()
    generate_cli.add_speed_arguments(p)
    assert generate_cli.speed_config(p.parse_args(["--shared-latent", "off"])) == SpeedConfig(shared_latent=False)
    with pytest.raises(ValueError, match=r"speed\.shared_latent: inference only"):
        load_train_config(None, ["speed.shared_latent=true"])
