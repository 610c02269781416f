"""training/train.py end to end on a tiny random model and the builtin shapes data (CPU, seconds per test).

What is checked against independent expectations:
- overfitting a fixed batch (eps and v): the loss on FIXED noise draws, computed here with ldm.loss from the
  saved bundle, falls well below the loss of the same model before training (rebuilt from the same seed);
- a non-finite loss (injected by a patched DiffusionLoss) leaves weights, optimizer and EMA exactly as they were
  (checkpoint before == checkpoint after the skipped step), and the next step trains again; K in a row stop;
- LoRA: the saved model equals the initial model with the saved adapters merged (ldm.lora on a fresh copy), so
  nothing but the adapters changed, and the LoRA file loads;
- the outputs: an ldm bundle (+ EMA bundle) that load_bundle reads, metrics, a validation grid of the right size.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

import training.train as train_mod
from ldm.bundle import load_bundle, save_bundle
from ldm.checkpoint import read_state_dict
from ldm.conditioning import Cond
from ldm.lora import load_lora, merge_lora
from ldm.loss import DiffusionLoss, LossConfig
from training.collate import collate_rows
from training.config import load_train_config
from training.datasets_io import ImageCaptionDataset
from training.train import NonFiniteLossError, build_bundle, train
from training.train_data import open_train_dataset


# A smaller ModelConfig.tiny('sd1'): 2 U-Net levels, 16 channels, an f2 VAE, one text block.
TINY_MODEL = [
    "unet.channel_mult=[1,2]", "unet.transformer_depth=[1,1]", "unet.num_res_blocks=1", "unet.model_channels=16",
    "vae.base_channels=8", "vae.channel_mult=[1,2]", "text[0].layers=1",
]


def tiny_config(out, *overrides: str, model_overrides: tuple[str, ...] = ()):
    """A TrainConfig for a tiny run in ``out`` (16 px shapes, batch 2, 4 steps, no checkpoints but the last)."""
    base = {
        "model": {"source": "tiny", "overrides": TINY_MODEL + list(model_overrides)},
        "data": {"source": "shapes", "resolution": 16, "crop": "center", "num_workers": 0},
        "shapes": {"rows": 8, "image_size": 16, "supersample": 1},
        "batch_size": 2, "max_steps": 4, "optim": {"lr": 1e-3, "weight_decay": 0.0},
        "checkpoint_every": 0, "keep_last": 0, "log_every": 1, "output_dir": str(out),
    }
    return load_train_config(base, list(overrides))


def eval_loss(bundle, cfg, n_rows: int, draws: int = 8) -> float:
    """Mean loss over fixed draws (seeded here) on the first ``n_rows`` training images, VAE mean latents."""
    rows = ImageCaptionDataset(open_train_dataset(cfg), cfg.data, train=False)
    batch = collate_rows([rows[i] for i in range(n_rows)])
    loss = DiffusionLoss(bundle.unet, bundle.config.diffusion, LossConfig())
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        z0 = bundle.vae.encode(batch["pixel_values"], sample=False)
        context, _ = bundle.encode_prompts(batch["text"])
        return float(torch.stack([loss(z0, Cond(context=context), g).loss for _ in range(draws)]).mean())


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_overfits_a_fixed_batch(tmp_path, prediction):
    cfg = tiny_config(tmp_path, "shapes.rows=4", "batch_size=4", "max_steps=20", "optim.lr=2e-3", "grad_clip=null",
                      "lr_schedule.warmup_steps=3", model_overrides=(f"diffusion.prediction={prediction}",))
    before = eval_loss(build_bundle(cfg), cfg, 4)
    result = train(cfg)
    after = eval_loss(load_bundle(tmp_path / "model"), cfg, 4)
    assert result["state"].step == 20 and result["state"].images_seen == 80
    assert load_bundle(tmp_path / "model").config.diffusion.prediction == prediction
    if prediction == "eps":  # the U-Net's output layer starts at zero: the loss is E[noise^2] = 1
        assert before == pytest.approx(1.0, abs=0.1)
    # 20 steps on 4 images cut the loss on fixed draws to about half (measured 0.50 for eps, 0.54 for v); a run
    # that trains against the wrong target or does not step stays near 1
    assert after < 0.75 * before, (before, after)


class NaNAt(DiffusionLoss):
    """DiffusionLoss whose calls numbered in ``bad`` (1-based, one per micro-batch) return a NaN loss."""

    bad: set[int] = set()
    calls = 0

    def compute(self, *args, **kwargs):  # one call per micro-batch
        out = super().compute(*args, **kwargs)
        type(self).calls += 1
        if type(self).calls in type(self).bad or "all" in type(self).bad:
            out.loss = out.loss * float("nan")
        return out


def _tensors(folder, stem):
    return read_state_dict(folder / f"{stem}.safetensors")


def test_nan_loss_skips_the_step_and_leaves_everything_untouched(tmp_path, monkeypatch):
    NaNAt.bad, NaNAt.calls = {5}, 0  # grad_accum 2: call 5 is the first micro-batch of step 3
    monkeypatch.setattr(train_mod, "DiffusionLoss", NaNAt)
    cfg = tiny_config(tmp_path, "grad_accum=2", "checkpoint_every=1", "ema.decay=0.9")
    result = train(cfg)
    assert result["state"].skipped_nonfinite == 1 and result["state"].consecutive_nonfinite == 0
    ck = tmp_path / "checkpoints"
    s2, s3, s4 = (ck / f"step-0000000{i}" for i in (2, 3, 4))
    for stem in ("model", "optimizer", "ema"):
        a, b = _tensors(s2, stem), _tensors(s3, stem)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stem}: {k} changed in the skipped step"
    assert int(_tensors(s3, "ema")["num_updates"]) == 2
    assert json.loads((s3 / "state.json").read_text())["skipped_nonfinite"] == 1
    # the step after the skip trains again
    a, b = _tensors(s3, "model"), _tensors(s4, "model")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert int(_tensors(s4, "ema")["num_updates"]) == 3
    logged = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert logged[2]["skipped_nonfinite"] == 1 and logged[2]["loss"] != logged[2]["loss"]  # NaN logged as NaN


def test_consecutive_nan_losses_stop_the_run(tmp_path, monkeypatch):
    NaNAt.bad, NaNAt.calls = {"all"}, 0
    monkeypatch.setattr(train_mod, "DiffusionLoss", NaNAt)
    cfg = tiny_config(tmp_path, "max_consecutive_skips=3", "max_steps=10")
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        train(cfg)
    assert NaNAt.calls == 3
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "model").exists()


def test_lora_fine_tunes_only_the_adapters_and_its_file_loads(tmp_path):
    # a "pretrained" base: the tiny model with its zero-initialised layers (output conv, proj_out ...) randomised,
    # since through a zero output layer no gradient reaches the attention layers the adapters sit in
    base = build_bundle(tiny_config(tmp_path / "unused"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in base.unet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_bundle(base, tmp_path / "base")
    out = tmp_path / "run"
    cfg = tiny_config(out, f"model.source={tmp_path / 'base'}", "model.overrides=[]", "lora.rank=2", "lora.alpha=2",
                      "lora.target_modules=[to_q,to_v]", "max_steps=3", "checkpoint_every=3", "ema.decay=0.5",
                      "cache.text=true")  # fmt: skip
    assert not cfg.model.from_scratch
    train(cfg)
    tmp_path = out
    lora = read_state_dict(tmp_path / "lora.safetensors")
    assert lora and all(k.endswith(("lora_down.weight", "lora_up.weight", "alpha")) for k in lora)
    modules = {k.removesuffix(".lora_down.weight").removesuffix(".lora_up.weight").removesuffix(".alpha") for k in lora}
    assert modules and all(m.endswith((".to_q", ".to_v")) for m in modules)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_up" in k)  # up starts at zero: it was trained
    # the checkpoint holds the adapters only
    ck = read_state_dict(tmp_path / "checkpoints" / "step-00000003" / "model.safetensors")
    assert ck and all(".lora_" in k for k in ck)
    # saved model == initial model + merged adapters, exactly; nothing else moved (VAE, text, other U-Net weights)
    expected = load_bundle(cfg.model.source)
    load_lora(expected.unet, lora)
    merge_lora(expected.unet)
    saved = load_bundle(tmp_path / "model")
    want, got = expected.state_dict(), saved.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert (tmp_path / "lora-ema.safetensors").is_file()


def test_outputs_bundle_ema_metrics_and_validation_grid(tmp_path):
    cfg = tiny_config(tmp_path, "ema.decay=0.9", "validation.prompts=[a red circle,a blue square]",
                      "validation.images_per_prompt=2", "validation.every=2", "validation.sampler.steps=2",
                      "train_text_encoder=true", "cond_dropout.text=0.5", "max_steps=4", "cache.latents=true")  # fmt: skip
    result = train(cfg)
    assert result["state"].step == 4
    model, ema = load_bundle(tmp_path / "model"), load_bundle(tmp_path / "model-ema")
    assert model.config == ema.config
    differs = [k for k, v in model.state_dict().items() if not torch.equal(v, ema.state_dict()[k])]
    assert any(k.startswith("unet.") for k in differs) and any(k.startswith("text.") for k in differs)
    assert not any(k.startswith("vae.") for k in differs)  # frozen
    # zero-initialised output and proj_out layers: gradients reach the text tower from the third step on
    for step in (2, 4):
        grid = Image.open(tmp_path / "validation" / f"step-0000000{step}.png")
        assert grid.size == (2 * 16, 2 * 16)  # 2 images per prompt across, 2 prompts down
    records = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "images_per_s"} <= records[0].keys()


def test_sdxl_with_bf16_cached_text_buckets_and_size_dropout(tmp_path):
    small = ["unet.channel_mult=[1,2]", "unet.transformer_depth=[1,1]", "unet.num_res_blocks=1", "vae.channel_mult=[1,2]"]
    cfg = tiny_config(tmp_path, "model.source=tiny-sdxl", "model.overrides=[" + ",".join(f'"{o}"' for o in small) + "]",
                      "mixed_precision=bf16", "cache.text=true", "cond_dropout.text=0.5", "cond_dropout.sizes=0.5",
                      "data.buckets=true", "data.bucket_multiple=8", "max_steps=2")  # fmt: skip
    result = train(cfg)
    assert result["state"].step == 2 and all(math.isfinite(v) for v in result["losses"].values())
    saved = load_bundle(tmp_path / "model")
    assert saved.config.family == "sdxl" and saved.unet.cfg.adm_in_channels == 24 + 6 * 256


def test_trains_on_a_local_image_folder_with_a_bad_file(tmp_path):
    import numpy as np

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (16 + 4 * i, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"photo number {i}"}))
    (folder / "4.png").write_bytes(b"not a png")  # skipped and counted, never fatal
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    cfg = tiny_config(tmp_path / "out", f"data.source={folder}", "data.crop=random", "data.random_flip=0.5",
                      "max_steps=3", "cond_dropout.text=0.2")  # fmt: skip
    result = train(cfg)
    assert result["state"].step == 3 and all(math.isfinite(v) for v in result["losses"].values())
    assert load_bundle(tmp_path / "out" / "model").config.family == "sd1"


def test_cached_latents_draw_the_same_shuffled_batches_as_images(tmp_path):
    """A latent cache changes how images are prepared (evaluation transform), never the batch order: a dataset sorted
    by class (CIFAR-10's parquet is) must still be drawn in random batches, else each batch holds one class and the
    model learns the data order instead of the captions (the bug behind docs/results.md's first CIFAR-10 runs)."""
    from training.train_data import CachedLatentRows, train_rows

    def batches(*overrides):
        cfg = tiny_config(tmp_path / "o", "shapes.rows=64", *overrides)
        rows = train_rows(cfg, open_train_dataset(cfg))
        if cfg.cache.latents:
            rows = CachedLatentRows(rows, [None] * len(rows), seed=0)
        sampler = rows.batch_sampler(8, num_replicas=1, rank=0)
        sampler.set_epoch(1)
        return [list(b) for b in sampler]

    plain, cached = batches(), batches("cache.latents=true")
    assert cached == plain
    flat = [i for b in cached for i in b]
    assert sorted(flat) == list(range(64)) and flat != list(range(64))
    assert any(max(b) - min(b) > 8 for b in cached)  # batches mix rows from all over the dataset


def test_the_trained_size_becomes_the_default_size(tmp_path):
    """A model trained at 24 px samples at 24 px by default (not at the 8 x 8-latent size of test-sized models:
    a CIFAR-10 model trained at 32 px was evaluated at 16 px before), and the size survives the bundle's save."""
    from inference.pipeline import Pipeline

    cfg = tiny_config(tmp_path / "out", "data.resolution=24", "shapes.image_size=24", "max_steps=1", "ema.decay=0.9")
    train(cfg)
    for name in ("model", "model-ema"):
        bundle = load_bundle(tmp_path / "out" / name)
        assert bundle.config.sample_size == [24, 24]
        pipe = Pipeline(bundle, name=name)
        assert pipe.default_size == (24, 24)
        assert pipe("a red circle", seed=[0], steps=1).images[0].size == (24, 24)
    from ldm.bundle import Bundle

    untrained = Pipeline(Bundle(build_bundle(cfg).config.__class__.tiny("sd1")), name="fresh")
    assert untrained.default_size == (8 * untrained.factor,) * 2  # no recorded size: an 8 x 8 latent
