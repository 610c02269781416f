"""What every sampler promises: one signature, a callback per step, batch-independent noise, clear errors."""
import pytest
import torch

from ldm.denoiser import Denoiser
from ldm.samplers import SAMPLERS, STOCHASTIC, get_sampler, per_sample_noise, randn_per_sample
from ldm.schedule import DiscreteSchedule
from tests.fakes import fake_net

ALL = sorted(SAMPLERS)


def setup(batch_seeds, steps=6):
    sched = DiscreteSchedule()
    den = Denoiser(fake_net, sched)
    sigmas = sched.sample_sigmas(steps, "trailing")
    gens = [torch.Generator().manual_seed(s) for s in batch_seeds]
    x = randn_per_sample(gens, (4, 8, 8), "cpu", torch.float64) * float(sigmas[0])
    return den, sigmas, x, gens


def test_all_samplers_of_the_issue_are_registered():
    assert set(ALL) == {"ddpm", "ddim", "plms", "lms", "euler", "euler_ancestral", "heun", "dpm2", "dpmpp_2m",
                        "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc"}


@pytest.mark.parametrize("name", ALL)
def test_image_does_not_depend_on_its_batch(name):
    opts = {"eta": 1.0} if name == "ddim" else {}
    den, sigmas, x, gens = setup([11, 22, 33])
    batch = get_sampler(name)(den, x, sigmas, noise=per_sample_noise(gens, x), **opts)
    for k, seed in enumerate([11, 22, 33]):
        d1, s1, x1, g1 = setup([seed])
        alone = get_sampler(name)(d1, x1, s1, noise=per_sample_noise(g1, x1), **opts)
        assert torch.equal(batch[k : k + 1], alone), (name, k)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_samplers_depend_on_the_seed(name):
    opts = {"eta": 1.0} if name == "ddim" else {}
    den, sigmas, x, _ = setup([1])
    a = get_sampler(name)(den, x, sigmas, noise=per_sample_noise([torch.Generator().manual_seed(5)], x), **opts)
    b = get_sampler(name)(den, x, sigmas, noise=per_sample_noise([torch.Generator().manual_seed(6)], x), **opts)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", ALL)
def test_callback_once_per_step_with_the_schedule(name):
    den, sigmas, x, gens = setup([0], steps=5)
    seen = []
    get_sampler(name)(den, x, sigmas, noise=per_sample_noise(gens, x), callback=seen.append)
    assert [s.i for s in seen] == list(range(5))
    assert [s.sigma for s in seen] == pytest.approx(sigmas[:-1].tolist())
    assert all(s.denoised.shape == x.shape for s in seen)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("sigmas, msg", [([1.0], "at least 2"), ([2.0, 3.0, 0.0], "high to low"), ([1.0, -1.0], ">= 0")])
def test_bad_sigmas_are_refused(name, sigmas, msg):
    den, _, x, _ = setup([0])
    with pytest.raises(ValueError, match=msg):
        get_sampler(name)(den, x, torch.tensor(sigmas, dtype=torch.float64))


def test_unknown_sampler_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown sampler 'k_euler'.*dpmpp_2m.*unipc"):
        get_sampler("k_euler")


@pytest.mark.parametrize("name", ALL)
def test_half_precision_latents_run(name):
    den, sigmas, x, gens = setup([0], steps=4)
    out = get_sampler(name)(den, x.to(torch.bfloat16), sigmas, noise=per_sample_noise(gens, x.to(torch.bfloat16)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
