"""Classifier-free guidance: exact at scale 1, one batched call per step, rescale per its formula."""
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from ldm.conditioning import Cond
from ldm.denoiser import Denoiser
from ldm.guidance import cfg, guide
from ldm.samplers import get_sampler
from ldm.schedule import DiscreteSchedule


class CondNet(torch.nn.Module):
    """A network whose output depends on the context, counting its calls and batch sizes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, cond):
        self.calls.append(x.shape[0])
        c = cond.context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return torch.tanh(x * (1 + c)) + 0.1 * c + 1e-3 * t.reshape(-1, 1, 1, 1)


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * 3
    cond = Cond(context=torch.randn(2, 5, 16, generator=g, dtype=torch.float64))
    uncond = Cond(context=torch.randn(2, 5, 16, generator=g, dtype=torch.float64))
    img = Cond(context=torch.randn(2, 5, 16, generator=g, dtype=torch.float64))
    net = CondNet()
    return x, cond, uncond, img, net, Denoiser(net, DiscreteSchedule(), "eps")


def test_scale_one_is_exactly_the_conditional_denoiser():
    x, cond, uncond, _, net, den = make()
    sigma = torch.full((2,), 3.0, dtype=torch.float64)
    assert torch.equal(cfg(den, cond, uncond, 1.0)(x, sigma), den(x, sigma, cond))
    assert torch.equal(cfg(den, cond, uncond, 0.0)(x, sigma), den(x, sigma, uncond))


def test_cfg_formula_and_one_batched_call_per_step():
    x, cond, uncond, _, net, den = make()
    sigma = torch.full((2,), 3.0, dtype=torch.float64)
    ref = den(x, sigma, uncond) + 7.5 * (den(x, sigma, cond) - den(x, sigma, uncond))
    net.calls.clear()
    out = cfg(den, cond, uncond, 7.5)(x, sigma)
    assert net.calls == [4]  # cond and uncond in one call of batch 2B
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    net.calls.clear()
    sigmas = DiscreteSchedule().sample_sigmas(6)
    get_sampler("euler")(cfg(den, cond, uncond, 5.0), x, sigmas)
    assert net.calls == [4] * 6


def test_rescale_matches_diffusers_formula():
    x, cond, uncond, _, net, den = make()
    s = 2.5
    sigma = torch.full((2,), s, dtype=torch.float64)
    eps_c = (x - den(x, sigma, cond)) / s
    eps_u = (x - den(x, sigma, uncond)) / s
    eps_cfg = eps_u + 6.0 * (eps_c - eps_u)
    ref_eps = rescale_noise_cfg(eps_cfg, eps_c, guidance_rescale=0.7)
    out = cfg(den, cond, uncond, 6.0, rescale=0.7)(x, sigma)
    torch.testing.assert_close(out, x - s * ref_eps, rtol=1e-12, atol=1e-12)


def test_two_conditions_with_separate_scales_instructpix2pix():
    x, cond, uncond, img, net, den = make()
    sigma = torch.full((2,), 1.5, dtype=torch.float64)
    d0, d1, d2 = den(x, sigma, uncond), den(x, sigma, img), den(x, sigma, cond)
    net.calls.clear()
    out = guide(den, [uncond, img, cond], [1.5, 7.0])(x, sigma)
    assert net.calls == [6]
    torch.testing.assert_close(out, d0 + 1.5 * (d1 - d0) + 7.0 * (d2 - d1), rtol=1e-12, atol=1e-12)
    out = guide(den, [uncond, img, cond], [1.5, 7.0], chain=False)(x, sigma)
    torch.testing.assert_close(out, d0 + 1.5 * (d1 - d0) + 7.0 * (d2 - d0), rtol=1e-12, atol=1e-12)


def test_bad_guidance_arguments():
    x, cond, uncond, _, net, den = make()
    with pytest.raises(ValueError, match="rescale must be in"):
        cfg(den, cond, uncond, 7.0, rescale=1.5)
    with pytest.raises(ValueError, match="K\\+1 conditions"):
        guide(den, [uncond, cond], [1.0, 2.0])
    with pytest.raises(ValueError, match="missing in others"):
        cfg(den, cond, Cond(), 7.0)
