"""ldm.analysis and analytical teleportation, each against a Gaussian toy whose answer is known in closed form.

For x0 ~ N(mu, Sigma) the ideal denoiser is linear and the probability-flow ODE dx/ds = (x - D(x, s)) / s solves
to (x_s - mu)_i = (x_S - mu)_i sqrt((lam_i + s^2) / (lam_i + S^2)) in Sigma's eigenbasis. The references below
are written independently of ldm.analysis (dense matrices, explicit formulas); the tolerances name their source.
Everything runs in float64 on tiny tensors (the whole file takes a few seconds).
"""
from __future__ import annotations

import math

import pytest
import torch

from ldm.analysis import (GaussianFit, band_energy, fit_gaussian, load_gaussian, perturbation_sensitivity,
                          record_trajectory, save_gaussian, settle_step, trajectory_geometry)  # fmt: skip
from ldm.samplers import get_sampler
from ldm.samplers.config import SamplerConfig, configured_sampler
from ldm.samplers.teleport import teleported_sampling, with_teleport
from ldm.schedule import karras_sigmas

SHAPE = (1, 4, 4)  # D = 16
D = 16


def toy(seed=0, eigvals=(4.0, 1.0, 0.25), nu=0.01, mean_scale=0.5) -> GaussianFit:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    lam = torch.tensor(eigvals, dtype=torch.float64)
    mean = mean_scale * torch.randn(D, generator=g, dtype=torch.float64)
    return GaussianFit(mean, q[:, : len(eigvals)].contiguous(), lam, nu, SHAPE)


def dense_cov(fit: GaussianFit) -> torch.Tensor:
    u = fit.eigvecs
    return u @ torch.diag(fit.eigvals) @ u.T + fit.noise_var * (torch.eye(fit.dim, dtype=torch.float64) - u @ u.T)


def sched(n, hi=80.0, lo=0.002, final=0.0):
    return torch.cat([karras_sigmas(n, lo, hi), torch.tensor([final], dtype=torch.float64)])


def start(fit, b=3, sigma=80.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return fit.mean.reshape(SHAPE) + sigma * torch.randn(b, *SHAPE, generator=g, dtype=torch.float64)


def denoise_of(fit):
    return lambda x, sigma: fit.denoise(x, sigma)


# ------------------------------------------------------------------------------------------ the Gaussian


def test_denoiser_and_closed_form_match_dense_formulas():
    fit = toy()
    cov, mu = dense_cov(fit), fit.mean
    x = start(fit, sigma=3.0)
    eye = torch.eye(D, dtype=torch.float64)
    for s in (0.05, 1.0, 7.0):
        ref = mu + (cov @ torch.linalg.solve(cov + s**2 * eye, (x.reshape(3, D) - mu).T)).T  # the Wiener filter
        assert torch.allclose(fit.denoise(x, s).reshape(3, D), ref, atol=1e-10)
    # teleport = mu + (Sigma + s^2)^(1/2) (Sigma + S^2)^(-1/2) (x - mu), via a dense eigendecomposition
    w, v = torch.linalg.eigh(cov)
    for a, b in ((80.0, 2.0), (5.0, 0.0), (1.0, 0.3)):
        m = v @ torch.diag(((w + b**2) / (w + a**2)).sqrt()) @ v.T
        ref = mu + (m @ (x.reshape(3, D) - mu).T).T
        assert torch.allclose(fit.teleport(x, a, b).reshape(3, D), ref, atol=1e-10)


def test_teleport_is_the_pf_ode_solution_to_solver_error():
    """A fine Heun solve of the PF-ODE with the ideal denoiser converges to the closed form at 2nd order."""
    fit = toy()
    x = start(fit)
    heun = get_sampler("heun")
    lo = 0.5  # stop above 0: Heun's last step to 0 is an Euler step (EDM Alg. 2)
    exact = fit.teleport(x, 80.0, lo)
    errs = []
    for n in (32, 64, 128):
        sig = karras_sigmas(n + 1, lo, 80.0)  # n steps from 80 to 0.5
        errs.append(float((heun(denoise_of(fit), x, sig) - exact).norm() / exact.norm()))
    assert errs[-1] < 3e-4, errs  # measured 2.0e-4 at 128 steps (3.3e-3, 8.2e-4 at 32, 64)
    assert errs[1] < errs[0] / 3 and errs[2] < errs[1] / 3, errs  # 2nd order: /4 per halving, 3 for margin


def test_teleport_plus_sampler_equals_sampler_alone_on_gaussian_data():
    fit = toy()
    x = start(fit)
    sig = sched(200)
    exact = fit.teleport(x, 80.0, 0.0)
    for name in ("heun", "dpmpp_2m", "euler"):
        sampler = get_sampler(name)
        plain = sampler(denoise_of(fit), x, sig)
        tele = with_teleport(sampler, 0.4, fit)(denoise_of(fit), x, sig)
        scale = float(exact.norm())
        tol = 2e-2 if name == "euler" else 2e-3  # 1st-order Euler over 200 Karras steps vs 2nd-order solvers
        assert float((plain - exact).norm()) / scale < tol, name
        assert float((tele - exact).norm()) / scale < tol, name
        assert float((tele - plain).norm()) / scale < tol, name
    # fraction 0 is the sampler itself, bit for bit; fraction 1 is the closed form alone
    heun = get_sampler("heun")
    assert torch.equal(with_teleport(heun, 0.0, fit)(denoise_of(fit), x, sig), heun(denoise_of(fit), x, sig))
    assert torch.allclose(teleported_sampling(heun, denoise_of(fit), x, sig, 1.0, fit), exact, atol=1e-12)


def test_teleport_saves_the_steps_and_shifts_the_callback():
    fit = toy()
    x = start(fit)
    sig = sched(10)
    calls, seen = [0], []

    def denoise(x, sigma):
        calls[0] += 1
        return fit.denoise(x, sigma)

    configured = configured_sampler(SamplerConfig(name="euler", teleport=0.3), fit)
    configured(denoise, x, sig, callback=lambda st: seen.append((st.i, st.sigma)))
    assert calls[0] == 7  # round(0.3 * 10) = 3 of 10 Euler steps teleported
    assert [i for i, _ in seen] == list(range(3, 10)) and seen[0][1] == float(sig[3])
    with pytest.raises(ValueError, match="teleport"):
        SamplerConfig(teleport=1.5)
    with pytest.raises(ValueError, match="Gaussian"):
        with_teleport(get_sampler("euler"), 0.5, None)(denoise, x, sig)


def test_fit_recovers_mean_eigenpairs_and_remainder(tmp_path):
    true = toy(seed=3, eigvals=(9.0, 4.0, 1.0), nu=0.1, mean_scale=1.0)
    n = 20000
    g = torch.Generator().manual_seed(7)
    chol = torch.linalg.cholesky(dense_cov(true))  # independent of GaussianFit.sample
    data = true.mean + torch.randn(n, D, generator=g, dtype=torch.float64) @ chol.T
    fit = fit_gaussian(data.reshape(n, *SHAPE), rank=3)
    # mean: standard error sqrt(tr Sigma / N) for the whole vector; 4 standard errors
    assert float((fit.mean - true.mean).norm()) < 4 * math.sqrt(float(dense_cov(true).trace()) / n)
    # eigenvalues: relative standard error sqrt(2 / N) (Anderson 1963); 5 of them
    assert torch.allclose(fit.eigvals, true.eigvals, rtol=5 * math.sqrt(2 / n))
    # eigenvectors: angle error ~ sqrt(l_i l_j / ((l_i - l_j)^2 N)) <= 0.01 here; |cos| > 0.999 allows ~0.045 rad
    cos = (fit.eigvecs * true.eigvecs).sum(0).abs()
    assert bool((cos > 0.999).all()), cos
    assert abs(fit.noise_var - 0.1) < 0.1 * 5 * math.sqrt(2 / (n * (D - 3)))  # 13 pooled directions
    save_gaussian(fit, tmp_path / "g.safetensors")
    back = load_gaussian(tmp_path / "g.safetensors")
    assert torch.equal(back.eigvecs, fit.eigvecs) and back.noise_var == fit.noise_var and back.shape == SHAPE


# ------------------------------------------------------------------------------------------ geometry


def test_trajectory_geometry_on_rank_one_data_is_planar_with_the_analytic_angle():
    """Data on a line through 0 (rank 1, mean 0): every state lies in span(e, x_T's orthogonal part), a plane
    through the origin, so the top-2 share is 1 and the projected rotation is the full-space angle between
    y_0 = x_T / sqrt(1 + S^2) and the sample, which lies on the line: arccos(|<x_T, e>| / |x_T|)."""
    d = 64
    g = torch.Generator().manual_seed(0)
    e = torch.randn(d, generator=g, dtype=torch.float64)
    e /= e.norm()
    fit = GaussianFit(torch.zeros(d, dtype=torch.float64), e[:, None], torch.tensor([2.0], dtype=torch.float64),
                      0.0, (d,))  # fmt: skip
    x = 80.0 * torch.randn(4, d, generator=g, dtype=torch.float64)
    traj = record_trajectory(get_sampler("euler"), denoise_of(fit), x, sched(30))
    geo = trajectory_geometry(traj.vp_states())
    analytic = torch.rad2deg(torch.acos((x @ e).abs() / x.norm(dim=1)))
    assert torch.allclose(geo["top2_fraction"], torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(geo["endpoint_angle_deg"], analytic, atol=1e-3)  # float32 storage of the states
    assert torch.allclose(geo["angle_deg"], analytic, atol=1e-3)  # monotone turn: accumulated == endpoint


def test_trajectory_geometry_of_a_circle_and_a_3d_curve():
    t = torch.linspace(0, 2.0, 41, dtype=torch.float64)  # radians swept
    circle = torch.stack([torch.cos(t), torch.sin(t), torch.zeros_like(t)], -1)[:, None]  # (T, 1, 3)
    geo = trajectory_geometry(circle)
    assert abs(float(geo["angle_deg"][0]) - math.degrees(2.0)) < 1e-9
    assert abs(float(geo["top2_fraction"][0]) - 1) < 1e-12
    helix = torch.stack([torch.cos(3 * t), torch.sin(3 * t), t], -1)[:, None]
    assert float(trajectory_geometry(helix)["top2_fraction"][0]) < 0.99


# ------------------------------------------------------------------------------------------ bands


def test_band_energy_of_known_spectra():
    h = w = 16
    xx = torch.arange(w, dtype=torch.float64)
    low_wave = 2.0 * torch.cos(2 * math.pi * 1 * xx / w)  # 1/16 cycle per pixel: low band
    high_wave = 0.5 * torch.cos(2 * math.pi * 6 * xx / w)  # 6/16 = 0.375 > 0.25: high band
    img = (0.3 + low_wave + high_wave).expand(h, w)[None, None]  # (1, 1, H, W)
    e_low, e_high = band_energy(img)
    # a constant c has energy c^2 H W; a cosine of amplitude A, A^2 H W / 2 (Parseval)
    assert torch.allclose(e_low, torch.tensor([0.09 * h * w + 4.0 * h * w / 2], dtype=torch.float64))
    assert torch.allclose(e_high, torch.tensor([0.25 * h * w / 2], dtype=torch.float64))
    rnd = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    lo, hi = band_energy(rnd)
    assert torch.allclose(lo + hi, (rnd.double() ** 2).sum((1, 2, 3)))
    # the boundary: frequency (1/4, 0) is low, (1/4, 1/8) (radius 0.28) is high
    yy = torch.arange(h, dtype=torch.float64)[:, None]
    edge = torch.cos(2 * math.pi * (4 * xx / w))[None].expand(h, w)
    diag = torch.cos(2 * math.pi * (4 * xx[None] / w + 2 * yy / h))
    assert float(band_energy(edge[None])[1]) < 1e-9 and float(band_energy(diag[None])[0]) < 1e-9


def test_settle_step_of_constructed_sequences():
    seq = torch.tensor([10, 5, 1.2, 0.9, 1.04, 0.97, 1.0], dtype=torch.float64)
    assert int(settle_step(seq, 0.05)) == 4  # 0.9 at index 3 is the last one more than 5% off
    assert int(settle_step(seq, 0.25)) == 2
    assert int(settle_step(torch.ones(5), 0.05)) == 0
    both = torch.stack([seq, torch.ones(7, dtype=torch.float64)], 1)  # (T, 2): per column
    assert settle_step(both, 0.05).tolist() == [4, 0]


# ------------------------------------------------------------------------------------------ perturbation


@pytest.mark.parametrize("vp", [True, False])
def test_perturbation_sensitivity_matches_the_linear_flow_map(vp):
    """The PF-ODE of Gaussian data is affine, so the final change is A_k delta, A_k = sqrt((Sigma + 0) /
    (Sigma + sigma_k^2)) (in Sigma's eigenbasis), whatever x_k is; Heun with 120 steps is exact to ~1e-4."""
    fit = toy()
    x = start(fit)
    sig = sched(120)
    heun = get_sampler("heun")
    traj = record_trajectory(heun, denoise_of(fit), x, sig)
    states = traj.xs.double()
    g = torch.Generator().manual_seed(5)
    u = torch.randn(3, *SHAPE, generator=g, dtype=torch.float64)
    u /= u.reshape(3, -1).norm(dim=1).reshape(3, 1, 1, 1)
    ks = [0, 30, 60, 90, 110]
    out = perturbation_sensitivity(heun, denoise_of(fit), states, sig, ks, radius=0.1, directions=u, vp=vp)
    for j, k in enumerate(ks):
        s_k = float(sig[k])
        norm = 0.1 * math.sqrt(1 + s_k**2) if vp else 0.1
        change = fit.ode_gain(u * norm, s_k, 0.0).reshape(3, -1).norm(dim=1)  # closed-form |A_k delta|
        final = fit.teleport(states[k], s_k, 0.0).reshape(3, -1).norm(dim=1)
        assert torch.allclose(out["gain_all"][j], change / norm, rtol=2e-3), k
        assert torch.allclose(out["relative_change_all"][j], change / final, rtol=2e-3), k


# ------------------------------------------------------------------------------------------ the pipeline


def test_pipeline_teleport_option(tmp_path):
    """``pipe(..., teleport=F, teleport_stats=FILE)``: F = 1 is the closed form from the pipeline's own start
    (no network call), F = 0.5 skips half the steps, F = 0 is the plain pipeline."""
    from inference.pipeline import Pipeline
    from ldm.bundle import Bundle
    from ldm.generate import generators
    from ldm.model_config import ModelConfig
    from ldm.samplers import randn_per_sample
    from ldm.samplers.config import make_sigmas

    pipe = Pipeline(Bundle(ModelConfig.tiny("sd1")), name="tiny")
    side, f, c = 32, pipe.factor, pipe.bundle.config.vae.latent_channels
    shape = (c, side // f, side // f)
    g = torch.Generator().manual_seed(0)
    fit = fit_gaussian(torch.randn(40, *shape, generator=g, dtype=torch.float64) * 0.7 + 0.2, rank=8)
    save_gaussian(fit, tmp_path / "g.safetensors")
    kw = dict(steps=4, width=side, height=side, cfg_scale=3.0, seed=[11], sampler="euler")
    steps_seen = []
    full = pipe("a cat", teleport=1.0, teleport_stats=tmp_path / "g.safetensors",
                callback=lambda st: steps_seen.append(st.i), **kw)  # fmt: skip
    sigmas = make_sigmas(pipe.bundle.denoiser().schedule, SamplerConfig(name="euler", steps=4))
    x_t = randn_per_sample(generators([11]), shape, "cpu", torch.float32) * float((1 + sigmas[0] ** 2) ** 0.5)
    assert steps_seen == []
    assert torch.allclose(full.latents, fit.teleport(x_t, float(sigmas[0]), 0.0), atol=1e-5)
    seen = []
    half = pipe("a cat", teleport=0.5, teleport_stats=tmp_path / "g.safetensors", callback=seen.append, **kw)
    assert [st.i for st in seen] == [2, 3] and half.latents.shape == full.latents.shape
    # the sampler starts from the closed form at sigmas[2], then takes Euler's two steps by hand
    s = [float(v) for v in sigmas]
    torch.testing.assert_close(seen[0].x, fit.teleport(x_t, s[0], s[2]).float(), rtol=1e-5, atol=1e-5)
    x3 = seen[0].x + (seen[0].x - seen[0].denoised) / s[2] * (s[3] - s[2])
    torch.testing.assert_close(seen[1].x, x3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(half.latents, x3 + (x3 - seen[1].denoised) / s[3] * (s[4] - s[3]), rtol=1e-5, atol=1e-5)
    assert torch.equal(pipe("a cat", teleport=0.0, **kw).latents, pipe("a cat", **kw).latents)
    with pytest.raises(ValueError, match="teleport_stats"):
        pipe.check("a cat", teleport=0.5, **kw)


def test_ldm_analyze_end_to_end_on_the_default_model(tmp_path):
    """A tiny run of the command on the embedded default model: every section and plot is written."""
    import argparse
    import json

    from inference import analyze_cli

    def main(argv):  # the subcommand alone: independent of the installed entry points (pyproject.toml)
        parser = argparse.ArgumentParser(prog="ldm")
        analyze_cli.register(parser.add_subparsers())
        args = parser.parse_args(argv)
        try:
            return args.func(args)
        except ValueError:
            return 2

    out = tmp_path / "an"
    rc = main(["analyze", "--n", "1", "--steps", "3", "--data-n", "16", "--perturb-points", "2", "--teleport-n", "2",
               "--teleport-fractions", "0,0.34", "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "analysis.json").read_text())
    assert set(report) >= {"gaussian", "geometry", "bands", "perturbation", "teleport"}
    assert len(report["geometry"]["top2_fraction"]["per_trajectory"]) == 2  # 1 single + 1 relation prompt
    assert [r["steps_teleported"] for r in report["teleport"]["curve"]] == [0, 1]
    assert load_gaussian(out / "gaussian.safetensors").shape == (4, 8, 8)
    for name in ("geometry", "bands", "perturbation", "teleport", "x0"):
        assert (out / f"analysis-{name}.png").is_file()
    assert main(["analyze", "--sampler", "euler_ancestral", "--out", str(out)]) == 2  # stochastic: refused


def test_ldm_eval_teleport_option_is_the_pipelines(tmp_path, capsys):
    """``ldm eval --teleport F --teleport-stats FILE`` hands F and FILE to every pipeline call, and the suites'
    images are then the pipeline's own teleported images (which differ from plain ones); bad values stop the command
    before the model loads."""
    import json

    import numpy as np

    from inference import eval_cli
    from inference.pipeline import Pipeline
    from ldm.bundle import save_bundle
    from ldm.cli import main
    from ldm.shapes import prompt_set
    from tests.test_format_native import random_bundle

    # random weights: a fresh U-Net's zero output conv makes every image depend on the seed alone (not on the prompt,
    # the guidance or the steps the suite hands the pipeline)
    save_bundle(random_bundle("sd1", seed=3), tmp_path / "m")
    pipe = Pipeline.load(tmp_path / "m")
    shape = (pipe.bundle.config.vae.latent_channels, 32 // pipe.factor, 32 // pipe.factor)
    g = torch.Generator().manual_seed(0)
    stats = tmp_path / "g.safetensors"
    save_gaussian(fit_gaussian(torch.randn(40, *shape, generator=g, dtype=torch.float64) * 0.7, rank=8), stats)
    calls = []

    class Recording(Pipeline):
        def __call__(self, *args, **kwargs):
            calls.append(kwargs)
            return super().__call__(*args, **kwargs)

    argv = ["eval", "--model", tmp_path / "m", "--prompts", "single", "--n", 3, "--steps", 4, "--sampler", "euler",
            "--cfg-scale", 3, "--resolution", 32, "--batch-size", 2, "--device", "cpu", "--teleport", 0.75,
            "--teleport-stats", stats, "--out", tmp_path / "ev", "-q"]  # fmt: skip
    real_load = eval_cli.load_pipeline
    eval_cli.load_pipeline = lambda path, **kw: Recording.load(path, **kw)
    try:
        assert main([*map(str, argv)]) == 0
    finally:
        eval_cli.load_pipeline = real_load
    assert len(calls) == 2 and all(c["teleport"] == 0.75 and c["teleport_stats"] == stats for c in calls)
    report = json.loads((tmp_path / "ev" / "adherence.json").read_text())
    assert report["settings"]["teleport"] == 0.75 and report["settings"]["teleport_stats"] == str(stats)
    assert "teleport 0.75" in capsys.readouterr().out

    prompts = prompt_set("single", 2)
    kw = dict(steps=4, sampler="euler", cfg_scale=3.0)
    got = eval_cli.SUITES["shapes"].evaluate(pipe, prompts, seed=[5, 6], resolution=32, teleport=0.75,
                                             teleport_stats=stats, **kw)["images"]  # fmt: skip
    for prompt, seed, image in zip(prompts, (5, 6), got):
        want = pipe(prompt, seed=[seed], width=32, height=32, teleport=0.75, teleport_stats=stats, **kw).images[0]
        plain = pipe(prompt, seed=[seed], width=32, height=32, **kw).images[0]
        assert np.array_equal(np.asarray(image), np.asarray(want))
        assert not np.array_equal(np.asarray(want), np.asarray(plain))
    for extra, message in ((["--teleport", "0.5"], "--teleport-stats: required by --teleport"),
                           (["--teleport", "1"], "--teleport: a fraction of the steps in [0, 1)"),
                           (["--teleport", "0.5", "--teleport-stats", tmp_path / "no"], "no such file")):  # fmt: skip
        code = main(["eval", "--model", str(tmp_path / "m"), *map(str, extra)])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
