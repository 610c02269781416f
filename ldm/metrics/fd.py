"""Fréchet distance between two Gaussians, as FID computes it (Heusel et al. 2017, "GANs trained by a two
time-scale update rule ..."), in any feature space:

    FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

``tr((S1 S2)^{1/2})`` is computed in float64 as ``tr((A S2 A)^{1/2})`` with ``A = S1^{1/2}``: ``A S2 A`` is symmetric
positive semi-definite and similar to ``S1 S2`` (``A^-1 (A S2 A) A = S1 S2`` where S1 is invertible, and by continuity
otherwise), so its square root's trace is the sum of the square roots of its eigenvalues. Both square roots come from
``torch.linalg.eigh`` with eigenvalues clamped at 0 (round-off makes tiny ones negative); no scipy, no complex
``sqrtm``, and singular covariances (fewer samples than feature dimensions) are fine.
"""
from __future__ import annotations

import torch
from torch import Tensor


def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """(N, D) features -> (mean (D,), covariance (D, D)), float64, covariance with the unbiased 1/(N-1)
    normalisation (as FID's ``np.cov``). N >= 2."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected (N, D) with N >= 2, got shape {tuple(features.shape)}")
    x = features.detach().to(torch.float64)
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _sqrt_psd(m: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric PSD (D, D) -> (its square root, its eigenvalues clamped at 0)."""
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    evals = evals.clamp_min(0)
    return (evecs * evals.sqrt()) @ evecs.T, evals


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (module docstring), >= 0."""
    mu1, mu2, s1, s2 = (torch.as_tensor(t).detach().cpu().to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: means (D,) and covariances (D, D) of one D, got {tuple(mu1.shape)}, "
                         f"{tuple(s1.shape)}, {tuple(mu2.shape)}, {tuple(s2.shape)}")
    root1, _ = _sqrt_psd(s1)
    _, evals = _sqrt_psd(root1 @ s2 @ root1)
    fd = (mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * evals.sqrt().sum()
    return max(float(fd), 0.0)
