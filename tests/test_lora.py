"""LoRA on the tiny U-Net: shapes, zero start, merge, state dicts, scale, training, and names that map to
diffusers' layout (the base for kohya / diffusers-PEFT key maps). References: hand formulas (W + s a/r up@down)
and diffusers' UNet2DConditionModel key set."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.conditioning import Cond
from ldm.denoiser import DiffusionConfig
from ldm.loss import DiffusionLoss
from ldm.lora import (
    LoRAConfig, inject_lora, load_lora, lora_parameters, lora_state_dict, merge_lora, set_lora_scale,
)
from ldm.unet import UNet
from ldm.unet_keys import ours_to_diffusers
from tests.test_unet_parity import CONFIGS, DIFFUSERS_CONFIGS, randomize_

CFG = CONFIGS["sd1"]
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def make_unet(seed=1):
    torch.manual_seed(0)
    net = UNet(CFG).eval()
    randomize_(net, seed=seed)  # the original's zero-inits would hide whole paths
    return net


def inputs(B=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 8, 8, generator=g)
    return x, torch.tensor([3.0, 731.0])[:B], Cond(context=torch.randn(B, 7, CFG.context_dim, generator=g))


def randomize_up_(model, seed=3, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_up.weight"):
                p.copy_(std * torch.randn(p.shape, generator=g))


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def attention_linears(model):
    """Independent enumeration of what the default targets must hit: q, k, v, out of every attention."""
    return sorted(
        f"{n}.{leaf}" for n, m in model.named_modules() if n.endswith(("attn1", "attn2"))
        for leaf in ("to_q", "to_k", "to_v", "to_out.0")
    )


def test_inject_wraps_the_targets_with_rank_r_and_changes_nothing_at_start():
    net = make_unet()
    x, t, c = inputs()
    with torch.no_grad():
        before = net(x, t, c)
    base_sd = {k: v for k, v in net.state_dict().items()}
    names = inject_lora(net, LoRAConfig(rank=3, alpha=6.0), generator=torch.Generator().manual_seed(0))
    assert sorted(names) == attention_linears(net)
    assert len(names) == 16 * 2 * 4  # 6 down + 1 mid + 9 up transformer blocks, attn1 + attn2
    for name in names:
        m = net.get_submodule(name)
        assert isinstance(m, nn.Linear)
        assert m.lora_down.weight.shape == (3, m.in_features) and m.lora_up.weight.shape == (m.out_features, 3)
        assert torch.count_nonzero(m.lora_up.weight) == 0 and torch.count_nonzero(m.lora_down.weight) > 0
    with torch.no_grad():
        after = net(x, t, c)
    assert torch.equal(before, after)  # up is zero: the network is exactly unchanged
    sd = net.state_dict()  # base keys and tensors unchanged; the adapters only add keys
    assert all(sd[k] is v or torch.equal(sd[k], v) for k, v in base_sd.items())
    assert set(sd) - set(base_sd) == {n + s for n in names for s in SUFFIXES[:2]}


def test_merge_equals_the_unmerged_forward_and_the_hand_formula():
    net = make_unet()
    names = inject_lora(net, LoRAConfig(rank=4, alpha=2.0))
    randomize_up_(net)
    set_lora_scale(net, 0.7)
    x, t, c = inputs()
    with torch.no_grad():
        base = net.get_submodule(names[0])
        W = base.weight.detach().clone()
        hand = W + 0.7 * (2.0 / 4) * base.lora_up.weight @ base.lora_down.weight
        unmerged = net(x, t, c)
    base_params = {n: p for n, p in net.named_parameters() if "lora_" not in n}
    assert sorted(merge_lora(net)) == sorted(names)
    assert not any(hasattr(m, "lora_up") for m in net.modules())  # wrappers gone
    assert type(net.get_submodule(names[0])) is nn.Linear
    merged_params = dict(net.named_parameters())
    assert merged_params.keys() == base_params.keys()
    assert all(merged_params[n] is p for n, p in base_params.items())  # same Parameters (optimizer state intact)
    torch.testing.assert_close(net.get_submodule(names[0]).weight, hand, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        merged = net(x, t, c)
    # fp32: (W + s up down) x and W x + s up (down x) sum in different orders; measured 2e-7 to 1.1e-6 here
    assert rel_err(merged, unmerged) < 5e-6
    assert rel_err(unmerged, make_unet()(x, t, c).detach()) > 1e-3  # the adapters did change the output


def test_lora_state_dict_round_trip_with_scale(tmp_path):
    net = make_unet()
    names = inject_lora(net, LoRAConfig(rank=2, alpha=1.0))
    randomize_up_(net)
    sd = lora_state_dict(net)
    assert set(sd) == {n + s for n in names for s in SUFFIXES}  # only LoRA keys
    assert all(float(sd[n + ".alpha"]) == 1.0 for n in names)
    save_file(sd, tmp_path / "lora.safetensors")

    fresh = make_unet()
    x, t, c = inputs()
    with torch.no_grad():
        plain = fresh(x, t, c)
        set_lora_scale(net, 0.5)
        want_half = net(x, t, c)
        set_lora_scale(net, 1.0)
        want_full = net(x, t, c)
    loaded = load_lora(fresh, load_file(tmp_path / "lora.safetensors"), scale=0.5)
    assert sorted(loaded) == sorted(names)
    with torch.no_grad():
        assert torch.equal(fresh(x, t, c), want_half)
        set_lora_scale(fresh, 1.0)
        assert torch.equal(fresh(x, t, c), want_full)
        set_lora_scale(fresh, 0.0)
        assert torch.equal(fresh(x, t, c), plain)
    # loading again into existing adapters works too; alpha defaults to rank when absent (kohya)
    no_alpha = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    load_lora(fresh, no_alpha, scale=1.0)
    m = fresh.get_submodule(names[0])
    assert m.alpha == 2.0 and m.rank == 2 and m.scale == 1.0


def test_names_map_to_the_diffusers_layout():
    """kohya SD1/SD2 and diffusers/PEFT name modules in diffusers' layout: every LoRA module name must map."""
    net = make_unet()
    names = inject_lora(net, LoRAConfig(target_modules=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")))
    ref_keys = set(UNet2DConditionModel(**DIFFUSERS_CONFIGS["sd1"]).state_dict())
    mapped = ours_to_diffusers({f"{n}.weight": torch.zeros(1) for n in names}, CFG)
    assert len(mapped) == len(names) and set(mapped) <= ref_keys
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in mapped
    kohya = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k in mapped}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in kohya


def test_conv2d_adapters_merge():
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1)
    model = nn.Sequential()
    model.add_module("proj", conv)
    names = inject_lora(model, LoRAConfig(rank=2, alpha=3.0, target_modules=("proj",)))
    m = model.proj
    assert names == ["proj"] and m.lora_down.weight.shape == (2, 6, 3, 3) and m.lora_up.weight.shape == (5, 2, 1, 1)
    x = torch.randn(2, 6, 9, 9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), nn.functional.conv2d(x, conv.weight, conv.bias, stride=2, padding=1))
        nn.init.normal_(m.lora_up.weight, std=0.3)
        unmerged = model(x)
    merge_lora(model)
    assert type(model.proj) is nn.Conv2d and model.proj.stride == (2, 2)
    with torch.no_grad():
        assert rel_err(model(x), unmerged) < 5e-6  # fp32 summation order, as above


def test_training_moves_only_the_adapters():
    net = make_unet()
    net.requires_grad_(False)
    inject_lora(net, LoRAConfig(rank=2), dtype=torch.float32)
    params = lora_parameters(net)
    assert len(params) == 2 * 128 and all(p.requires_grad for p in params)
    x, _, c = inputs()
    out = DiffusionLoss(net, DiffusionConfig(prediction="v"))(x, c, torch.Generator().manual_seed(0))
    out.loss.backward()
    ups = [p for n, p in net.named_parameters() if n.endswith("lora_up.weight")]
    downs = [p for n, p in net.named_parameters() if n.endswith("lora_down.weight")]
    assert all(p.grad is not None for p in params)
    assert all(torch.count_nonzero(p.grad) == 0 for p in downs)  # d/d down is up^T (...) = 0 at the start
    assert sum(torch.count_nonzero(p.grad) for p in ups) > 0
    assert all(p.grad is None for n, p in net.named_parameters() if "lora_" not in n)


def test_dropout_acts_in_training_only():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin)
    inject_lora(model, LoRAConfig(target_modules=("0",), dropout=0.5))
    nn.init.normal_(model[0].lora_up.weight)
    x = torch.randn(4, 8)
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        b = model(x)
        model.eval()
        m = model[0]
        want = lin.weight @ x.T
        want = (want.T + lin.bias) + m.multiplier * m.lora_up(m.lora_down(x))
        assert not torch.equal(a, b)
        torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_named():
    for kw, arg in ((dict(rank=0), "lora.rank"), (dict(alpha=0.0), "lora.alpha"), (dict(dropout=1.0), "lora.dropout"),
                    (dict(target_modules=()), "lora.target_modules")):
        with pytest.raises(ValueError, match=arg):
            LoRAConfig(**kw)
    net = make_unet()
    with pytest.raises(ValueError, match="target_modules"):
        inject_lora(net, LoRAConfig(target_modules=("nothing_here",)))
    with pytest.raises(ValueError, match="only nn.Linear"):
        inject_lora(net, LoRAConfig(target_modules=("to_q", "attn1")))
    assert not any(hasattr(m, "lora_up") for m in net.modules())  # a bad target leaves the model untouched
    names = inject_lora(net, LoRAConfig())
    with pytest.raises(ValueError, match="already"):
        inject_lora(net, LoRAConfig())
    sd = lora_state_dict(net)
    with pytest.raises(ValueError, match="no module"):
        load_lora(make_unet(), {"nope.lora_down.weight": sd[f"{names[0]}.lora_down.weight"],
                                "nope.lora_up.weight": sd[f"{names[0]}.lora_up.weight"]})
    with pytest.raises(ValueError, match="shape"):
        load_lora(make_unet(), {f"{names[0]}.lora_down.weight": torch.zeros(4, 3),
                                f"{names[0]}.lora_up.weight": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="not a LoRA key"):
        load_lora(make_unet(), {"input_blocks.0.0.weight": torch.zeros(1)})
