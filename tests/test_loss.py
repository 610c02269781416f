"""The training objective against independent references: diffusers' DDPMScheduler (add_noise, get_velocity)
and training_utils.compute_snr with train_text_to_image's min-SNR lines, and hand-written closed forms
(SNR from betas, the DDPM posterior's Gaussian KL for the discrete ELBO)."""
import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from ldm.denoiser import DiffusionConfig
from ldm.loss import (
    WEIGHTINGS, DiffusionLoss, LossConfig, NoiseDraw, loss_weights, vdm_elbo_constant,
)
from ldm.schedule import DiscreteSchedule, ScheduleConfig
from tests.fakes import fake_net

PREDICTIONS = ["eps", "v", "x0"]
SD = ScheduleConfig()  # scaled_linear 0.00085 .. 0.012, T = 1000
TOY = ScheduleConfig(beta_schedule="linear", num_train_timesteps=10, beta_start=0.01, beta_end=0.3)


def hand_abar(cfg: ScheduleConfig) -> torch.Tensor:
    """(T,) float64 alphas_cumprod written out from the papers' definitions (not via ldm.schedule)."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    else:
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


class Recorder:
    """A network that remembers its inputs and answers with ``fn(x_in, t)``."""

    def __init__(self, fn=fake_net):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, cond=None):
        out = self.fn(x, t, cond)
        self.calls.append((x.clone(), t.clone(), out.clone()))
        return out


def make(prediction="eps", weighting="simple", schedule=SD, net=None, **loss_kw):
    net = net if net is not None else Recorder()
    cfg = DiffusionConfig(schedule=schedule, prediction=prediction)
    return DiffusionLoss(net, cfg, LossConfig(weighting=weighting, **loss_kw)), net


def draw_at(t, shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    return NoiseDraw(
        t=torch.as_tensor(t, dtype=torch.int64),
        noise=torch.randn(shape, generator=g, dtype=dtype),
        offset=torch.randn((B, C, 1, 1), generator=g, dtype=dtype),
        perturbation=torch.randn(shape, generator=g, dtype=dtype),
    )


def x0_batch(B, seed=1, dtype=torch.float64, shape=(2, 3, 3)):
    return torch.randn((B, *shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ddpm_with(schedule: DiscreteSchedule) -> DDPMScheduler:
    """diffusers' DDPM given our float64 alphas_cumprod: the schedule itself is compared with diffusers in
    tests/test_schedule.py (float32 there, ~2e-6); here only the noising / target formulas are."""
    ref = DDPMScheduler(num_train_timesteps=schedule.num_train_timesteps)
    ref.alphas_cumprod = schedule.alphas_cumprod.clone()
    return ref


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("kw, arg", [
    (dict(weighting="p2"), "loss.weighting"),
    (dict(min_snr_gamma=0.0), "loss.min_snr_gamma"),
    (dict(noise_offset=-0.1), "loss.noise_offset"),
    (dict(input_perturbation=float("nan")), "loss.input_perturbation"),
])
def test_config_rejects_bad_values(kw, arg):
    with pytest.raises(ValueError, match=arg):
        LossConfig(**kw)


# ------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("gamma", [1.0, 5.0])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_matches_diffusers_train_text_to_image(prediction, gamma):
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.arange(1000)
    snr = compute_snr(ref, timesteps)  # float32, as in the example script
    w = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    w = w / snr if prediction == "eps" else w / (snr + 1)
    ours = loss_weights(DiscreteSchedule(alphas_cumprod=ref.alphas_cumprod), prediction, LossConfig("min_snr", gamma))
    # same alphas_cumprod; diffusers' float32 sqrt / divide / square: a few ulp
    torch.testing.assert_close(ours, w.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_weights_match_hand_formulas(weighting, prediction):
    abar = hand_abar(SD)
    snr = abar / (1 - abar)
    g = 5.0
    prev = torch.cat([snr[:1], snr[:-1]])  # SNR(t-1); the t = 0 entry is zeroed below
    hand = {
        ("simple", "eps"): torch.ones_like(snr),
        ("simple", "v"): torch.ones_like(snr),
        ("simple", "x0"): torch.ones_like(snr),
        ("min_snr", "eps"): snr.clamp(max=g) / snr,
        ("min_snr", "v"): snr.clamp(max=g) / (snr + 1),
        ("min_snr", "x0"): snr.clamp(max=g),
        ("vdm", "eps"): prev / snr - 1,
        ("vdm", "v"): (prev - snr) / (snr + 1),
        ("vdm", "x0"): prev - snr,
    }[(weighting, prediction)]
    if weighting == "vdm":
        hand[0] = 0.0  # the decoder term L_0 is not a diffusion term
        hand = hand / hand.mean()
    ours = loss_weights(DiscreteSchedule(SD), prediction, LossConfig(weighting, g))
    # float64 both; 1/sigma^2 vs abar/(1-abar) and the differences SNR(t-1) - SNR(t) lose a few digits
    torch.testing.assert_close(ours, hand, rtol=1e-9, atol=0)
    # the same table reaches the loss output
    loss, _ = make(prediction, weighting)
    out = loss(x0_batch(6), None, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.weights, hand[out.timesteps].to(out.weights.dtype), rtol=1e-9, atol=0)


def test_vdm_weights_average_one_and_x0_constant_telescopes():
    sched = DiscreteSchedule(SD)
    abar = hand_abar(SD)
    snr = abar / (1 - abar)
    for p in PREDICTIONS:
        w = loss_weights(sched, p, LossConfig("vdm"))
        assert abs(float(w.mean()) - 1) < 1e-12 and w[0] == 0 and bool((w[1:] > 0).all())
    assert math.isclose(vdm_elbo_constant(sched, "x0"), float(snr[0] - snr[-1]) / 2, rel_tol=1e-9)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_zero_terminal_snr_is_finite_everywhere(prediction):
    zt = ScheduleConfig(zero_terminal_snr=True)
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    assert compute_snr(ref, torch.tensor([999]))[0] == 0  # SNR really is 0 at the last step
    if prediction == "eps":  # diffusers' min(SNR, gamma) / SNR is 0/0 there; ours is the limit, 1
        assert torch.isnan(torch.minimum(torch.zeros(1), torch.full((1,), 5.0)) / 0).all()
        assert loss_weights(DiscreteSchedule(zt), "eps", LossConfig("min_snr"))[-1] == 1
    x0 = x0_batch(3)
    for weighting in WEIGHTINGS:
        w = loss_weights(DiscreteSchedule(zt), prediction, LossConfig(weighting))
        assert bool(torch.isfinite(w).all()) and bool((w >= 0).all())
        loss, _ = make(prediction, weighting, schedule=zt, noise_offset=0.1, input_perturbation=0.1)
        out = loss.compute(x0, None, draw_at([999, 998, 0], x0.shape))
        assert bool(torch.isfinite(out.per_sample).all()) and bool(torch.isfinite(out.loss))


# ------------------------------------------------------------------------------------------ noised input, target


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_network_input_is_ddpm_add_noise(prediction):
    loss, rec = make(prediction)
    ref = ddpm_with(loss.schedule)
    t = [0, 1, 250, 500, 998, 999]
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        x0 = x0_batch(len(t), dtype=dtype)
        d = draw_at(t, x0.shape, dtype=dtype)
        loss.compute(x0, None, d)
        x_in, t_in, _ = rec.calls[-1]
        want = ref.add_noise(x0, d.noise, d.t)  # sqrt(abar) x0 + sqrt(1 - abar) noise
        assert x_in.dtype == dtype
        torch.testing.assert_close(x_in, want, rtol=tol, atol=tol)
        assert torch.equal(t_in, d.t.to(t_in.dtype))  # integer timesteps, exactly (log-sigma round trip)


def test_zero_terminal_snr_last_step_input_is_the_schedules_terminal_sigma():
    """The schedule stores abar_T = 2**-24 (not 0) so sigma stays finite: the last step's input carries
    2**-12 x0 instead of being pure noise, the same terminal sigma the samplers start from."""
    loss, rec = make("v", schedule=ScheduleConfig(zero_terminal_snr=True))
    x0 = x0_batch(1)
    d = draw_at([999], x0.shape)
    loss.compute(x0, None, d)
    want = 2.0**-12 * x0 + math.sqrt(1 - 2.0**-24) * d.noise
    torch.testing.assert_close(rec.calls[-1][0], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_oracle_network_has_zero_loss(prediction, weighting):
    x0 = x0_batch(5)
    t = torch.tensor([0, 3, 400, 871, 999])
    d = draw_at(t, x0.shape)
    noise = d.noise + 0.1 * d.offset  # the offset noise is the target's noise
    sched = DiscreteSchedule(SD)
    ref = ddpm_with(sched)
    oracle = {"eps": noise, "v": ref.get_velocity(x0, noise, t), "x0": x0}[prediction]
    loss, _ = make(prediction, weighting, net=lambda x, tt, c: oracle, noise_offset=0.1)
    out = loss.compute(x0, None, d)
    assert float(out.loss) < 1e-24 and out.per_sample.shape == (5,)
    wrong = oracle + 0.01
    loss, _ = make(prediction, weighting, net=lambda x, tt, c: wrong, noise_offset=0.1)
    assert float(loss.compute(x0, None, d).loss) > 1e-8  # the check can fail


def test_noise_offset_and_input_perturbation_change_only_their_part():
    x0 = x0_batch(4)
    t = torch.tensor([5, 100, 600, 999])
    d = draw_at(t, x0.shape)
    abar = DiscreteSchedule(SD).alphas_cumprod[t].view(-1, 1, 1, 1)
    zero = lambda x, tt, c: torch.zeros_like(x)  # noqa: E731 - per-sample loss = mean(target^2): shows the target

    def run(**kw):
        loss, rec = make("eps", net=Recorder(zero), **kw)
        out = loss.compute(x0, None, d)
        return out, rec.calls[-1][0]

    base, x_base = run()
    off, x_off = run(noise_offset=0.1)
    pert, x_pert = run(input_perturbation=0.2)
    # offset: one constant per (sample, channel), in the input and in the target alike
    torch.testing.assert_close(x_off - x_base, (1 - abar).sqrt() * 0.1 * d.offset.expand_as(x0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(off.per_sample, (d.noise + 0.1 * d.offset).square().mean((1, 2, 3)), rtol=1e-12, atol=0)
    # perturbation: the input only (Ning et al. 2023); the target keeps the original noise
    torch.testing.assert_close(x_pert - x_base, (1 - abar).sqrt() * 0.2 * d.perturbation, rtol=1e-12, atol=1e-12)
    assert torch.equal(pert.per_sample, base.per_sample)
    torch.testing.assert_close(base.per_sample, d.noise.square().mean((1, 2, 3)), rtol=1e-12, atol=0)
    # and the random stream does not depend on the options
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a, _ = make("eps")
    b, _ = make("v", "min_snr", noise_offset=0.1, input_perturbation=0.1)
    da, db = a.draw(x0, g()), b.draw(x0, g())
    assert all(torch.equal(getattr(da, k), getattr(db, k)) for k in ("t", "noise", "offset", "perturbation"))


# ------------------------------------------------------------------------------------------ randomness


def test_generator_determinism_and_per_sample_generators():
    loss, _ = make("v", "min_snr")
    x0 = x0_batch(3, dtype=torch.float32)
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a, b = loss(x0, None, gen(0)), loss(x0, None, gen(0))
    assert torch.equal(a.per_sample, b.per_sample) and torch.equal(a.timesteps, b.timesteps)
    assert not torch.equal(loss(x0, None, gen(1)).per_sample, a.per_sample)
    # one generator per sample: sample i's loss does not depend on its batch
    batch = loss(x0, None, [gen(10), gen(11), gen(12)])
    for i in range(3):
        alone = loss(x0[i : i + 1], None, [gen(10 + i)])
        assert torch.equal(alone.per_sample[0], batch.per_sample[i])
        assert alone.timesteps[0] == batch.timesteps[i]
    with pytest.raises(ValueError, match="generator"):
        loss(x0, None, [gen(0)])
    with pytest.raises(ValueError, match="generator"):
        loss(x0, None, 3)


def test_timesteps_are_uniform_over_the_training_timesteps():
    loss, _ = make(schedule=TOY)
    d = loss.draw(torch.zeros(20000, 1, 1, 1), torch.Generator().manual_seed(0))
    counts = torch.bincount(d.t, minlength=10)
    assert d.t.min() == 0 and d.t.max() == 9 and len(counts) == 10
    # binomial(20000, 0.1): mean 2000, sd ~42; 5 sd
    assert bool(((counts - 2000).abs() < 5 * 42.5).all()), counts


# ------------------------------------------------------------------------------------------ the ELBO


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_vdm_weighting_is_the_discrete_elbo_diffusion_term(prediction):
    """Ho et al. 2020 eq. 5: L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), p with the posterior's
    variance and x0 replaced by the network's x0_hat; summed over t = 1 .. T-1 it is the diffusion term."""
    T = TOY.num_train_timesteps
    betas = torch.linspace(TOY.beta_start, TOY.beta_end, T, dtype=torch.float64)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    x0_one = x0_batch(1)
    x0 = x0_one.expand(T, -1, -1, -1).contiguous()
    d = draw_at(torch.arange(T), x0.shape)
    loss, rec = make(prediction, "vdm", schedule=TOY)
    out = loss.compute(x0, None, d)
    x_t, _, pred = rec.calls[-1]  # the VP sample x_t and the network's prediction

    elbo = torch.zeros((), dtype=torch.float64)
    for t in range(T):
        a, s = abar[t], (1 - abar[t]).sqrt()
        x0_hat = {  # Ho et al. 2020 eq. 15 / Salimans & Ho 2022, written from the VP sample
            "eps": (x_t[t] - s * pred[t]) / a.sqrt(),
            "v": a.sqrt() * x_t[t] - s * pred[t],
            "x0": pred[t],
        }[prediction]
        if t == 0:
            assert out.per_sample[0] == 0  # the decoder term L_0 is not part of it
            continue
        c0 = abar[t - 1].sqrt() * betas[t] / (1 - abar[t])  # posterior mean coefficients, Ho et al. eq. 7
        ct = alphas[t].sqrt() * (1 - abar[t - 1]) / (1 - abar[t])
        var = betas[t] * (1 - abar[t - 1]) / (1 - abar[t])
        mu_q, mu_p = c0 * x0[t] + ct * x_t[t], c0 * x0_hat + ct * x_t[t]
        kl = (mu_q - mu_p).square().sum() / (2 * var)
        D = x0[t].numel()
        # each sample: its KL term is D * kappa / T * per_sample
        torch.testing.assert_close(D * vdm_elbo_constant(loss.schedule, prediction) / T * out.per_sample[t], kl,
                                   rtol=1e-9, atol=1e-12)
        elbo = elbo + kl
    # every t once in the batch, so the batch mean is E_t: ELBO diffusion term = D * kappa * E[loss]
    D = x0_one.numel()
    torch.testing.assert_close(D * vdm_elbo_constant(loss.schedule, prediction) * out.loss, elbo, rtol=1e-9, atol=0)
    assert float(elbo) > 1e-3  # the toy network is not perfect: a non-trivial comparison


# ------------------------------------------------------------------------------------------ interface


def test_sigma_time_input_and_low_precision_latents():
    rec = Recorder()
    loss = DiffusionLoss(rec, DiffusionConfig(time_input="sigma"), LossConfig())
    x0 = x0_batch(2, dtype=torch.bfloat16)
    out = loss.compute(x0, None, draw_at([10, 700], x0.shape, dtype=torch.float32))
    x_in, t_in, _ = rec.calls[-1]
    sig = DiscreteSchedule(SD).sigmas[[10, 700]]
    assert x_in.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    torch.testing.assert_close(t_in, sig.float(), rtol=1e-7, atol=0)
    torch.testing.assert_close(out.sigmas, sig.float(), rtol=1e-7, atol=0)


def test_bad_inputs_are_named():
    loss, _ = make()
    x0 = x0_batch(2)
    with pytest.raises(ValueError, match="draw.t"):
        loss.compute(x0, None, draw_at([0, 1000], x0.shape))
    d = draw_at([0, 1], x0.shape)
    with pytest.raises(ValueError, match="draw.t"):
        loss.compute(x0, None, NoiseDraw(d.t.double(), d.noise, d.offset, d.perturbation))
    with pytest.raises(ValueError, match="draw.noise"):
        loss.compute(x0, None, NoiseDraw(d.t, d.noise[:, :1], d.offset, d.perturbation))
    with pytest.raises(ValueError, match="x0"):
        loss(torch.zeros(3), None)
    bad, _ = make(net=lambda x, t, c: x[:, :1])
    with pytest.raises(ValueError, match="net"):
        bad(x0, None)
