"""img2img strength and mask-blended inpainting against diffusers' conventions."""
import pytest
import torch
from diffusers import DDIMScheduler

from ldm.denoiser import Denoiser
from ldm.img2img import blend_known, inpaint_denoiser, noised, strength_sigmas
from ldm.samplers import get_sampler
from ldm.schedule import DiscreteSchedule
from tests.fakes import SD_SCHEDULE, fake_net


@pytest.mark.parametrize("steps, strength", [(50, 0.75), (25, 0.3), (10, 1.0), (7, 0.5)])
def test_strength_keeps_the_steps_diffusers_keeps(steps, strength):
    ref = DDIMScheduler(**SD_SCHEDULE, steps_offset=1)
    ref.set_timesteps(steps)
    init = min(int(steps * strength), steps)  # StableDiffusionImg2ImgPipeline.get_timesteps
    ref_t = ref.timesteps[steps - init:]
    sched = DiscreteSchedule(alphas_cumprod=ref.alphas_cumprod)
    sig = strength_sigmas(sched.sample_sigmas(steps, "leading", steps_offset=1), strength)
    assert len(sig) == len(ref_t) + 1
    assert sched.sigma_to_t(sig[:-1]).round().long().tolist() == ref_t.tolist()


@pytest.mark.parametrize("strength, msg", [(1.5, r"in \[0, 1\]"), (-0.1, r"in \[0, 1\]"), (0.01, "rounds to zero"), ("x", "number")])
def test_bad_strength(strength, msg):
    with pytest.raises(ValueError, match=msg):
        strength_sigmas(DiscreteSchedule().sample_sigmas(20), strength)


def test_inpaint_keeps_the_known_region_and_sees_the_forward_process():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    mask[..., 2:6, 2:6] = 1
    seen = []

    def net(x, t, cond=None):
        seen.append(x.clone())
        return fake_net(x, t)

    sched = DiscreteSchedule()
    den = Denoiser(net, sched)
    sigmas = sched.sample_sigmas(10)
    x = noised(z0, noise, float(sigmas[0]))
    out = blend_known(get_sampler("euler")(inpaint_denoiser(den, z0, mask, noise), x, sigmas), z0, mask)
    keep = mask.expand_as(z0) == 0
    assert torch.equal(out[keep], z0[keep])
    for x_in, s in zip(seen, sigmas[:-1].tolist()):  # network input = c_in * (z0 + sigma * noise) where kept
        exp = (z0 + s * noise) / (1 + s**2) ** 0.5
        torch.testing.assert_close(x_in[keep], exp[keep], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[~keep], z0[~keep])


def test_bad_mask_shape():
    z0 = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="mask must have shape"):
        inpaint_denoiser(lambda x, s: x, z0, torch.ones(2, 1, 4, 4), z0)
