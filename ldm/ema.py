"""EMA: an exponential moving average (Polyak averaging) of a module's parameters, kept in fp32 or wider.

After the n-th call of ``update`` (n = 1, 2, ...) every shadow parameter is

    shadow <- shadow - (1 - d_n) * (shadow - param)          (param frozen, requires_grad=False: shadow <- param)

with the decay of diffusers' ``training_utils.EMAModel`` (so that both give the same numbers, step by step):

    s   = n - update_after_step - 1
    d_n = 0                                         if s <= 0   (the first updates copy the model)
        = min(decay, (1 + s) / (10 + s))            warmup=True, power=None   (diffusers' use_ema_warmup=False)
        = min(decay, 1 - (1 + s / inv_gamma)^-power)  warmup=True, power set  (diffusers' use_ema_warmup=True;
                                                    @crowsonkb: power 2/3 for ~1M steps, 3/4 for shorter runs)
        = decay                                     warmup=False
    d_n = max(d_n, min_decay)

Only parameters are averaged (our networks keep no running statistics in buffers). The shadows live on the
model's device when the EMA is made; ``to(device)`` moves them (e.g. to the CPU to save GPU memory; ``update``
then needs the model there too). ``state_dict`` holds only tensors (``shadow.<param name>`` and ``num_updates``),
so it saves with safetensors and loads with ``torch.load(weights_only=True)``; the decay settings are
configuration, not state.

Validation with the averaged weights: ``ema.store(model); ema.copy_to(model); ...; ema.restore(model)``.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from .checks import check_int


def _shadow_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype


class EMA:
    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        warmup: bool = True,
        update_after_step: int = 0,
        *,
        power: float | None = None,
        inv_gamma: float = 1.0,
        min_decay: float = 0.0,
    ):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: must lie in [0, 1], got {decay}")
        if not 0.0 <= min_decay <= decay:
            raise ValueError(f"min_decay: must lie in [0, decay={decay}], got {min_decay}")
        check_int("update_after_step", update_after_step, 0)
        if power is not None and not power > 0:
            raise ValueError(f"power: must be > 0 (or None for the (1 + s) / (10 + s) warm-up), got {power}")
        if not inv_gamma > 0:
            raise ValueError(f"inv_gamma: must be > 0, got {inv_gamma}")
        self.decay, self.warmup, self.update_after_step = decay, warmup, update_after_step
        self.power, self.inv_gamma, self.min_decay = power, inv_gamma, min_decay
        self.shadow: dict[str, Tensor] = {
            name: p.detach().to(_shadow_dtype(p.dtype), copy=True).contiguous() for name, p in model.named_parameters()
        }
        self.num_updates = 0
        self._stored: dict[str, Tensor] | None = None

    def decay_at(self, n: int) -> float:
        """The decay used by the n-th update (n >= 1)."""
        s = n - self.update_after_step - 1
        if s <= 0:
            return 0.0
        if not self.warmup:
            d = self.decay
        elif self.power is None:
            d = (1 + s) / (10 + s)
        else:
            d = 1 - (1 + s / self.inv_gamma) ** -self.power
        return max(min(d, self.decay), self.min_decay)

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())[:5]
            extra = sorted(params.keys() - self.shadow.keys())[:5]
            raise ValueError(f"model: its parameters differ from the EMA's; missing {missing}, unexpected {extra}")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step; call it after each optimizer step."""
        params = self._params(model)
        self.num_updates += 1
        one_minus_decay = 1 - self.decay_at(self.num_updates)
        shadows, trained = [], []
        for name, s in self.shadow.items():
            p = params[name]
            if p.requires_grad and p.dtype == s.dtype and p.device == s.device:
                shadows.append(s)
                trained.append(p.detach())
            elif p.requires_grad:
                s.sub_(one_minus_decay * (s - p))  # the expression of diffusers' EMAModel.step
            else:
                s.copy_(p)
        if shadows:  # the same expression, elementwise identical, in a few multi-tensor kernels
            diff = torch._foreach_sub(shadows, trained)
            torch._foreach_mul_(diff, one_minus_decay)
            torch._foreach_sub_(shadows, diff)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (cast to its dtypes)."""
        for name, p in self._params(model).items():
            p.copy_(self.shadow[name])

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Keep a copy of ``model``'s current weights for ``restore``."""
        self._stored = {name: p.detach().clone() for name, p in self._params(model).items()}

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the weights saved by ``store`` (and forget them)."""
        if self._stored is None:
            raise RuntimeError("EMA.restore: nothing stored; call store(model) before copy_to(model)")
        for name, p in self._params(model).items():
            p.copy_(self._stored[name])
        self._stored = None

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {name: s.to(device) for name, s in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """``{"shadow.<param name>": tensor, ..., "num_updates": int64 scalar}``; the tensors are references."""
        sd = {f"shadow.{name}": s for name, s in self.shadow.items()}
        sd["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        want = {f"shadow.{name}" for name in self.shadow} | {"num_updates"}
        if set(sd.keys()) != want:
            missing, extra = sorted(want - set(sd.keys()))[:5], sorted(set(sd.keys()) - want)[:5]
            raise ValueError(f"sd: not this EMA's state; missing keys {missing}, unexpected keys {extra}")
        for name, s in self.shadow.items():
            v = sd[f"shadow.{name}"]
            if v.shape != s.shape:
                raise ValueError(f"sd: shadow.{name} has shape {tuple(v.shape)}, expected {tuple(s.shape)}")
            s.copy_(v)
        n = sd["num_updates"]
        if n.numel() != 1 or n.dtype.is_floating_point or int(n) < 0:
            raise ValueError(f"sd: num_updates must be one integer >= 0, got {n}")
        self.num_updates = int(n)
