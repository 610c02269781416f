"""The autoencoder's training objective (autoencoder/loss.py) and its PatchGAN (autoencoder/discriminator.py).

References are independent of the code under test: torch.distributions for the KL, numbers worked out by hand
for the reconstruction and GAN losses, linear toy losses whose gradients are known in closed form for the
adaptive weight (VQGAN eq. 7), the pix2pix / taming-transformers layer arithmetic for the patch map, and an
explicit gradient probe for the receptive field.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence as torch_kl

from autoencoder import AutoencoderConfig, AutoencoderKL
from autoencoder.discriminator import DiscriminatorConfig, NLayerDiscriminator, output_size, receptive_field
from autoencoder.loss import (
    VAELoss,
    VAELossConfig,
    adaptive_weight,
    hinge_d_loss,
    kl_divergence,
    reconstruction_loss,
    vanilla_d_loss,
)

SMALL_DISC = DiscriminatorConfig(base_channels=8, n_layers=2)  # 16x16 input -> 2x2 logit map


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(AutoencoderConfig.tiny())  # f = 4


def fixed_images(seed: int = 1, batch: int = 4, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def reference_reconstruction(vae: AutoencoderKL, images: torch.Tensor, seed: int):
    """The posterior sample drawn by hand (z = mean + std * eps) and decoded through the public decode."""
    mean, logvar = vae.moments(images)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed), dtype=mean.dtype)
    z = mean + torch.exp(0.5 * logvar) * eps
    return vae.decode(vae.scale_latent(z)), mean, logvar


def reference_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """(B,) KL summed over latent dims, via torch.distributions."""
    q = Normal(mean, torch.exp(0.5 * logvar))
    p = Normal(torch.zeros_like(mean), torch.ones_like(mean))
    return torch_kl(q, p).flatten(1).sum(dim=1)


# ----------------------------------------------------------------------------------------- the terms


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) * 2
    logvar = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) * 3
    ours = kl_divergence(mean, logvar)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours.double(), reference_kl(mean, logvar), rtol=1e-5, atol=1e-4)
    # the standard normal itself has zero divergence
    assert kl_divergence(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).abs().max() == 0


def test_reconstruction_losses_by_hand():
    x = torch.zeros(2, 1, 2, 2)
    y = torch.tensor([[[[1.0, -2.0], [3.0, -4.0]]], [[[0.5, 0.0], [0.0, -1.0]]]])
    # l1: per sample 1+2+3+4 = 10 and 0.5+1 = 1.5, averaged over the batch of 2
    assert reconstruction_loss(x, y, "l1").item() == pytest.approx((10 + 1.5) / 2)
    # l2: per sample 1+4+9+16 = 30 and 0.25+1 = 1.25
    assert reconstruction_loss(x, y, "l2").item() == pytest.approx((30 + 1.25) / 2)
    with pytest.raises(ValueError, match="kind"):
        reconstruction_loss(x, y, "l3")


LOGITS_REAL = torch.tensor([2.0, 0.5, -1.0])
LOGITS_FAKE = torch.tensor([-3.0, 0.0, 0.5])


def test_hinge_loss_by_hand():
    # relu(1 - real) = [0, 0.5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 1.5] -> mean 5/6
    assert hinge_d_loss(LOGITS_REAL, LOGITS_FAKE).item() == pytest.approx(0.5 * (5 / 6 + 5 / 6))


def test_vanilla_loss_by_hand():
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    real = sum(softplus(-v) for v in LOGITS_REAL.tolist()) / 3
    fake = sum(softplus(v) for v in LOGITS_FAKE.tolist()) / 3
    assert vanilla_d_loss(LOGITS_REAL, LOGITS_FAKE).item() == pytest.approx(0.5 * (real + fake), rel=1e-6)


def test_adaptive_weight_closed_form():
    # Linear toy losses of a last layer W: d/dW sum(W * a) = a, so the weight is ||a|| / (||b|| + 1e-4) * dw.
    W = torch.nn.Parameter(torch.randn(3, 4))
    a, b = torch.randn(3, 4), torch.randn(3, 4) * 0.01
    rec, g = (W * a).sum(), (W * b).sum()
    w = adaptive_weight(rec, g, W, disc_weight=0.5)
    expected = a.norm() / (b.norm() + 1e-4) * 0.5
    torch.testing.assert_close(w, expected)
    assert not w.requires_grad
    rec.backward()  # the graph was retained
    torch.testing.assert_close(W.grad, a)


def test_adaptive_weight_toy_layer_and_clamp():
    # A nonlinear toy: y = layer(x); rec = |y - t|.sum(); g = -mean(tanh(y)); gradients taken by hand.
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    x, t = torch.randn(8, 5), torch.randn(8, 3)
    y = layer(x)
    rec, g = (y - t).abs().sum(), -torch.tanh(y).mean()
    # dL/dW = (dL/dy)^T x
    d_rec = torch.sign(y - t).detach()
    d_g = (-(1 - torch.tanh(y) ** 2) / y.numel()).detach()
    expected = (d_rec.T @ x).norm() / ((d_g.T @ x).norm() + 1e-4) * 2.0
    torch.testing.assert_close(adaptive_weight(rec, g, layer.weight, 2.0), expected, rtol=1e-5, atol=0)
    # a GAN loss with no gradient at the last layer: ||a|| / 1e-4 = 5e4 is clamped to 1e4
    W = torch.nn.Parameter(torch.ones(1))
    w = adaptive_weight(5.0 * W.sum(), 0.0 * W.sum(), W, disc_weight=0.5)
    assert w.item() == pytest.approx(1e4 * 0.5)
    with pytest.raises(ValueError, match="last_layer"):
        adaptive_weight(5.0 * W.sum(), torch.ones((), requires_grad=True) * 2, W)


# ----------------------------------------------------------------------------------------- the steps


def test_generator_loss_before_disc_start_is_recon_plus_kl():
    vae, images = tiny_vae(), fixed_images()
    criterion = VAELoss(VAELossConfig(kl_weight=0.1, disc_start=10, discriminator=SMALL_DISC))
    loss, logs = criterion.generator_loss(vae, images, step=9, generator=torch.Generator().manual_seed(3))

    recon, mean, logvar = reference_reconstruction(vae, images, seed=3)
    rec = (images - recon).abs().sum() / images.shape[0]
    kl = reference_kl(mean, logvar).sum() / images.shape[0]
    torch.testing.assert_close(loss, rec + 0.1 * kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logs["rec_loss"], rec.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logs["kl_loss"], kl.detach(), rtol=1e-5, atol=1e-5)
    assert logs["d_weight"].item() == 0 and logs["disc_factor"].item() == 0 and logs["g_loss"].item() == 0
    # the discriminator was not run: its BatchNorm statistics are untouched
    bn = [m for m in criterion.discriminator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(m.num_batches_tracked.item() == 0 for m in bn)

    d_loss, d_logs = criterion.discriminator_loss(logs["reconstructions"], images, step=9)
    assert d_loss.item() == 0 and d_logs["disc_factor"].item() == 0
    d_loss.backward()  # still differentiable (0 * D_loss)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_generator_loss_after_disc_start_adaptive(norm):
    vae, images = tiny_vae(), fixed_images()
    disc = DiscriminatorConfig(base_channels=8, n_layers=2, norm=norm, norm_num_groups=4)
    criterion = VAELoss(VAELossConfig(kl_weight=0.1, disc_weight=0.5, disc_start=10, discriminator=disc))
    reference_disc = NLayerDiscriminator(disc)
    reference_disc.load_state_dict(criterion.discriminator.state_dict())

    loss, logs = criterion.generator_loss(vae, images, step=10, generator=torch.Generator().manual_seed(3))

    recon, mean, logvar = reference_reconstruction(vae, images, seed=3)
    rec = (images - recon).abs().sum() / images.shape[0]
    kl = reference_kl(mean, logvar).sum() / images.shape[0]
    g = -reference_disc(recon).mean()
    W = vae.decoder.conv_out.weight
    grad_rec = torch.autograd.grad(rec, W, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, W, retain_graph=True)[0]
    d_weight = (grad_rec.norm() / (grad_g.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    assert 0 < d_weight < 1e4 * 0.5
    torch.testing.assert_close(logs["d_weight"], d_weight, rtol=1e-4, atol=0)
    torch.testing.assert_close(logs["g_loss"], g.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, rec + 0.1 * kl + d_weight * 1.0 * g, rtol=1e-5, atol=1e-5)

    vae.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in criterion.discriminator.parameters())  # the generator step spares D
    assert W.grad is not None and W.grad.abs().sum() > 0


def test_fixed_disc_weight_and_no_grad_validation():
    vae, images = tiny_vae(), fixed_images()
    fixed = VAELoss(VAELossConfig(disc_start=0, disc_weight=0.3, adaptive_weight=False, discriminator=SMALL_DISC))
    loss, logs = fixed.generator_loss(vae, images, step=0, generator=torch.Generator().manual_seed(3))
    assert logs["d_weight"].item() == pytest.approx(0.3)
    torch.testing.assert_close(loss.detach(), logs["rec_loss"] + 1e-6 * logs["kl_loss"] + 0.3 * logs["g_loss"])
    adaptive = VAELoss(VAELossConfig(disc_start=0, discriminator=SMALL_DISC))
    with torch.no_grad():  # validation: no gradient to balance with, the GAN term drops out
        loss, logs = adaptive.generator_loss(vae, images, step=5, generator=torch.Generator().manual_seed(3))
    assert logs["d_weight"].item() == 0
    torch.testing.assert_close(loss, logs["rec_loss"] + 1e-6 * logs["kl_loss"])


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_loss_after_disc_start(kind):
    images = fixed_images()
    recon = fixed_images(seed=2).requires_grad_(True)
    criterion = VAELoss(VAELossConfig(disc_start=3, disc_factor=2.0, disc_loss=kind, discriminator=SMALL_DISC))
    reference_disc = NLayerDiscriminator(SMALL_DISC)
    reference_disc.load_state_dict(criterion.discriminator.state_dict())
    d_loss, logs = criterion.discriminator_loss(recon, images, step=3)

    real, fake = reference_disc(images).detach(), reference_disc(recon).detach()
    if kind == "hinge":
        expected = 0.5 * ((1 - real).clamp(min=0).mean() + (1 + fake).clamp(min=0).mean())
    else:
        expected = 0.5 * (torch.log1p(torch.exp(-real)).mean() + torch.log1p(torch.exp(fake)).mean())
    torch.testing.assert_close(d_loss, 2.0 * expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["logits_real"], real.mean())
    d_loss.backward()
    assert recon.grad is None  # reconstructions are detached: only D learns here
    assert all(p.grad is not None for p in criterion.discriminator.parameters())


# ----------------------------------------------------------------------------------------- the discriminator


@pytest.mark.parametrize("size, side", [(32, 2), (64, 6)])
def test_patch_map_shape(size, side):
    # pix2pix 70x70 PatchGAN: three 4x4/2 convs (H/8), then two 4x4/1 convs with padding 1 (-1 each)
    disc = NLayerDiscriminator()
    with torch.no_grad():
        out = disc(torch.zeros(2, 3, size, size))
    assert out.shape == (2, 1, side, side)
    assert output_size(size) == side
    assert output_size(256) == 30  # the 30x30 map of pix2pix on 256x256 images


@pytest.mark.parametrize("n_layers, field", [(2, 34), (3, 70)])
def test_receptive_field_by_gradient_probe(n_layers, field):
    disc = NLayerDiscriminator(DiscriminatorConfig(base_channels=4, n_layers=n_layers)).eval()  # BN pointwise
    x = torch.randn(1, 3, 128, 128, requires_grad=True)
    out = disc(x)
    i = out.shape[-1] // 2
    out[0, 0, i, i].backward()
    touched = x.grad[0].abs().sum(0) > 0  # (H, W) input pixels this logit depends on
    rows, cols = touched.any(1).nonzero(), touched.any(0).nonzero()
    assert rows.max() - rows.min() + 1 == field and cols.max() - cols.min() + 1 == field
    assert receptive_field(n_layers) == field


def test_discriminator_layout_and_init():
    disc = NLayerDiscriminator()
    sd = disc.state_dict()
    # taming-transformers NLayerDiscriminator(n_layers=3): convs at main.{0,2,5,8,11}, BatchNorm at main.{3,6,9}
    assert {k.rsplit(".", 1)[0] for k in sd if k.endswith("weight")} == {f"main.{i}" for i in (0, 2, 3, 5, 6, 8, 9, 11)}
    assert sd["main.0.bias"].shape == (64,) and "main.2.bias" not in sd  # a normalized conv has no bias
    assert sd["main.8.weight"].shape == (512, 256, 4, 4) and sd["main.11.weight"].shape == (1, 512, 4, 4)
    w = sd["main.8.weight"]
    assert w.mean().abs() < 1e-3 and w.std().item() == pytest.approx(0.02, rel=0.01)  # N(0, 0.02)
    assert sd["main.9.weight"].mean().item() == pytest.approx(1.0, abs=0.01) and sd["main.9.bias"].abs().max() == 0
    with pytest.raises(ValueError, match="image"):
        disc(torch.zeros(1, 3, 16, 16))  # too small for 3 layers: the logit map would be empty
    with pytest.raises(ValueError, match="image"):
        disc(torch.zeros(1, 4, 32, 32))


# ----------------------------------------------------------------------------------------- training


def test_few_steps_overfit_a_fixed_batch():
    # Random but smooth images (4x4 noise upsampled to 16x16): an f4 VAE with 4 latent channels keeps 64 numbers
    # of an image's 768, so white noise cannot be reconstructed much better than by its mean (L1 ~ 0.5 / pixel).
    vae = tiny_vae()
    images = torch.nn.functional.interpolate(fixed_images(size=4), size=16, mode="bilinear", align_corners=False)
    disc = DiscriminatorConfig(base_channels=8, n_layers=2, norm="group", norm_num_groups=4)
    criterion = VAELoss(VAELossConfig(disc_start=6, discriminator=disc))
    opt_vae = torch.optim.Adam(vae.parameters(), lr=1e-3)
    opt_disc = torch.optim.Adam(criterion.discriminator.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    recs = []
    for step in range(12):  # 6 reconstruction-only steps, then 6 with the adaptive GAN term on
        loss, logs = criterion.generator_loss(vae, images, step, generator=g)
        opt_vae.zero_grad()
        loss.backward()
        opt_vae.step()
        d_loss, _ = criterion.discriminator_loss(logs["reconstructions"], images, step)
        opt_disc.zero_grad()
        d_loss.backward()
        opt_disc.step()
        recs.append(logs["rec_loss"].item())
        assert math.isfinite(loss.item()) and math.isfinite(d_loss.item())
    assert logs["d_weight"].item() > 0 and logs["g_loss"].item() != 0
    assert recs[5] < 0.85 * recs[0] and recs[-1] < 0.8 * recs[0], recs


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(recon="l3"), "recon"),
        (dict(kl_weight=-1.0), "kl_weight"),
        (dict(kl_weight=float("nan")), "kl_weight"),
        (dict(disc_weight=-0.5), "disc_weight"),
        (dict(disc_factor=float("inf")), "disc_factor"),
        (dict(disc_start=-1), "disc_start"),
        (dict(disc_start=1.5), "disc_start"),
        (dict(disc_start=True), "disc_start"),
        (dict(disc_loss="wgan"), "disc_loss"),
        (dict(adaptive_weight="yes"), "adaptive_weight"),
        (dict(discriminator="big"), "discriminator"),
    ],
)
def test_bad_loss_config(kwargs, name):
    with pytest.raises(ValueError, match=name):
        VAELossConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(norm="layer"), "norm"),
        (dict(n_layers=0), "n_layers"),
        (dict(base_channels=2.5), "base_channels"),
        (dict(norm="group", base_channels=8, norm_num_groups=32), "norm_num_groups"),
    ],
)
def test_bad_discriminator_config(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DiscriminatorConfig(**kwargs)


def test_bad_call_arguments():
    vae, images = tiny_vae(), fixed_images()
    criterion = VAELoss(VAELossConfig(discriminator=SMALL_DISC))
    with pytest.raises(ValueError, match="step"):
        criterion.generator_loss(vae, images, step=-1)
    with pytest.raises(ValueError, match="images"):
        criterion.generator_loss(vae, images[0], step=0)
    with pytest.raises(ValueError, match="vae"):
        criterion.generator_loss(torch.nn.Linear(2, 2), images, step=0)
    with pytest.raises(ValueError, match="reconstructions"):
        criterion.discriminator_loss(images[:2], images, step=0)
    with pytest.raises(ValueError, match="config"):
        VAELoss(config={"recon": "l1"})
