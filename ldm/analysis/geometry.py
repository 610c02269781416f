"""Trajectory geometry: how low-dimensional a reverse-process trajectory is, and how far it turns.

Wang & Vastola 2023 ("Diffusion models generate images like painters", sec. 3) observe that trajectories of the
probability-flow ODE lie almost in a 2-D plane and look like a rotation from the noise to the image. For each
trajectory we take its states in the network's (VP) scale, ``y_k = x_k / sqrt(1 + sigma_k^2)`` for k = 0 .. S
(pure noise of unit variance at the start, the sample at the end: ``y = cos(t) x0 + sin(t) eps`` with
``tan(t) = sigma`` when the x0 prediction is fixed, a rotation), and measure:

- ``top2_fraction``: PCA of the S + 1 points (centred on their mean): (l1 + l2) / sum(l), the share of the
  trajectory's variance in its top two principal components; 1 for an exactly planar trajectory.
- ``angle_deg``: the angle swept around the origin by the projection of y_k on the plane spanned by the top two
  principal directions (through the origin), accumulated step by step (sum of the signed angles between
  consecutive projected points; its absolute value). For a trajectory that lies in a plane through the origin
  and turns monotonically, this equals ``endpoint_angle_deg``.
- ``endpoint_angle_deg``: the angle between y_0 and y_S in the full space, arccos(<y_0, y_S> / |y_0| |y_S|).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def trajectory_geometry(states: Tensor) -> dict[str, Tensor]:
    """states (T, B, ...) (e.g. ``Trajectory.vp_states()``) -> per trajectory (B,) float64 tensors:
    ``top2_fraction``, ``angle_deg``, ``endpoint_angle_deg``."""
    if states.ndim < 3 or states.shape[0] < 3:
        raise ValueError(f"trajectory_geometry: need (T >= 3, B, ...) states, got {tuple(states.shape)}")
    t, b = states.shape[:2]
    y = states.reshape(t, b, -1).double().transpose(0, 1)  # (B, T, D)
    centred = y - y.mean(1, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)  # s (B, min(T, D)), vh (B, min(T, D), D)
    var = s**2
    top2 = var[:, :2].sum(1) / var.sum(1).clamp(min=1e-300)
    proj = torch.einsum("btd,bkd->btk", y, vh[:, :2])  # (B, T, 2) coordinates in the top-2 plane through 0
    a, c = proj[:, :-1], proj[:, 1:]
    cross = a[..., 0] * c[..., 1] - a[..., 1] * c[..., 0]
    dot = (a * c).sum(-1)
    swept = torch.atan2(cross, dot).sum(1).abs()  # (B,)
    first, last = y[:, 0], y[:, -1]
    cos = (first * last).sum(-1) / (first.norm(dim=-1) * last.norm(dim=-1)).clamp(min=1e-300)
    return {
        "top2_fraction": top2,
        "angle_deg": swept * 180 / math.pi,
        "endpoint_angle_deg": cos.clamp(-1, 1).acos() * 180 / math.pi,
    }
