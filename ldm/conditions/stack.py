"""The configured conditions of a model together: from values to ``Cond.extra``, and from there into the U-Net.

    stack = ConditionStack(specs, model_cfg)                       # one module per condition, by name
    extra = stack.prepare({"edges": images, "label": labels}, env, keep={"label": keep_mask})
    cond = replace(text_cond, extra=extra)                         # ldm.conditioning.Cond
    x0 = Denoiser(ConditionedUNet(unet, stack), ...)(x, sigma, cond)

``ConditionedUNet`` is a network with the U-Net's signature ``net(x, t, cond)``: it turns each condition's
prepared value into what enters the U-Net (its ``forward``, so trained conditions are inside the network that
DDP wraps), replaces it by the condition's ``null`` where its keep flag is 0, concatenates the context / vector /
concat parts after the text's, runs the control branches and adds their weighted residuals / features. The
U-Net's code knows nothing of condition types.

Control timing: ``set_windows({name: (t_low, t_high)})`` restricts a control to network time inputs in that range
(the pipeline derives it from the control's start / end step fractions, ldm.controlnet.control_active); outside
it the control adds nothing, and when it is inactive for every row its network is not run.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..conditioning import Cond
from .base import Condition, Env, condition_type
from .spec import ConditionSpec, check_specs

KEEP = ".keep"
INPUT_ENTRIES = ("context", "vector", "concat")


def condition_widths(specs: list[ConditionSpec], model: Any) -> dict[str, int]:
    """Per U-Net input (context, vector, concat): the features the conditions add to it."""
    out = dict.fromkeys(INPUT_ENTRIES, 0)
    for s in specs:
        cls = condition_type(s)
        if cls.enters in out:
            out[cls.enters] += cls.width(s, model)
    return out


class ConditionStack(nn.Module):
    """The conditions of a model, built from their specs; ``stack[name]`` is the Condition module."""

    def __init__(self, specs: list[ConditionSpec], model: Any):
        super().__init__()
        check_specs(list(specs))
        self.conds = nn.ModuleDict({s.name: condition_type(s)(s, model) for s in specs})

    def __iter__(self) -> Iterator[Condition]:
        return iter(self.conds.values())

    def __len__(self) -> int:
        return len(self.conds)

    def __getitem__(self, name: str) -> Condition:
        if name not in self.conds:
            raise ValueError(f"unknown condition {name!r}; this model has: {', '.join(self.conds) or '(none)'}")
        return self.conds[name]

    def names(self) -> list[str]:
        return list(self.conds)

    @property
    def specs(self) -> list[ConditionSpec]:
        return [c.spec for c in self]

    def init_from_unet(self, unet: nn.Module) -> None:
        for c in self:
            c.init_from_unet(unet)

    def prepare(self, values: Mapping[str, Any], env: Env, batch: int,
                keep: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:  # fmt: skip
        """``Cond.extra``: each condition's prepared value (B, ...) and keep flag (B,) float. A condition missing
        from ``values`` is absent (keep 0, no value); ``keep[name]`` (B,) bool marks the rows that keep it."""
        unknown = sorted(set(values) - set(self.conds))
        if unknown:
            raise ValueError(f"unknown condition {unknown[0]!r}; this model has: {', '.join(self.conds) or '(none)'}")
        extra: dict[str, Tensor] = {}
        for name, c in self.conds.items():
            if name not in values or values[name] is None:
                continue
            v = c.prepare(values[name], env)
            if v.shape[0] != batch:
                raise ValueError(f"{c.spec.where}: {v.shape[0]} values for a batch of {batch}")
            k = torch.ones(batch, dtype=torch.bool) if keep is None or name not in keep else keep[name].reshape(-1)
            extra[name], extra[name + KEEP] = v, k.to(env.device, torch.float32)
        return extra


class ConditionedUNet(nn.Module):
    """``net(x, t, cond) -> prediction``: the U-Net with the stack's conditions applied (see the module docstring)."""

    def __init__(self, unet: nn.Module, stack: ConditionStack, widths: Mapping[str, int] | None = None):
        super().__init__()
        self.unet, self.stack = unet, stack
        self.windows: dict[str, tuple[float, float]] = {}
        self.weights: dict[str, float] = {}  # per-call strengths in place of the specs' weight
        self.widths = dict(widths or {})  # name -> features it adds, for conditions left out of a call

    def set_windows(self, windows: Mapping[str, tuple[float, float]]) -> None:
        self.windows = dict(windows)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        self.weights = {k: float(v) for k, v in weights.items()}

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        cond = cond if cond is not None else Cond()
        extra = cond.extra or {}
        base = replace(cond, extra=None)
        parts: dict[str, list[Tensor]] = {e: [] for e in INPUT_ENTRIES}
        controls = []
        for name, c in self.stack.conds.items():
            if c.enters in INPUT_ENTRIES:
                parts[c.enters].append(self._entered(c, x, base, extra))
            elif name in extra:
                controls.append(c)
        if parts["context"]:
            base = replace(base, context=torch.cat([base.context, *[p.to(base.context.dtype) for p in parts["context"]]],
                                                   dim=-1))  # (B, T, D_text + sum D_c)  # fmt: skip
        if parts["vector"]:
            vec = [base.vector] if base.vector is not None else []
            base = replace(base, vector=torch.cat(vec + parts["vector"], dim=-1))  # (B, V + sum V_c)
        if parts["concat"]:
            cat = [base.concat] if base.concat is not None else []
            base = replace(base, concat=torch.cat(cat + [p.to(x.dtype) for p in parts["concat"]], dim=1))
        residuals, features = [], []
        for c in controls:
            w = extra[c.spec.name + KEEP] * self.weights.get(c.spec.name, float(c.spec.weight))  # (B,)
            if c.spec.name in self.windows:
                lo, hi = self.windows[c.spec.name]
                w = w * ((t >= lo) & (t <= hi)).to(w.dtype)
            if not bool((w != 0).any()):
                continue  # inactive for every row: skip its network
            out = c.control(x, t, base, extra[c.spec.name])
            scaled = tuple(r * w.reshape(-1, *([1] * (r.ndim - 1))).to(r.dtype) for r in out)
            (residuals if c.enters == "control" else features).append(scaled)
        if residuals:
            total = _sum_sets(residuals)
            if base.control is not None:
                total = _sum_sets([tuple(base.control), total])
            base = replace(base, control=total)
        adapter = _sum_sets(features) if features else None
        return self.unet(x, t, base, adapter=adapter) if adapter is not None else self.unet(x, t, base)

    def _entered(self, c: Condition, x: Tensor, base: Cond, extra: Mapping[str, Tensor]) -> Tensor:
        name = c.spec.name
        if name not in extra:  # not given: its "no condition", shaped from the width it adds
            return self._absent(c, x, base)
        v = c(extra[name])
        keep = extra[name + KEEP].reshape(-1, *([1] * (v.ndim - 1))) > 0
        return torch.where(keep, v, c.null(v))

    def _absent(self, c: Condition, x: Tensor, base: Cond) -> Tensor:
        if c.spec.name not in self.widths:
            raise ValueError(f"{c.spec.where}: no value given (cond.extra[{c.spec.name!r}])")
        width, b = self.widths[c.spec.name], x.shape[0]
        if c.enters == "vector":
            v = torch.zeros(b, width, device=x.device)
        elif c.enters == "concat":
            v = torch.zeros(b, width, *x.shape[2:], device=x.device)
        else:
            v = torch.zeros(b, base.context.shape[1], width, device=x.device)
        return c.null(v)


def _sum_sets(sets: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    out = list(sets[0])
    for s in sets[1:]:
        out = [a + b for a, b in zip(out, s)]
    return tuple(out)


def member_widths(stack: ConditionStack, model: Any) -> dict[str, int]:
    """name -> features it adds (input conditions only)."""
    return {c.spec.name: type(c).width(c.spec, model) for c in stack if c.enters in INPUT_ENTRIES}
