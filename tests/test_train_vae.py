"""Training the autoencoder with the trainer (``task: vae``, training/vae_task.py) and handing it to a U-Net run.

- The single backward of the summed objective gives each network the gradient of its own loss in the original's
  two-optimizer scheme (VAE: generator loss only; discriminator: D loss only), after disc_start too.
- A run interrupted mid-epoch and resumed is bit-identical to an uninterrupted one (discriminator switched on in
  between, EMA on).
- The fitted latent scale makes the saved VAE's scaled latents unit-variance on the training images.
- ``model.vae`` hands the trained VAE (weights and config) to a U-Net run; only the U-Net side then changes.
- Settings that mean nothing for task=vae are refused, naming the key; ``resume=latest`` without a checkpoint too.
"""
from __future__ import annotations

import pytest
import torch

import training.train as train_mod
from autoencoder.loss import VAELoss, VAELossConfig
from ldm.bundle import load_bundle
from ldm.checkpoint import read_state_dict
from tests.test_train_smoke import tiny_config
from training.collate import collate_rows
from training.config import load_train_config
from training.train import train
from training.train_data import open_train_dataset
from training.datasets_io import ImageCaptionDataset
from training.vae_task import VAETrainStep, psnr


def vae_config(out, *overrides):
    return tiny_config(out, "task=vae", "vae_loss.disc_start=3", "vae_loss.discriminator.base_channels=8",
                       "vae_loss.discriminator.n_layers=2", "validation.recon_images=2", *overrides)  # fmt: skip


def _images(n=4, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


@pytest.mark.parametrize("step", [0, 5])  # before and after disc_start
def test_one_backward_gives_each_network_the_gradient_of_its_own_loss(step):
    from ldm.model_config import ModelConfig
    from ldm.bundle import Bundle

    torch.manual_seed(0)
    vae = Bundle(ModelConfig.tiny("sd1")).vae
    criterion = VAELoss(VAELossConfig(disc_start=3, discriminator={"base_channels": 8, "n_layers": 2, "norm": "group",
                                                                    "norm_num_groups": 4}))  # fmt: skip
    x = _images()
    vae_params, disc_params = list(vae.parameters()), list(criterion.discriminator.parameters())

    # the original: generator step, then a discriminator step on the detached reconstruction
    g_loss, logs = criterion.generator_loss(vae, x, step, torch.Generator().manual_seed(7))
    want_vae = torch.autograd.grad(g_loss, vae_params, allow_unused=True)
    d_loss, _ = criterion.discriminator_loss(logs["reconstructions"], x, step)
    want_disc = torch.autograd.grad(d_loss, disc_params, allow_unused=True)

    total, _ = VAETrainStep(vae, criterion)(x, step, torch.Generator().manual_seed(7))
    got = torch.autograd.grad(total, vae_params + disc_params, allow_unused=True)
    for w, g in zip(list(want_vae) + list(want_disc), got):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)  # same graph, summation order may differ
    if step >= 3:
        assert any(g is not None and g.abs().sum() > 0 for g in got[len(vae_params):])  # the discriminator learns


class Interrupted(Exception):
    pass


def test_vae_resume_mid_epoch_is_bit_identical(tmp_path, monkeypatch):
    overrides = ("shapes.rows=6", "max_steps=6", "checkpoint_every=4", "ema.decay=0.9", "data.random_flip=0.5")
    full = train(vae_config(tmp_path / "full", *overrides))

    calls = {"n": 0}
    real_forward = VAETrainStep.forward

    def crash_on_fifth(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # step 5: after the checkpoint of step 4, in epoch 1 (3 batches an epoch)
            raise Interrupted
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.VAETrainStep, "forward", crash_on_fifth)
    with pytest.raises(Interrupted):
        train(vae_config(tmp_path / "cut", *overrides))
    monkeypatch.undo()
    resumed = train(vae_config(tmp_path / "cut", *overrides, "resume=latest"))

    assert resumed["state"] == full["state"]
    assert resumed["losses"] == {k: v for k, v in full["losses"].items() if k > 4}
    for stem in ("model", "optimizer", "ema"):
        a = read_state_dict(tmp_path / "full" / "checkpoints" / "step-00000006" / f"{stem}.safetensors")
        b = read_state_dict(tmp_path / "cut" / "checkpoints" / "step-00000006" / f"{stem}.safetensors")
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stem}: {k}"
    names = read_state_dict(tmp_path / "full" / "checkpoints" / "step-00000006" / "model.safetensors")
    assert {k.split(".")[0] for k in names} == {"vae", "disc"}


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    cfg = vae_config(out, "shapes.rows=8", "max_steps=8", "ema.decay=0.5", "optim.lr=2e-3")
    result = train(cfg)
    return cfg, result, out


def test_vae_run_trains_only_the_autoencoder_and_fits_its_scale(vae_run):
    cfg, result, out = vae_run
    start = train_mod.build_bundle(cfg)  # the seeded initial networks
    for folder in ("model", "model-ema"):
        trained = load_bundle(out / folder)
        for name in ("unet", "text"):
            a, b = getattr(start, name).state_dict(), getattr(trained, name).state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a), f"{folder}: {name} changed"
        assert any(not torch.equal(v, trained.vae.state_dict()[k]) for k, v in start.vae.state_dict().items())

        # independent check of the scale: posterior samples of every training image, scaled, have unit std
        rows = ImageCaptionDataset(open_train_dataset(cfg), cfg.data, train=False)
        x = collate_rows([rows[i] for i in range(len(rows))])["pixel_values"]
        with torch.no_grad():
            z = trained.vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))  # scaled latents
        # 8 images x 64 latent values: the std of one sample set differs from the fitted one by sampling noise
        assert abs(z.std().item() - 1.0) < 0.1, (folder, z.std().item())
    assert (out / "validation" / "step-00000008.png").is_file()
    assert all(torch.isfinite(torch.tensor(v)) for v in result["losses"].values())


def test_model_vae_hands_the_trained_autoencoder_to_a_unet_run(vae_run, tmp_path):
    _, _, vae_out = vae_run
    cfg = tiny_config(tmp_path, f"model.vae={vae_out / 'model-ema'}", "max_steps=2")
    train(cfg)
    donor, got = load_bundle(vae_out / "model-ema"), load_bundle(tmp_path / "model")
    assert got.config.vae == donor.config.vae
    d = donor.vae.state_dict()
    assert all(torch.equal(v, d[k]) for k, v in got.vae.state_dict().items())


def test_psnr_by_hand():
    x = torch.zeros(1, 3, 2, 2)
    assert psnr(x, x + 0.1) == pytest.approx(10 * torch.log10(torch.tensor(4.0 / 0.01)).item())


@pytest.mark.parametrize("override, key", [("lora.rank=4", "lora"), ("train_text_encoder=true", "train_text_encoder"),
                                           ("cache.latents=true", "cache.latents")])  # fmt: skip
def test_settings_without_meaning_for_a_vae_run_are_refused(tmp_path, override, key):
    with pytest.raises(Exception, match=key):
        vae_config(tmp_path, override)


def test_model_vae_must_exist_and_resume_latest_needs_a_checkpoint(tmp_path):
    with pytest.raises(Exception, match="model.vae"):
        tiny_config(tmp_path, f"model.vae={tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="resume: 'latest'"):
        train(tiny_config(tmp_path, "resume=latest"))
