"""The condition registry (ldm/conditions/): from dataset column to U-Net to guidance.

Independent references: the U-Net called with hand-built Cond fields (one-hot labels by hand, channels
concatenated by hand, ControlNet residuals from ldm.controlnet directly), InstructPix2Pix's guidance formula from
three separate denoiser calls, and the weights of a frozen base compared bit for bit before and after training.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import autoencoder  # noqa: F401
import text_encoder  # noqa: F401
from ldm.bundle import Bundle, load_bundle, save_bundle
from ldm.conditioning import Cond
from ldm.conditions import (REGISTRY, ConditionedUNet, ConditionSpec, ConditionStack, Env, guided_branches,
                            member_widths)  # fmt: skip
from ldm.controlnet import control_active
from ldm.guidance import guide
from ldm.model_config import ModelConfig

from .test_train_smoke import tiny_config

B, H, W = 2, 8, 8


def _model(specs):
    return ModelConfig.tiny("sd1").with_conditions(specs)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    f = cfg.vae.downsample_factor
    x = torch.randn(B, 4, H, W, generator=g)
    t = torch.tensor([10.0, 700.0])
    ctx = torch.randn(B, 77, cfg.unet.context_dim, generator=g)
    img = torch.rand(B, 3, H * f, W * f, generator=g) * 2 - 1
    return x, t, ctx, img


# ------------------------------------------------------------------------------------------- registry


def test_registry_lists_the_builtin_types():
    assert {"class_label", "scalars", "image_concat", "controlnet", "t2i_adapter"} <= set(REGISTRY)


@pytest.mark.parametrize("entry, match", [
    ({"type": "nope"}, r"conditions\[nope\]\.type: unknown condition type 'nope'; registered: .*class_label"),
    ({"type": "class_label", "args": {"classes": 3}}, r"conditions\[class_label\]\.args\.classes: not a setting"),
    ({"type": "class_label", "args": {"num_classes": 0}}, r"conditions\[class_label\]\.args: num_classes"),
    ({"type": "class_label", "drop": 1.5}, r"conditions\[class_label\]\.drop: a probability"),
    ({"type": "controlnet", "start": 0.6, "end": 0.5}, r"conditions\[controlnet\]\.start, end"),
    ({"type": "no.such.module:Thing"}, r"cannot import 'no\.such\.module'"),
])  # fmt: skip
def test_bad_condition_entries_name_the_entry(tmp_path, entry, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(tmp_path, f"conditions=[{json.dumps(entry)}]")


def test_duplicate_names_and_columns_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"two conditions with the name 'class_label'"):
        tiny_config(tmp_path, "conditions=[{type: class_label}, {type: class_label}]")
    with pytest.raises(ValueError, match=r"column 'x' is read by two conditions"):
        tiny_config(tmp_path, "conditions=[{type: class_label, column: x}, {type: scalars, column: x}]")


def test_unet_widths_are_derived_from_the_conditions():
    base = ModelConfig.tiny("sd1")
    specs = [ConditionSpec(type="class_label", args={"num_classes": 5}),
             ConditionSpec(type="scalars", args={"count": 2, "embed_dim": 8}),
             ConditionSpec(type="image_concat", name="low", args={"channels": 1}),
             ConditionSpec(type="image_concat", name="lat", args={"encode": "vae"}),
             ConditionSpec(type="controlnet", name="edges")]  # fmt: skip
    m = base.with_conditions(specs)
    assert m.unet.adm_in_channels == 5 + 2 * 8
    assert m.unet.in_channels == base.unet.in_channels + 1 + base.vae.latent_channels
    assert m.unet.context_dim == base.unet.context_dim
    with pytest.raises(ValueError, match=r"unet\.in_channels: 4 < vae\.latent_channels \(4\) \+ 1 channels"):
        dataclasses.replace(m, unet=base.unet, conditions=specs[2:3])


# ------------------------------------------------------------------------- what enters the U-Net


def test_class_label_scalars_and_concat_enter_as_built_by_hand():
    specs = [ConditionSpec(type="class_label", args={"num_classes": 5}),
             ConditionSpec(type="scalars", args={"count": 1, "embed_dim": 8}),
             ConditionSpec(type="image_concat", name="low", args={"channels": 1})]  # fmt: skip
    cfg = _model(specs)
    torch.manual_seed(0)
    b = Bundle(cfg)
    _randomize(b.unet)
    x, t, ctx, img = _inputs(cfg)
    extra = b.conditions.prepare({"class_label": [1, 3], "scalars": [0.25, 2.0], "low": img}, Env((H, W)), B)
    out = b.network()(x, t, Cond(context=ctx, extra=extra))

    from ldm.unet_blocks import timestep_embedding

    onehot = torch.zeros(B, 5)
    onehot[0, 1] = onehot[1, 3] = 1
    vec = torch.cat([onehot, timestep_embedding(torch.tensor([0.25, 2.0]), 8)], dim=1)
    low = img.mean(dim=1, keepdim=True).reshape(B, 1, H, 4, W, 4).mean(dim=(3, 5))  # area average by hand
    ref = b.unet(x, t, Cond(context=ctx, vector=vec, concat=low))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_a_dropped_condition_is_its_null_and_equals_leaving_it_out():
    specs = [ConditionSpec(type="class_label", args={"num_classes": 5}),
             ConditionSpec(type="image_concat", name="low", args={"channels": 3})]  # fmt: skip
    cfg = _model(specs)
    b = Bundle(cfg)
    _randomize(b.unet)
    x, t, ctx, img = _inputs(cfg)
    keep = {"class_label": torch.tensor([True, False]), "low": torch.tensor([False, True])}
    extra = b.conditions.prepare({"class_label": [1, 3], "low": img}, Env((H, W)), B, keep)
    out = b.network()(x, t, Cond(context=ctx, extra=extra))
    onehot = torch.tensor([[0.0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])  # row 1 dropped: the zero vector
    low = F.interpolate(img, size=(H, W), mode="area")
    low[0] = 0  # row 0 dropped
    ref = b.unet(x, t, Cond(context=ctx, vector=onehot, concat=low))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    absent = b.network()(x, t, Cond(context=ctx))  # nothing given: every condition's null
    ref0 = b.unet(x, t, Cond(context=ctx, vector=torch.zeros(B, 5), concat=torch.zeros(B, 3, H, W)))
    torch.testing.assert_close(absent, ref0, rtol=1e-5, atol=1e-6)


def test_controlnet_condition_equals_the_controlnet_network_and_starts_as_a_no_op():
    specs = [ConditionSpec(type="controlnet", name="edges", weight=0.7, args={"hint_channels": 1})]
    cfg = _model(specs)
    b = Bundle(cfg)
    _randomize(b.unet)
    b.conditions.init_from_unet(b.unet)
    x, t, ctx, img = _inputs(cfg)
    extra = b.conditions.prepare({"edges": img}, Env((H, W)), B)
    net = b.network()
    # fresh from the U-Net: zero convolutions, so exactly the base model
    torch.testing.assert_close(net(x, t, Cond(context=ctx, extra=extra)), b.unet(x, t, Cond(context=ctx)), rtol=0, atol=0)
    _randomize(b.conditions, seed=3)
    cn = b.conditions["edges"].net
    hint = ((img + 1) / 2).mean(dim=1, keepdim=True)  # [0, 1], grey
    residuals = cn(x, hint, t, Cond(context=ctx), scale=0.7)
    ref = b.unet(x, t, Cond(context=ctx, control=residuals))
    torch.testing.assert_close(net(x, t, Cond(context=ctx, extra=extra)), ref, rtol=1e-5, atol=1e-6)


def test_two_controls_add_up_with_their_weights():
    specs = [ConditionSpec(type="controlnet", name="a", weight=0.5), ConditionSpec(type="controlnet", name="b", weight=2.0)]
    cfg = _model(specs)
    b = Bundle(cfg)
    _randomize(b)
    x, t, ctx, img = _inputs(cfg)
    img2 = img.flip(-1)
    extra = b.conditions.prepare({"a": img, "b": img2}, Env((H, W)), B)
    out = b.network()(x, t, Cond(context=ctx, extra=extra))
    ra = b.conditions["a"].net(x, (img + 1) / 2, t, Cond(context=ctx), scale=0.5)
    rb = b.conditions["b"].net(x, (img2 + 1) / 2, t, Cond(context=ctx), scale=2.0)
    ref = b.unet(x, t, Cond(context=ctx, control=tuple(p + q for p, q in zip(ra, rb))))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_t2i_adapter_condition_equals_the_adapter_network():
    specs = [ConditionSpec(type="t2i_adapter", name="sketch", weight=0.8, args={"hint_channels": 1})]
    cfg = _model(specs)
    b = Bundle(cfg)
    _randomize(b)
    x, t, ctx, img = _inputs(cfg)
    extra = b.conditions.prepare({"sketch": img}, Env((H, W)), B)
    hint = ((img + 1) / 2).mean(dim=1, keepdim=True)
    feats = b.conditions["sketch"].net(hint, scale=0.8)
    ref = b.unet(x, t, Cond(context=ctx), adapter=feats)
    torch.testing.assert_close(b.network()(x, t, Cond(context=ctx, extra=extra)), ref, rtol=1e-5, atol=1e-6)


def test_t2i_adapter_features_are_computed_once_per_hint():
    """The adapter's features depend on the hint alone: without gradients a sampling run's steps (the same hint
    tensor each time) reuse them, bit for bit what a fresh computation gives; a new hint, an in-place change of it,
    an in-place weight change, or gradients compute them again."""
    specs = [ConditionSpec(type="t2i_adapter", name="sketch", args={"hint_channels": 1})]
    cfg = _model(specs)
    b = Bundle(cfg)
    _randomize(b)
    x, t, ctx, img = _inputs(cfg)
    extra = b.conditions.prepare({"sketch": img}, Env((H, W)), B)
    c = b.conditions["sketch"]
    calls = []
    c.net.register_forward_hook(lambda *a: calls.append(1))
    net = b.network()
    cond = Cond(context=ctx, extra=extra)
    with torch.no_grad():
        first = net(x, t, cond)
        for _ in range(3):  # later steps: other latents and times, the same hint
            assert torch.equal(net(x * 0.5, t + 1, cond), net(x * 0.5, t + 1, Cond(context=ctx, extra=dict(extra))))
        assert len(calls) == 1
        fresh = b.conditions.prepare({"sketch": img}, Env((H, W)), B)  # a new hint tensor with the same values
        assert torch.equal(net(x, t, Cond(context=ctx, extra=fresh)), first) and len(calls) == 2
        fresh["sketch"].mul_(0.5)  # changed in place
        changed = net(x, t, Cond(context=ctx, extra=fresh))
        assert len(calls) == 3 and not torch.equal(changed, first)
        next(c.net.parameters()).mul_(2.0)  # a weight changed in place
        net(x, t, Cond(context=ctx, extra=fresh))
        assert len(calls) == 4
    net(x, t, Cond(context=ctx, extra=fresh))
    net(x, t, Cond(context=ctx, extra=fresh))
    assert len(calls) == 6  # with gradients: every call


def test_wrong_control_image_size_names_the_condition():
    cfg = _model([ConditionSpec(type="controlnet", name="edges")])
    b = Bundle(cfg)
    with pytest.raises(ValueError, match=r"conditions\[edges\]: the control image is 16x16, the generated image is 32x32"):
        b.conditions.prepare({"edges": torch.zeros(1, 3, 16, 16)}, Env((8, 8)), 1)
    with pytest.raises(ValueError, match=r"conditions\[edges\]: expected images as a float tensor \(B, 3, H, W\)"):
        b.conditions.prepare({"edges": torch.zeros(1, 1, 32, 32)}, Env((8, 8)), 1)
    with pytest.raises(ValueError, match=r"unknown condition 'edge'; this model has: edges"):
        b.conditions.prepare({"edge": torch.zeros(1, 3, 32, 32)}, Env((8, 8)), 1)


# ---------------------------------------------------------------------------------------- guidance


def test_per_condition_guidance_is_instructpix2pix():
    """e(0,0) + s_I (e(I,0) - e(0,0)) + s_T (e(I,T) - e(I,0)) (Brooks et al. 2023, eq. 3), from separate calls."""
    cfg = _model([ConditionSpec(type="image_concat", name="image", args={"encode": "resize"})])
    b = Bundle(cfg)
    _randomize(b.unet)
    den = b.denoiser()
    x, _, ctx, img = _inputs(cfg)
    neg = torch.randn_like(ctx)
    extra = b.conditions.prepare({"image": img}, Env((H, W)), B)
    cond, uncond = Cond(context=ctx, extra=extra), Cond(context=neg, extra=extra)
    conds, scales = guided_branches(cond, uncond, ["image"], [1.5], 7.0)
    sigma = torch.tensor([3.0, 3.0])
    got = guide(den, conds, scales, chain=True)(x, sigma)
    off = {"image": img, "image.keep": torch.zeros(B)}
    e00 = den(x, sigma, Cond(context=neg, extra=b.conditions.prepare({"image": img}, Env((H, W)), B, {"image": torch.zeros(B, dtype=torch.bool)})))
    eI0 = den(x, sigma, Cond(context=neg, extra=extra))
    eIT = den(x, sigma, Cond(context=ctx, extra=extra))
    assert set(off) == set(extra)
    torch.testing.assert_close(got, e00 + 1.5 * (eI0 - e00) + 7.0 * (eIT - eI0), rtol=1e-5, atol=1e-5)


def test_control_windows_follow_diffusers_step_rule():
    """A control with range (0, 0.5) of 10 Euler steps acts at steps 0-4 only (control_active)."""
    from inference.pipeline import Pipeline

    cfg = _model([ConditionSpec(type="controlnet", name="edges")])
    b = Bundle(cfg).eval()
    calls = []
    net = b.conditions["edges"]
    orig = net.control

    def spy(x, t, cond, hint):
        calls.append(float(t[0]))
        return orig(x, t, cond, hint)

    net.control = spy
    pipe = Pipeline(b)
    f = cfg.vae.downsample_factor
    img = torch.zeros(1, 3, 8 * f, 8 * f)
    pipe("a", steps=10, sampler="euler", cfg_scale=1.0, seed=0, width=8 * f, height=8 * f,
         conditions={"edges": img}, condition_ranges={"edges": (0.0, 0.5)})  # fmt: skip
    assert len(calls) == sum(control_active(i, 10, 0.0, 0.5) for i in range(10)) == 5
    assert calls == sorted(calls, reverse=True)  # the first (noisiest) steps


# ------------------------------------------------------------------------------------- saving


def test_conditions_round_trip_in_the_ldm_format_and_other_formats_refuse(tmp_path):
    cfg = _model([ConditionSpec(type="controlnet", name="edges", args={"hint_channels": 1}),
                  ConditionSpec(type="class_label", drop=0.3, args={"num_classes": 4})])  # fmt: skip
    b = Bundle(cfg)
    _randomize(b)
    save_bundle(b, tmp_path / "m")
    back = load_bundle(tmp_path / "m")
    assert back.config.conditions == cfg.conditions
    sa, sb = b.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match=r"format: 'original' has no place for this model's conditions \(edges, class_label\)"):
        save_bundle(b, tmp_path / "x.safetensors", format="original")


# -------------------------------------------------------------------------------------- training


def test_controlnet_trains_on_a_frozen_base_from_the_mask_column(tmp_path):
    """train_unet=false: the base U-Net, VAE and text come out bit for bit as they went in; the ControlNet moved."""
    cfg0 = tiny_config(tmp_path / "base", "max_steps=1")
    from training.train import train

    train(cfg0)
    cfg = tiny_config(tmp_path / "cn", f"model.source={tmp_path / 'base' / 'model'}", "model.overrides=[]",
                      "shapes.control_maps=[mask]", "train_unet=false", "max_steps=3",
                      "conditions=[{type: controlnet, name: mask, column: mask, drop: 0.5, args: {hint_channels: 1}}]")  # fmt: skip
    train(cfg)
    base, out = load_bundle(tmp_path / "base" / "model"), load_bundle(tmp_path / "cn" / "model")
    for part in ("unet", "vae", "text"):
        a, o = getattr(base, part).state_dict(), getattr(out, part).state_dict()
        assert all(torch.equal(a[k], o[k]) for k in a), part
    fresh = ConditionStack(out.config.conditions, out.config)
    fresh.init_from_unet(base.unet)
    moved = [k for k, v in fresh.state_dict().items() if not torch.equal(v, out.conditions.state_dict()[k])]
    assert moved, "the ControlNet did not train"


def test_missing_condition_column_fails_before_the_model_is_built(tmp_path, monkeypatch):
    import training.train as train_mod

    monkeypatch.setattr(train_mod, "build_bundle", lambda cfg: pytest.fail("the model was built"))
    cfg = tiny_config(tmp_path, "conditions=[{type: controlnet, name: edges, column: edge_map}]")
    with pytest.raises(ValueError, match=r"conditions\[edges\]\.column: no column 'edge_map' in 'shapes'; available columns: image, text"):
        train_mod.train(cfg)


def test_aligned_image_columns_are_cropped_and_flipped_with_the_image(tmp_path):
    """Random crop + flip: the mask column gets exactly the image's resize, crop and flip, redone here with PIL from
    the crop offset and flip the batch records for the image."""
    import numpy as np
    from PIL import Image

    from ldm.shapes import ShapesConfig, shapes_row
    from training.collate import collate_rows
    from training.condition_setup import with_condition_columns
    from training.datasets_io import ImageCaptionDataset
    from training.images import RESAMPLE
    from training.train_data import open_train_dataset

    cfg = tiny_config(tmp_path, "shapes.control_maps=[mask]", "shapes.image_size=24", "data.resolution=[16,12]",
                      "data.crop=random", "data.random_flip=0.5", "conditions=[{type: controlnet, name: mask, column: mask}]")  # fmt: skip
    cfg = with_condition_columns(cfg)
    rows = ImageCaptionDataset(open_train_dataset(cfg), cfg.data, train=True)
    batch = collate_rows([rows[i] for i in range(8)])
    assert batch["flipped"].any() and not batch["flipped"].all()
    assert len({int(c[1]) for c in batch["crop_coords"]}) > 1  # several crop offsets
    scfg = cfg.shapes_config()
    for i in range(8):
        mask = shapes_row(i, scfg)["mask"].convert("RGB").resize((16, 16), RESAMPLE)
        top, left = (int(v) for v in batch["crop_coords"][i])
        flipped = bool(batch["flipped"][i])
        left0 = 16 - 12 - left if flipped else left  # the offset is recorded in the flipped frame
        ref = mask.crop((left0, top, left0 + 12, top + 16))
        if flipped:
            ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        want = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(batch["mask"][i], want), i
    assert isinstance(scfg, ShapesConfig)


# ---------------------------------------------------------------------------- the worked example


def test_the_worked_example_trains_and_samples_without_touching_the_unet(tmp_path):
    """docs/conditions.md: tests/condition_example.py (one file) + one YAML entry."""
    from inference.pipeline import Pipeline
    from training.train import train

    entry = "conditions=[{type: 'tests.condition_example:Position', name: position, column: objects, drop: 0.1}]"
    cfg = tiny_config(tmp_path, entry, "max_steps=3", "ema=null")
    torch.manual_seed(cfg.seed)
    train(cfg)
    out = load_bundle(tmp_path / "model")
    assert out.config.unet.adm_in_channels == 32 and out.config.conditions[0].type == "tests.condition_example:Position"
    before = tiny_config(tmp_path / "b", entry)
    from training.train import build_bundle

    init = build_bundle(before).conditions["position"].mlp.state_dict()
    assert any(not torch.equal(v, out.conditions["position"].mlp.state_dict()[k]) for k, v in init.items())
    pipe = Pipeline(out)
    r1 = pipe("a red circle", steps=3, seed=0, conditions={"position": [0.2, 0.7]}, cfg_scale=1.0)
    r2 = pipe("a red circle", steps=3, seed=0, conditions={"position": [0.8, 0.1]}, cfg_scale=1.0)
    assert r1.images[0].size == r2.images[0].size and not torch.equal(r1.latents, r2.latents)
    with pytest.raises(ValueError, match=r"conditions\[position\]: x and y must lie in \[0, 1\]"):
        pipe("a red circle", steps=3, conditions={"position": [2.0, 0.5]})


def test_doc_example_is_the_tested_file():
    from pathlib import Path

    doc = Path(__file__).parents[1] / "docs" / "conditions.md"
    code = (Path(__file__).parent / "condition_example.py").read_text()
    assert code.strip() in doc.read_text(), "docs/conditions.md must show tests/condition_example.py verbatim"


def test_member_widths_cover_input_conditions_only():
    specs = [ConditionSpec(type="class_label", args={"num_classes": 3}), ConditionSpec(type="controlnet")]
    cfg = _model(specs)
    assert member_widths(ConditionStack(specs, cfg), cfg) == {"class_label": 3}
    assert isinstance(Bundle(cfg).network(), ConditionedUNet)


# ------------------------------------------------------------------------------- published ControlNets


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_a_published_controlnet_file_attaches_as_a_control(tmp_path, layout):
    """A ControlNet saved in diffusers' or cldm's layout, attached to a model, steers it as the network itself does."""
    from ldm.checkpoint import write_safetensors
    from ldm.controlnet import ControlNet
    from ldm.controlnet_keys import ours_to_diffusers, ours_to_original
    from inference.conditions import attach_controlnet

    cfg = ModelConfig.tiny("sd1")
    b = Bundle(cfg)
    _randomize(b.unet)
    cn = ControlNet.from_unet(b.unet, hint_block_channels=(16, 32, 96))  # the tiny VAE's factor 4: 3 widths
    _randomize(cn, seed=5)
    sd = ours_to_diffusers(cn.state_dict(), cn.cfg) if layout == "diffusers" else ours_to_original(cn.state_dict())
    write_safetensors({k: v.contiguous() for k, v in sd.items()}, tmp_path / "cn.safetensors")
    attach_controlnet(b, tmp_path / "cn.safetensors", name="canny", weight=0.5)
    assert b.config.conditions[0].name == "canny" and b.config.unet == cfg.unet
    x, t, ctx, img = _inputs(cfg)
    extra = b.conditions.prepare({"canny": img}, Env((H, W)), B)
    ref = b.unet(x, t, Cond(context=ctx, control=cn(x, (img + 1) / 2, t, Cond(context=ctx), scale=0.5)))
    torch.testing.assert_close(b.network()(x, t, Cond(context=ctx, extra=extra)), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already has a condition named 'canny'"):
        attach_controlnet(b, tmp_path / "cn.safetensors", name="canny")


def test_conditions_are_dropped_independently_at_their_own_rates():
    from training.condition_setup import condition_extra

    specs = [ConditionSpec(type="class_label", drop=0.3, args={"num_classes": 2}),
             ConditionSpec(type="scalars", drop=0.6, column="s")]  # fmt: skip
    stack = ConditionStack(specs, _model(specs))
    n = 4000
    batch = {"class_label": torch.zeros(n, dtype=torch.long), "s": torch.zeros(n)}
    extra = condition_extra(stack, batch, seed=0, epoch=0, indices=list(range(n)), latent_hw=(H, W), device="cpu", vae=None)
    a, b = extra["class_label.keep"] == 0, extra["scalars.keep"] == 0
    # binomial standard errors at n = 4000: ~0.007 (p = 0.3), ~0.008 (p = 0.6); 4 sigma bounds
    assert abs(a.float().mean() - 0.3) < 0.03 and abs(b.float().mean() - 0.6) < 0.035
    assert abs((a & b).float().mean() - 0.18) < 0.03  # independent: P(both) = 0.3 * 0.6


def test_command_line_condition_flags(tmp_path, capsys):
    """ldm txt2img --cond / --cond-scale on a saved class-conditioned model; bad values are one-line errors."""
    from ldm.cli import main

    cfg = _model([ConditionSpec(type="class_label", args={"num_classes": 4})])
    b = Bundle(cfg)
    _randomize(b.unet)
    save_bundle(b, tmp_path / "m")
    base = ["txt2img", "a red circle", "--model", str(tmp_path / "m"), "--steps", "2", "--width", "32", "--height", "32",
            "--seed", "3", "--quiet", "--out"]  # fmt: skip
    assert main(base + [str(tmp_path / "o1"), "--cond", "class_label=1", "--cond-scale", "class_label=2"]) == 0
    assert main(base + [str(tmp_path / "o2"), "--cond", "class_label=2", "--cond-scale", "class_label=2"]) == 0
    (a,), (c,) = list((tmp_path / "o1").glob("*.png")), list((tmp_path / "o2").glob("*.png"))
    assert a.read_bytes() != c.read_bytes()  # the label steers the image
    capsys.readouterr()
    for flags, message in ((["--cond", "class_label=9"], "conditions[class_label]: class label 9 is outside [0, 4)"),
                           (["--cond", "colour=1"], "conditions: unknown condition 'colour'; this model has: class_label"),
                           (["--cond", "class_label"], "--cond 'class_label': expected NAME=VALUE"),
                           (["--cond-range", "class_label=0:0.5", "--cond", "class_label=1"],
                            "condition_ranges[class_label]: only controls have a step range")):  # fmt: skip
        try:
            code = main(base + [str(tmp_path / "bad")] + flags)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, (flags, err)
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").glob("*.png"))


def test_a_controlnet_takes_any_number_of_hint_channels():
    cfg = _model([ConditionSpec(type="controlnet", name="depth_normal", args={"hint_channels": 4})])
    b = Bundle(cfg)
    _randomize(b)
    x, t, ctx, _ = _inputs(cfg)
    f = cfg.vae.downsample_factor
    hint = torch.rand(B, 4, H * f, W * f) * 2 - 1
    extra = b.conditions.prepare({"depth_normal": hint}, Env((H, W)), B)
    ref = b.unet(x, t, Cond(context=ctx, control=b.conditions["depth_normal"].net(x, (hint + 1) / 2, t, Cond(context=ctx))))
    torch.testing.assert_close(b.network()(x, t, Cond(context=ctx, extra=extra)), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"conditions\[depth_normal\]: expected a \(B, 4, H, W\) tensor"):
        b.conditions.prepare({"depth_normal": torch.zeros(B, 3, H * f, W * f)}, Env((H, W)), B)


# ------------------------------------------------------------------------------ new inputs on a trained model


def test_widened_unet_computes_what_the_trained_one_did():
    """New concat channels, new vector features (the U-Net had none) and new context features: zero-initialised,
    so with ANY values for the new inputs the output is the old model's (fp32 summation order aside)."""
    from ldm.conditions.widen import widen_unet
    from ldm.unet import UNet

    base = ModelConfig.tiny("sd1")
    torch.manual_seed(0)
    old = UNet(base.unet)
    _randomize(old)
    wide_cfg = dataclasses.replace(base.unet, in_channels=base.unet.in_channels + 3, adm_in_channels=7,
                                   context_dim=base.unet.context_dim + 5)  # fmt: skip
    wide = widen_unet(old, wide_cfg)
    x, t, ctx, _ = _inputs(base)
    g = torch.Generator().manual_seed(9)
    ref = old(x, t, Cond(context=ctx))
    got = wide(x, t, Cond(context=torch.cat([ctx, torch.randn(B, 77, 5, generator=g)], -1),
                          vector=torch.randn(B, 7, generator=g), concat=torch.randn(B, 3, H, W, generator=g)))  # fmt: skip
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    sd_old, sd_new = old.state_dict(), wide.state_dict()
    w = sd_new["input_blocks.0.0.weight"]
    assert torch.equal(w[:, :4], sd_old["input_blocks.0.0.weight"]) and not w[:, 4:].any()
    assert not sd_new["label_emb.0.2.weight"].any() and not sd_new["label_emb.0.2.bias"].any()


def test_a_new_input_condition_fine_tunes_a_trained_model(tmp_path):
    """A class label added to a trained checkpoint: the U-Net's vector input appears (zero last layer), the run
    starts from the loaded model's exact predictions, and the label embedding trains."""
    from bench.perf_measure import randomize_
    from training.train import build_bundle, train

    train(tiny_config(tmp_path / "base", "max_steps=1"))
    src = tmp_path / "base" / "model"
    # one step moves, of the zero-initialised layers, only the output conv (a zero conv passes no gradient back): the
    # ResBlocks' last convs, the new label embedding's only way to the output, would still be 0. Random U-Net weights
    trained = load_bundle(src)
    randomize_(trained.unet, seed=5)
    save_bundle(trained, src)
    cfg = tiny_config(tmp_path / "ft", f"model.source={src}", "model.overrides=[]", "max_steps=3", "ema=null",
                      "conditions=[{type: class_label, name: count, column: n_objects, args: {num_classes: 3}}]")  # fmt: skip
    start = build_bundle(cfg)
    base = load_bundle(src)
    assert start.config.unet.adm_in_channels == 3 and base.config.unet.adm_in_channels == 0
    x, t, ctx, _ = _inputs(base.config)
    extra = start.conditions.prepare({"count": [1, 2]}, Env((H, W)), B)
    with torch.no_grad():
        torch.testing.assert_close(start.network()(x, t, Cond(context=ctx, extra=extra)), base.unet(x, t, Cond(context=ctx)),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    train(cfg)
    out = load_bundle(tmp_path / "ft" / "model")
    assert out.unet.state_dict()["label_emb.0.2.weight"].abs().sum() > 0  # the new path learned
