"""EMA against diffusers' training_utils.EMAModel, step by step, and its state through safetensors."""
import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.ema import EMA


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 7), nn.SiLU(), nn.Linear(7, 3), nn.LayerNorm(3)).to(dtype)
    m[3].weight.requires_grad_(False)  # a frozen parameter: copied, not averaged
    return m


def sgd_step(model, g):
    """A deterministic 'optimizer step': every parameter moves by a fresh random amount (frozen ones too, as if
    set from outside, so that copying and averaging them differ)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# (ours, diffusers' EMAModel) pairs with the same decay rule
ALIGNED = [
    (dict(decay=0.9, warmup=True), dict(decay=0.9, use_ema_warmup=False)),  # (1 + s) / (10 + s), capped
    (dict(decay=0.99, update_after_step=3), dict(decay=0.99, update_after_step=3, use_ema_warmup=False)),
    (dict(decay=0.999, power=2 / 3), dict(decay=0.999, use_ema_warmup=True, power=2 / 3)),
    (dict(decay=0.999, power=0.75, inv_gamma=2.0, min_decay=0.5),
     dict(decay=0.999, use_ema_warmup=True, power=0.75, inv_gamma=2.0, min_decay=0.5)),
]


@pytest.mark.parametrize("ours_kw, ref_kw", ALIGNED)
def test_matches_diffusers_ema_model_step_by_step(ours_kw, ref_kw):
    model = make_model()
    ema = EMA(model, **ours_kw)
    ref = EMAModel(model.parameters(), **ref_kw)
    g = torch.Generator().manual_seed(1)
    names = [n for n, _ in model.named_parameters()]
    for step in range(1, 26):
        sgd_step(model, g)
        ema.update(model)
        ref.step(model.parameters())
        assert ema.decay_at(step) == ref.cur_decay_value  # the same float, computed the same way
        for name, s_ref in zip(names, ref.shadow_params):
            assert torch.equal(ema.shadow[name], s_ref), (step, name)  # the same expression: bit for bit
    assert ema.num_updates == 25
    assert not torch.equal(ema.shadow["0.weight"], model[0].weight)  # really an average, not a copy
    assert torch.equal(ema.shadow["3.weight"], model[3].weight)


def test_warmup_off_is_constant_decay_after_the_first_copy():
    model = make_model()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay=0.8, warmup=False)
    g = torch.Generator().manual_seed(2)
    hand = None
    for step in range(6):
        sgd_step(model, g)
        w = model[0].weight.detach()
        hand = w.clone() if step == 0 else 0.8 * hand + 0.2 * w  # the first update copies, as diffusers
        ema.update(model)
    assert not torch.equal(init["0.weight"], hand)
    torch.testing.assert_close(ema.shadow["0.weight"], hand, rtol=1e-6, atol=1e-7)


def test_shadow_is_fp32_for_half_models():
    model = make_model(dtype=torch.bfloat16)
    ema = EMA(model, decay=0.5, warmup=False)
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        sgd_step(model, g)
        ema.update(model)
    ema.copy_to(model)
    assert model[0].weight.dtype == torch.bfloat16
    assert torch.equal(model[0].weight, ema.shadow["0.weight"].to(torch.bfloat16))


def test_store_copy_restore_swaps_weights_for_validation():
    model = make_model()
    ema = EMA(model, decay=0.9)
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        sgd_step(model, g)
        ema.update(model)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.store(model)
    ema.copy_to(model)
    assert all(torch.equal(p, ema.shadow[n]) for n, p in model.named_parameters())
    assert not torch.equal(model[0].weight, live["0.weight"])
    ema.restore(model)
    assert all(torch.equal(p, live[n]) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(model)


def test_state_dict_round_trips_through_safetensors_and_weights_only(tmp_path):
    model = make_model()
    ema = EMA(model, decay=0.9, update_after_step=2)
    g = torch.Generator().manual_seed(5)
    for _ in range(7):
        sgd_step(model, g)
        ema.update(model)
    sd = ema.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    save_file(sd, tmp_path / "ema.safetensors")
    torch.save(sd, tmp_path / "ema.pt")
    for loaded in (load_file(tmp_path / "ema.safetensors"), torch.load(tmp_path / "ema.pt", weights_only=True)):
        other = EMA(make_model(seed=9), decay=0.9, update_after_step=2)
        assert not torch.equal(other.shadow["0.weight"], ema.shadow["0.weight"])
        other.load_state_dict(loaded)
        assert other.num_updates == 7
        assert all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ema.shadow)
        # and it continues exactly as the original
        sgd_step(model, torch.Generator().manual_seed(6))
        ema_next = EMA(make_model(), decay=0.9, update_after_step=2)
        ema_next.load_state_dict(sd)
        ema_next.update(model)
        other.update(model)
        assert all(torch.equal(other.shadow[n], ema_next.shadow[n]) for n in ema.shadow)


def test_bad_arguments_are_named():
    model = make_model()
    bad = [(dict(decay=1.5), "decay"), (dict(update_after_step=-1), "update_after_step"), (dict(power=0.0), "power"),
           (dict(inv_gamma=0), "inv_gamma"), (dict(min_decay=0.99999), "min_decay")]
    for kw, arg in bad:
        with pytest.raises(ValueError, match=arg):
            EMA(model, **kw)
    with pytest.raises(ValueError, match="model"):
        EMA([p for p in model.parameters()])
    ema = EMA(model)
    with pytest.raises(ValueError, match="model"):
        ema.update(nn.Linear(5, 7))
    sd = ema.state_dict()
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({k: v for k, v in sd.items() if k != "num_updates"})
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict({**sd, "shadow.0.weight": torch.zeros(2, 2)})
