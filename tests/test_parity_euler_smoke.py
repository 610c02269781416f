import torch
from diffusers import EulerDiscreteScheduler

from ldm.denoiser import Denoiser
from ldm.samplers import sample_euler
from ldm.schedule import DiscreteSchedule, ScheduleConfig
from tests.fakes import SD_SCHEDULE, drive_diffusers, fake_net, rel_err


def test_euler_matches_diffusers_leading():
    sched = EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1)
    ours = DiscreteSchedule(ScheduleConfig())
    den = Denoiser(fake_net, ours, "eps")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sched.set_timesteps(25)
    ref, _ = drive_diffusers(sched, 25, noise * sched.init_noise_sigma)
    sigmas = ours.sample_sigmas(25, "leading", steps_offset=1)
    assert torch.allclose(sigmas.float(), sched.sigmas.float(), rtol=1e-5)  # diffusers builds its table in float32
    x = sample_euler(den, noise * float(sched.init_noise_sigma), sigmas)
    assert rel_err(x, ref) < 1e-5
