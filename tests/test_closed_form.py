"""Samplers against the closed form: Gaussian data has an exact denoiser and an exact probability-flow ODE.

Data x0 ~ N(mu, S) with S = U diag(lam) U^T. Then (e.g. Wang & Vastola 2023, sec. 3):
  exact denoiser      D(x; sigma) = mu + S (S + sigma^2 I)^-1 (x - mu)
  marginal at sigma   N(mu, S + sigma^2 I)
  PF-ODE solution     U^T (x(sigma) - mu) = U^T (x(sigma_max) - mu) * sqrt((lam + sigma^2) / (lam + sigma_max^2))
Because D is affine, every deterministic sampler is an affine map x_out = A x_in + b, so we push the exact
start distribution through it without Monte Carlo: mean_out = out(mu_in), cov_out = A cov_in A^T with
A = [out(e_i) - out(0)]_i. The network is wrapped by our Denoiser for each parametrization, so the
eps / v / x0 conversion is tested on the way.
"""
import math

import pytest
import torch

from ldm.denoiser import Denoiser
from ldm.samplers import get_sampler
from ldm.schedule import karras_sigmas

D_DIM = 6
DETERMINISTIC = ["euler", "heun", "dpm2", "lms", "dpmpp_2m", "unipc", "ddim", "plms"]
SIGMA_MAX, SIGMA_MIN = 20.0, 0.02


def gaussian():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D_DIM, D_DIM, generator=g, dtype=torch.float64))
    lam = torch.linspace(0.05, 2.0, D_DIM, dtype=torch.float64)
    mu = torch.randn(D_DIM, generator=g, dtype=torch.float64)
    return mu, q, lam, q @ torch.diag(lam) @ q.T


def exact_net(prediction: str):
    """A 'network' that outputs the exact eps / v / x0 for the Gaussian, given (c_in x, sigma)."""
    mu, _, _, cov = gaussian()
    eye = torch.eye(D_DIM, dtype=torch.float64)

    def net(x_in, sigma, cond=None):  # x_in: (B, D) = x / sqrt(1 + sigma^2); sigma: (B,)
        s = sigma.reshape(-1, 1)
        x = x_in * (1 + s**2).sqrt()
        x0 = torch.stack([mu + cov @ torch.linalg.solve(cov + si**2 * eye, xi - mu) for xi, si in zip(x, sigma)])
        eps = (x - x0) / s
        return {"eps": eps, "x0": x0, "v": (eps - s * x0) / (1 + s**2).sqrt()}[prediction]

    return net


def affine_map(sampler, denoise, sigmas):
    """(A, b) with sampler(x) = x @ A^T + b for a batch of row vectors x."""
    basis = torch.cat([torch.zeros(1, D_DIM, dtype=torch.float64), torch.eye(D_DIM, dtype=torch.float64)])
    out = sampler(denoise, basis, sigmas)
    b = out[0]
    return (out[1:] - b).T, b


def moments_error(name: str, steps: int, prediction: str = "eps"):
    mu, q, lam, cov = gaussian()
    denoise = Denoiser(exact_net(prediction), prediction=prediction, time_input="sigma")
    sigmas = torch.cat([karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX), torch.zeros(1, dtype=torch.float64)])
    a, b = affine_map(get_sampler(name), denoise, sigmas)
    cov_in = cov + SIGMA_MAX**2 * torch.eye(D_DIM, dtype=torch.float64)  # the exact marginal at sigma_max
    mean_out = a @ mu + b
    cov_out = a @ cov_in @ a.T
    return float((mean_out - mu).norm() / mu.norm()), float((cov_out - cov).norm() / cov.norm())


def trajectory_error(name: str, steps: int):
    """Max error of the final sample against the exact ODE solution, over a few starting points."""
    mu, q, lam, cov = gaussian()
    denoise = Denoiser(exact_net("eps"), prediction="eps", time_input="sigma")
    sigmas = torch.cat([karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX), torch.zeros(1, dtype=torch.float64)])
    g = torch.Generator().manual_seed(1)
    x_start = mu + torch.randn(8, D_DIM, generator=g, dtype=torch.float64) * SIGMA_MAX
    out = get_sampler(name)(denoise, x_start, sigmas)
    # exact solution from sigma_max down to 0, in the eigenbasis
    scale = (lam / (lam + SIGMA_MAX**2)).sqrt()
    exact = mu + ((x_start - mu) @ q * scale) @ q.T
    return float((out - exact).norm(dim=1).max() / exact.norm(dim=1).max())


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_reach_the_data_distribution(name):
    e10 = moments_error(name, 10)
    e50 = moments_error(name, 50)
    assert e50[0] < e10[0] or e50[0] < 1e-6, (name, e10, e50)
    assert e50[1] < e10[1], (name, e10, e50)
    assert e50[0] < 2e-2 and e50[1] < 0.1, (name, e50)  # Euler, the least accurate, is at 0.065


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_parametrizations_give_the_same_exact_denoiser(prediction):
    e = moments_error("heun", 30, prediction)
    ref = moments_error("heun", 30, "eps")
    assert abs(e[0] - ref[0]) < 1e-9 and abs(e[1] - ref[1]) < 1e-9


@pytest.mark.parametrize("name, order, lo, hi", [("euler", 1, 0.8, 1.3), ("heun", 2, 1.7, 2.6), ("dpmpp_2m", 2, 1.6, 2.6)])
def test_convergence_order(name, order, lo, hi):
    errs = [trajectory_error(name, n) for n in (16, 32, 64)]
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(lo < s < hi for s in slopes), (name, errs, slopes)
