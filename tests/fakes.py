"""Shared test fixtures: a deterministic fake network, and a loop that drives a diffusers scheduler with it.

The fake network is a smooth, non-linear function of (x_vp, t) so that any mismatch in input scaling,
timestep mapping or update rule shows up in the final latent. Both sides see the same network:
diffusers calls it with (scale_model_input(x, t), t), our Denoiser with (c_in * x, sigma_to_t(sigma)).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def fake_net(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """(B, C, H, W), (B,) or scalar -> (B, C, H, W); deterministic and smooth in both arguments."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
    u = t / 1000.0
    return 0.6 * torch.tanh(x * (0.8 + 0.4 * u)) + 0.2 * torch.sin(3.0 * u + x.roll(1, dims=-1)) * (1 - u)


class NoiseQueue:
    """The same sequence of standard-normal tensors, served to diffusers and to our sampler in order."""

    def __init__(self, shape, n: int = 200, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.items = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
        self.i = 0

    def pop(self, *args, **kwargs) -> torch.Tensor:
        out = self.items[self.i]
        self.i += 1
        return out.clone()

    def as_noise_fn(self):
        return lambda sigma, sigma_next: self.pop()


def patch_randn(monkeypatch, scheduler, queue: NoiseQueue) -> None:
    """Make a diffusers scheduler draw its noise from ``queue``."""
    import importlib

    module = importlib.import_module(type(scheduler).__module__)
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: queue.pop(), raising=True)


def drive_diffusers(scheduler, steps: int, x_init: torch.Tensor, net=fake_net, step_kwargs=None):
    """Run a diffusers scheduler loop; returns (final latent, timesteps used)."""
    scheduler.set_timesteps(steps)
    x = x_init.clone()
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        out = net(inp, torch.as_tensor(t, dtype=torch.float64))
        x = scheduler.step(out, t, x, **(step_kwargs or {})).prev_sample
    return x, scheduler.timesteps


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def ve_from_vp(x_vp: torch.Tensor, sigma: float) -> torch.Tensor:
    return x_vp * math.sqrt(1 + sigma**2)


def run_interpreted(script: str, timeout: int = 600) -> None:
    """Run ``script`` in a fresh Python with TRITON_INTERPRET=1 (set before any Triton kernel is defined, so the
    kernels run on the CPU); it prints "ok" when its checks pass."""
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))  # keep the caller's (e.g. wheels)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=str(ROOT))  # fmt: skip
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
