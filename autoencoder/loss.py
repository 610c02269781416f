"""The objective that trains the KL autoencoder from scratch: reconstruction + KL + an adaptive PatchGAN term.

This is ``LPIPSWithDiscriminator`` of latent-diffusion (``ldm/modules/losses/contperceptual.py``, Rombach et al.
2022, sec. 3 and appendix G) minus LPIPS, which needs pretrained VGG weights. Per step, two optimizers:

    generator (VAE) step      loss = rec + kl_weight * KL + d_weight * disc_factor * g_loss
    discriminator step        loss = disc_factor * D_loss(D(x), D(x_rec.detach()))

with, for a batch of B images x and reconstructions x_rec = decoder(z), z ~ q(z|x) = N(mean, diag(exp(logvar))):

  rec     sum over pixels of |x - x_rec| ('l1', the original) or (x - x_rec)^2 ('l2'), divided by B
  KL      KL(q(z|x) || N(0, I)) = 0.5 * sum_latent(mean^2 + var - 1 - logvar), divided by B (Kingma & Welling
          2014, appendix B). kl_weight = 1e-6 (SD's kl-f8) makes it a light regularizer: the latent stays
          close to a Gaussian in scale but keeps almost all the detail.
  g_loss  -mean(D(x_rec)), for both disc_loss choices (as the original)
  d_weight  adaptive weight of Esser et al. 2021 (VQGAN, eq. 7), computed at the decoder's last layer G_L:
          ||grad_{G_L} rec|| / (||grad_{G_L} g_loss|| + 1e-4), clamped to [0, 1e4], detached, times disc_weight.
          It keeps the adversarial gradient at the output as strong as the reconstruction one, whatever the
          scale of the logits. With adaptive_weight=False, d_weight = disc_weight.
  disc_factor  0 while step < disc_start (the autoencoder first learns to reconstruct), then config.disc_factor
  D_loss  hinge: 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))                (Lim & Ye 2017)
          vanilla: 0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_rec))))        (Goodfellow et al. 2014)

The reductions are the original's: sums per sample, averaged over the batch. That is what gives kl_weight = 1e-6
its meaning (a 256x256 RGB image contributes 196,608 reconstruction terms against 4,096 KL terms of its
32x32x4 latent); with Adam the overall scale of the loss does not matter for the step size.

Differences from the original, all deliberate:
  * no LPIPS (perceptual_weight = 0) and no learned output log-variance: the original's ``logvar`` parameter
    is not in the autoencoder's optimizer, so it stays at its initial 0 and nll = rec.
  * before disc_start the generator step does not run the discriminator at all (its term is multiplied by 0
    in the original; the gradients are identical and the adaptive weight is not computed for nothing).
  * in the generator step the discriminator runs with detached parameters, so the generator's backward
    leaves no gradient on them (the original relies on Lightning's ``toggle_optimizer`` for this).
  * the reconstruction is returned in the generator's logs (``logs["reconstructions"]``, detached), so the
    discriminator step needs no second autoencoder forward (the original runs the VAE once per optimizer).
  * under ``torch.no_grad`` (validation) the adaptive weight cannot be computed; it is 0, as the original's
    ``except RuntimeError`` branch in eval mode.

Usage:

    criterion = VAELoss(VAELossConfig(disc_start=50_001))
    opt_vae = torch.optim.Adam(vae.parameters(), lr, betas=(0.5, 0.9))
    opt_disc = torch.optim.Adam(criterion.discriminator.parameters(), lr, betas=(0.5, 0.9))
    loss, logs = criterion.generator_loss(vae, images, step)
    opt_vae.zero_grad(); loss.backward(); opt_vae.step()
    d_loss, d_logs = criterion.discriminator_loss(logs["reconstructions"], images, step)
    opt_disc.zero_grad(); d_loss.backward(); opt_disc.step()

Data-parallel note: ``vae`` must expose ``moments`` and ``decoder`` (an ``AutoencoderKL``); calling them on a
module wrapped by DistributedDataParallel bypasses the wrapper's forward, so its gradient all-reduce would not
run. A DDP wrapper must therefore wrap a module whose ``forward`` does the reconstruction.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ldm.config import check_choices, choice

from autoencoder.discriminator import DiscriminatorConfig, NLayerDiscriminator
from autoencoder.vae import sample_posterior

ADAPTIVE_EPS = 1e-4  # the denominator's epsilon in taming-transformers / latent-diffusion (the paper says 1e-6)
ADAPTIVE_MAX = 1e4  # clamp of the adaptive weight


@dataclass
class VAELossConfig:
    """Weights of the autoencoder objective; defaults are SD's kl-f8 (``autoencoder_kl_32x32x4.yaml``)."""

    recon: str = choice("l1", "l1", "l2")  # pixel reconstruction term (l1 = the original)
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I))
    disc_weight: float = 0.5  # scale of the adversarial term (times the adaptive weight if enabled)
    disc_start: int = 50_001  # first step (generator and discriminator) at which the GAN terms are on
    disc_factor: float = 1.0  # the GAN terms' factor from disc_start on (0 before)
    disc_loss: str = choice("hinge", "hinge", "vanilla")
    adaptive_weight: bool = True  # VQGAN eq. 7 balancing; False uses d_weight = disc_weight
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def __post_init__(self) -> None:
        check_choices(self, "vae_loss")
        for name in ("kl_weight", "disc_weight", "disc_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"vae_loss.{name} must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))
        if isinstance(self.disc_start, bool) or not isinstance(self.disc_start, int) or self.disc_start < 0:
            raise ValueError(f"vae_loss.disc_start must be an integer step >= 0, got {self.disc_start!r}")
        if not isinstance(self.adaptive_weight, bool):
            raise ValueError(f"vae_loss.adaptive_weight must be a bool, got {self.adaptive_weight!r}")
        if isinstance(self.discriminator, dict):
            self.discriminator = DiscriminatorConfig(**self.discriminator)
        if not isinstance(self.discriminator, DiscriminatorConfig):
            raise ValueError(
                f"vae_loss.discriminator must be a DiscriminatorConfig, got {type(self.discriminator).__name__}"
            )


# ----------------------------------------------------------------------------------------- the terms


def reconstruction_loss(images: Tensor, reconstructions: Tensor, kind: str = "l1") -> Tensor:
    """() sum over C, H, W of |x - x_rec| (l1) or (x - x_rec)^2 (l2), averaged over the batch; float32."""
    diff = images.float() - reconstructions.float()  # (B, C, H, W)
    if kind == "l1":
        per_pixel = diff.abs()
    elif kind == "l2":
        per_pixel = diff.square()
    else:
        raise ValueError(f"kind must be 'l1' or 'l2', got {kind!r}")
    return per_pixel.sum() / images.shape[0]


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """(B,) KL(N(mean, diag(exp(logvar))) || N(0, I)) per sample, closed form (Kingma & Welling 2014, app. B)."""
    mean, logvar = mean.float(), logvar.float()  # (B, z, h, w)
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))]): the hinge GAN loss of Lim & Ye 2017, as taming's."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (E[softplus(-D(x))] + E[softplus(D(x_rec))]) = binary cross-entropy on logits (Goodfellow 2014)."""
    return 0.5 * (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float = 1.0) -> Tensor:
    """() detached VQGAN eq. 7 weight: ||d rec / d G_L|| / (||d g / d G_L|| + 1e-4), clamped to [0, 1e4], * disc_weight.

    last_layer: the weight of the decoder's final layer (``last_layer(vae)``); both losses must depend on it.
    The graph is retained, so both losses can still be backpropagated.
    """
    try:
        rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    except RuntimeError as err:
        raise ValueError(f"last_layer: both losses must depend on it through a graph that requires grad ({err})")
    weight = rec_grad.float().norm() / (g_grad.float().norm() + ADAPTIVE_EPS)
    return weight.clamp(0.0, ADAPTIVE_MAX).detach() * disc_weight


def last_layer(vae: nn.Module) -> Tensor:
    """The weight of the decoder's output convolution, G_L of VQGAN eq. 7 (taming's ``get_last_layer``)."""
    return vae.decoder.conv_out.weight


# ----------------------------------------------------------------------------------------- the loss


class VAELoss(nn.Module):
    """Holds the PatchGAN discriminator and computes the generator and discriminator losses (module docstring)."""

    def __init__(self, config: VAELossConfig | None = None):
        super().__init__()
        self.config = config if config is not None else VAELossConfig()
        if not isinstance(self.config, VAELossConfig):
            raise ValueError(f"config must be a VAELossConfig, got {type(self.config).__name__}")
        self.discriminator = NLayerDiscriminator(self.config.discriminator)

    def disc_factor(self, step: int) -> float:
        """0 before disc_start (taming's ``adopt_weight``), config.disc_factor from then on."""
        _check_step(step)
        return 0.0 if step < self.config.disc_start else self.config.disc_factor

    def reconstruct(
        self, vae: nn.Module, images: Tensor, generator: torch.Generator | list[torch.Generator] | None = None,
        eps: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """images (B, C, H, W) -> (reconstructions (B, C, H, W), mean, logvar (B, z, h, w)) through a posterior sample.

        The VAE's own moments (logvar clamped) and sample_posterior; the sample is decoded unscaled, without the
        inference-time NaN guard of ``AutoencoderKL.decode`` (which synchronizes on every call).
        """
        if not hasattr(vae, "moments") or not hasattr(vae, "decoder"):
            raise ValueError(
                f"vae must be an AutoencoderKL (with moments and decoder), got {type(vae).__name__}; "
                "see the data-parallel note in autoencoder/loss.py"
            )
        mean, logvar = vae.moments(images)  # (B, z, h, w) each
        z = sample_posterior(mean, logvar, generator, eps)
        return vae._decode_z(z), mean, logvar  # (B, C, H, W)

    def generator_loss(
        self,
        vae: nn.Module,
        images: Tensor,
        step: int,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eps: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The autoencoder's loss rec + kl_weight * KL + d_weight * disc_factor * g_loss, and its logs.

        images: (B, C, H, W) in [-1, 1]. step: the global optimization step (compared with disc_start).
        generator: seeds the posterior sample (see ``sample_posterior``); or ``eps``, its standard-normal numbers.
        logs: detached () tensors "loss", "rec_loss", "kl_loss", "g_loss", "d_weight", "disc_factor", and
            "reconstructions" (B, C, H, W), detached, to pass to ``discriminator_loss``.
        """
        _check_images(images, "images")
        c, factor = self.config, self.disc_factor(step)
        reconstructions, mean, logvar = self.reconstruct(vae, images, generator, eps)
        rec_loss = reconstruction_loss(images, reconstructions, c.recon)
        kl_loss = kl_divergence(mean, logvar).mean()  # sum over the batch / B, as the original
        loss = rec_loss + c.kl_weight * kl_loss

        zero = rec_loss.new_zeros(())
        g_loss, d_weight = zero, zero
        if factor > 0 and c.disc_weight > 0:
            logits_fake = self._discriminate_frozen(reconstructions)  # (B, 1, h', w')
            g_loss = -logits_fake.float().mean()
            if not c.adaptive_weight:
                d_weight = zero + c.disc_weight
            elif torch.is_grad_enabled():
                d_weight = adaptive_weight(rec_loss, g_loss, last_layer(vae), c.disc_weight)
            # else: validation under no_grad, d_weight stays 0 (the original's eval-mode fallback)
            loss = loss + d_weight * factor * g_loss

        logs = {
            "loss": loss.detach(),
            "rec_loss": rec_loss.detach(),
            "kl_loss": kl_loss.detach(),
            "g_loss": g_loss.detach(),
            "d_weight": d_weight.detach(),
            "disc_factor": zero + factor,
            "reconstructions": reconstructions.detach(),
        }
        return loss, logs

    def discriminator_loss(
        self, reconstructions: Tensor, images: Tensor, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """disc_factor * D_loss(D(images), D(reconstructions)), both inputs detached, and its logs.

        Runs the discriminator even before disc_start (then the loss is 0 * D_loss, as the original), so
        ``backward`` works at every step. logs: "disc_loss", "logits_real", "logits_fake" (means), "disc_factor".
        """
        _check_images(images, "images")
        _check_images(reconstructions, "reconstructions")
        if reconstructions.shape != images.shape:
            raise ValueError(
                f"reconstructions must have the shape of images {tuple(images.shape)}, "
                f"got {tuple(reconstructions.shape)}"
            )
        factor = self.disc_factor(step)
        logits_real = self.discriminator(images.detach())  # (B, 1, h', w'); two calls, as the original (BatchNorm)
        logits_fake = self.discriminator(reconstructions.detach())
        d_loss = factor * D_LOSSES[self.config.disc_loss](logits_real, logits_fake)
        logs = {
            "disc_loss": d_loss.detach(),
            "logits_real": logits_real.detach().float().mean(),
            "logits_fake": logits_fake.detach().float().mean(),
            "disc_factor": d_loss.new_tensor(factor),
        }
        return d_loss, logs

    def _discriminate_frozen(self, images: Tensor) -> Tensor:
        """D(images) with detached parameters: gradients reach ``images`` only (BatchNorm statistics still update)."""
        disc = getattr(self.discriminator, "module", self.discriminator)  # a DDP / accelerate wrapper's inner module
        params = {name: p.detach() for name, p in disc.named_parameters()}
        return functional_call(disc, params, (images,))


def _check_images(x, name: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[0] == 0:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, C, H, W) tensor with B >= 1, got {got}")


def _check_step(step) -> None:
    try:
        ok = not isinstance(step, bool) and operator.index(step) >= 0  # int, numpy or 0-dim integer tensor
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
