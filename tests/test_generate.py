"""The shared sampling loop: equals composing the core pieces by hand, and each latent depends only on its seed."""
import pytest
import torch

from ldm.conditioning import Cond
from ldm.denoiser import Denoiser
from ldm.generate import sample_latents
from ldm.guidance import cfg
from ldm.samplers import get_sampler, per_sample_noise
from ldm.samplers.config import SamplerConfig, make_sigmas
from ldm.schedule import DiscreteSchedule


def net(x, t, cond):
    c = cond.context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    return torch.tanh(x * (1 + c)) + 0.1 * c + 1e-3 * t.reshape(-1, 1, 1, 1)


def conds(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Cond(context=torch.randn(n, 3, 8, generator=g)), Cond(context=torch.zeros(n, 3, 8))


def test_equals_the_pieces_composed_by_hand():
    den = Denoiser(net, DiscreteSchedule())
    sc = SamplerConfig(name="euler_ancestral", steps=6, cfg_scale=4.0, guidance_rescale=0.5)
    c, u = conds(2)
    out = sample_latents(den, c, u, sc, [5, 9], (4, 8, 8))
    gens = [torch.Generator().manual_seed(s) for s in (5, 9)]
    noise = torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens])
    sigmas = make_sigmas(den.schedule, sc)
    x = noise * (1 + float(sigmas[0]) ** 2) ** 0.5
    ref = get_sampler("euler_ancestral")(cfg(den, c, u, 4.0, 0.5), x, sigmas, noise=per_sample_noise(gens, x))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "ddim", "unipc"])
def test_each_latent_depends_only_on_its_seed(name):
    den = Denoiser(net, DiscreteSchedule())
    sc = SamplerConfig(name=name, steps=5, cfg_scale=3.0)
    c, u = conds(3)
    batch = sample_latents(den, c, u, sc, [1, 2, 3], (4, 8, 8))
    for k, s in enumerate([1, 2, 3]):
        alone = sample_latents(den, Cond(context=c.context[k : k + 1]), Cond(context=u.context[k : k + 1]), sc, [s], (4, 8, 8))
        assert torch.equal(batch[k : k + 1], alone)


def test_bad_seeds():
    den = Denoiser(net, DiscreteSchedule())
    with pytest.raises(ValueError, match="seeds is empty"):
        sample_latents(den, None, None, SamplerConfig(name="euler"), [], (4, 8, 8))
