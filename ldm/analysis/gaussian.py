"""A Gaussian model of the data in latent space and the closed-form reverse process it implies.

Fit (``fit_gaussian``): mean ``mu`` (D,) and a low-rank-plus-isotropic covariance
``Sigma = U diag(lam) U^T + nu (I - U U^T)`` (Tipping & Bishop 1999, probabilistic PCA): ``U`` (D, r) the top-r
eigenvectors of the sample covariance, ``lam`` (r,) their eigenvalues, ``nu`` the mean of the remaining D - r
eigenvalues (so the trace matches the sample covariance).

In the VE view ``x_sigma = x0 + sigma * eps`` (ldm/schedule.py) with ``x0 ~ N(mu, Sigma)``:

- the ideal denoiser (the posterior mean, Wiener filter) is ``D(x, s) = mu + Sigma (Sigma + s^2 I)^{-1} (x - mu)``;
- the probability-flow ODE ``dx/ds = (x - D(x, s)) / s = s (Sigma + s^2 I)^{-1} (x - mu)`` (Karras et al. 2022,
  eq. 3) is linear and diagonal in the eigenbasis of Sigma, so it solves in closed form (Wang & Vastola 2023,
  "Diffusion models generate images like painters", sec. 4; "analytical teleportation"):
  ``(x_s - mu)_i = (x_S - mu)_i * sqrt((lam_i + s^2) / (lam_i + S^2))``.

Both act on the top-r directions with their own eigenvalue and on the rest with ``nu``. Everything works on
float64 internally and returns x's dtype; ``x`` is (B, ...) with ``prod(...) = D``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NU_FLOOR = 1e-12  # keeps the isotropic variance positive when the data span fewer than D directions


@dataclass
class GaussianFit:
    mean: Tensor  # (D,) float64
    eigvecs: Tensor  # (D, r) float64, orthonormal columns
    eigvals: Tensor  # (r,) float64, descending
    noise_var: float  # nu: the variance of every direction outside eigvecs
    shape: tuple[int, ...]  # the latent's shape without batch, e.g. (4, 8, 8)

    @property
    def dim(self) -> int:
        return self.mean.numel()

    @property
    def rank(self) -> int:
        return self.eigvals.numel()

    # ------------------------------------------------------------------------------------ linear maps

    def _apply(self, x: Tensor, f_top: Tensor, f_rest: Tensor, centre: bool) -> Tensor:
        """mu + A (x - mu) (centre=True) or A x (centre=False), A = U diag(f_top) U^T + f_rest (I - U U^T).

        x (B, ...); f_top (B, r); f_rest (B,)."""
        b = x.shape[0]
        if x[0].numel() != self.dim:
            raise ValueError(f"GaussianFit: x has {x[0].numel()} values per sample, the fit has {self.dim}")
        mu = self.mean.to(x.device)
        u = self.eigvecs.to(x.device)
        z = x.reshape(b, -1).double() - (mu if centre else 0)  # (B, D)
        c = z @ u  # (B, r) coordinates in the top-r eigenbasis
        out = f_rest[:, None] * z + ((f_top - f_rest[:, None]) * c) @ u.T  # (B, D)
        if centre:
            out = out + mu
        return out.reshape(x.shape).to(x.dtype)

    def _sig(self, sigma, x: Tensor) -> Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        return s.expand(x.shape[0]) if s.ndim == 0 else s.reshape(-1)

    def denoise(self, x: Tensor, sigma) -> Tensor:
        """The ideal denoiser E[x0 | x_sigma = x] = mu + Sigma (Sigma + s^2 I)^{-1} (x - mu); sigma scalar or (B,)."""
        s2 = self._sig(sigma, x)[:, None] ** 2  # (B, 1)
        lam = self.eigvals.clamp(min=NU_FLOOR).to(x.device)[None]  # (1, r)
        nu = max(self.noise_var, NU_FLOOR)
        return self._apply(x, lam / (lam + s2), (nu / (nu + s2))[:, 0], centre=True)

    def teleport(self, x: Tensor, sigma_from, sigma_to) -> Tensor:
        """The exact probability-flow ODE solution from ``sigma_from`` to ``sigma_to`` (scalars or (B,))."""
        return self._apply(x, *self._flow_gains(x, sigma_from, sigma_to), centre=True)

    def ode_gain(self, v: Tensor, sigma_from, sigma_to) -> Tensor:
        """How the flow maps a perturbation v (B, ...) of x at sigma_from to sigma_to (the ODE is affine in x)."""
        return self._apply(v, *self._flow_gains(v, sigma_from, sigma_to), centre=False)

    def _flow_gains(self, x: Tensor, sigma_from, sigma_to) -> tuple[Tensor, Tensor]:
        """The flow's gains sqrt((lambda + b^2) / (lambda + a^2)): (B, r) along the eigenvectors, (B,) elsewhere."""
        a2 = self._sig(sigma_from, x)[:, None] ** 2
        b2 = self._sig(sigma_to, x)[:, None] ** 2
        lam = self.eigvals.clamp(min=NU_FLOOR).to(x.device)[None]
        nu = max(self.noise_var, NU_FLOOR)
        return ((lam + b2) / (lam + a2)).sqrt(), ((nu + b2) / (nu + a2)).sqrt()[:, 0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, *shape) float64 draws of N(mu, Sigma)."""
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        nu = max(self.noise_var, 0.0)
        f_top = self.eigvals.clamp(min=0).sqrt()[None].expand(n, -1)
        z = self._apply(eps.reshape(n, *self.shape), f_top, torch.full((n,), nu**0.5, dtype=torch.float64), False)
        return z + self.mean.reshape(self.shape)

    # ------------------------------------------------------------------------------------ as data

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (safetensors-ready): the fit round-trips through ``from_state_dict``."""
        return {"mean": self.mean, "eigvecs": self.eigvecs, "eigvals": self.eigvals,
                "noise_var": torch.tensor([self.noise_var], dtype=torch.float64),
                "shape": torch.tensor(self.shape, dtype=torch.int64)}  # fmt: skip

    @classmethod
    def from_state_dict(cls, d: dict[str, Tensor]) -> "GaussianFit":
        missing = {"mean", "eigvecs", "eigvals", "noise_var", "shape"} - set(d)
        if missing:
            raise ValueError(f"Gaussian statistics: missing {sorted(missing)}")
        shape = tuple(int(v) for v in d["shape"].tolist())
        fit = cls(d["mean"].double(), d["eigvecs"].double(), d["eigvals"].double(), float(d["noise_var"][0]), shape)
        if fit.mean.numel() != _prod(shape) or fit.eigvecs.shape != (fit.dim, fit.rank):
            raise ValueError(f"Gaussian statistics: inconsistent shapes mean {tuple(fit.mean.shape)}, eigvecs "
                             f"{tuple(fit.eigvecs.shape)}, eigvals {tuple(fit.eigvals.shape)}, latent {shape}")  # fmt: skip
        return fit


def _prod(shape) -> int:
    out = 1
    for v in shape:
        out *= int(v)
    return out


def fit_gaussian(latents: Tensor, rank: int | None = None) -> GaussianFit:
    """Mean and top-``rank`` eigenpairs (+ isotropic remainder) of latents (N, ...); rank None = min(N - 1, D).

    The eigenpairs come from the SVD of the centred (N, D) data matrix, so D may be large (SD's 16384) with
    small N. Eigenvalues use the unbiased 1 / (N - 1) normalisation."""
    if latents.ndim < 2 or latents.shape[0] < 2:
        raise ValueError(f"fit_gaussian: need at least 2 latents (N, ...), got shape {tuple(latents.shape)}")
    n, shape = latents.shape[0], tuple(latents.shape[1:])
    x = latents.reshape(n, -1).detach().to("cpu", torch.float64)
    d = x.shape[1]
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)  # s (min(N, D),), vh (min(N, D), D)
    all_vals = s**2 / (n - 1)
    max_rank = min(n - 1, d)
    r = max_rank if rank is None else int(rank)
    if not 1 <= r <= d:
        raise ValueError(f"fit_gaussian: rank must be in [1, {d}], got {rank}")
    r = min(r, max_rank)
    total = float(all_vals.sum())
    top = all_vals[:r]
    nu = (total - float(top.sum())) / (d - r) if d > r else 0.0
    return GaussianFit(mean, vh[:r].T.contiguous(), top.clone(), max(nu, 0.0), shape)


def save_gaussian(fit: GaussianFit, path) -> None:
    """Write the fit as safetensors (data, not code); ``load_gaussian`` reads it back."""
    from safetensors.torch import save_file  # noqa: PLC0415

    save_file({k: v.contiguous() for k, v in fit.state_dict().items()}, str(path), metadata={"kind": "ldm-gaussian"})


def load_gaussian(path) -> GaussianFit:
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        return GaussianFit.from_state_dict(load_file(str(path)))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"Gaussian statistics {path}: cannot read ({e})") from None
