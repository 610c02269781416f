"""LoRA: low-rank adapters on a network's Linear / Conv2d layers (Hu et al. 2021, "LoRA").

A wrapped layer computes

    y = W x + b + scale * (alpha / rank) * up(down(dropout(x)))      down: in -> rank, up: rank -> out

with ``down`` initialised like nn.Linear (Kaiming-uniform, a = sqrt(5)) and ``up`` initialised to zero, so the
network is unchanged until training moves ``up``. For a Conv2d, ``down`` is a conv with the base layer's kernel,
stride and padding and ``up`` a 1x1 conv (kohya's "LoCon" layout). ``merge_lora`` folds the update into the
base weight, ``W <- W + scale * (alpha / rank) * up @ down``, and removes the wrappers.

A wrapper subclasses the layer it wraps and owns the SAME weight/bias Parameters under the same names, so the
model's own state-dict keys do not change; the adapter adds ``<module>.lora_down.weight`` and
``<module>.lora_up.weight``. ``inject_lora`` leaves ``requires_grad`` of the base weights as it finds them:
to train only the adapters, ``model.requires_grad_(False)`` before injecting (LoRA weights require grad).

Key naming (``lora_state_dict``), for a module path <m> in our (original LDM) U-Net layout, e.g.
``input_blocks.1.1.transformer_blocks.0.attn1.to_q``:

    ours                            kohya / A1111 (.safetensors)          diffusers / PEFT
    <m>.lora_down.weight  (r, in)   lora_unet_<k>.lora_down.weight        unet.<m'>.lora_A.weight
    <m>.lora_up.weight    (out, r)  lora_unet_<k>.lora_up.weight          unet.<m'>.lora_B.weight
    <m>.alpha             () fp32   lora_unet_<k>.alpha                   lora_alpha in the adapter config

<m'> is the diffusers module path (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``), which
``ldm.unet_keys.ours_to_diffusers`` gives for ``<m>.weight`` (tests/test_lora.py checks that every name maps).
<k> is <m> (kohya's SDXL files use the original layout) or <m'> (its SD 1.x / 2.x files), "." replaced by "_".
Conv adapters have the same orientation: down (r, in, kh, kw), up (out, r, 1, 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .checks import check_int


@dataclass
class LoRAConfig:
    rank: int = 4
    alpha: float = 4.0  # the update is scaled by alpha / rank (alpha = rank: 1)
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # module-name suffixes
    dropout: float = 0.0  # on the adapter's input

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)  # YAML hands in lists
        check_int("lora.rank", self.rank, 1)
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout: must lie in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(isinstance(s, str) and s for s in self.target_modules):
            raise ValueError(
                f"lora.target_modules: needs one or more non-empty name suffixes, got {self.target_modules}"
            )


class _LoRA:
    """What both wrappers share: the adapter's multiplier, update and merge."""

    lora_down: nn.Module
    lora_up: nn.Module
    weight: nn.Parameter

    def _init_adapter(self, rank: int, alpha: float, dropout: float, scale: float) -> None:
        self.rank, self.alpha, self.scale = rank, float(alpha), float(scale)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        nn.init.zeros_(self.lora_up.weight)

    @property
    def multiplier(self) -> float:
        return self.scale * self.alpha / self.rank

    def _update(self, x: Tensor, out: Tensor) -> Tensor:
        h = self.lora_up(self.lora_down(self.lora_dropout(x).to(self.lora_down.weight.dtype)))
        return out + self.multiplier * h.to(out.dtype)

    def delta_weight(self) -> Tensor:
        """scale * alpha / rank * up @ down in the base weight's shape, float64."""
        up = self.lora_up.weight.detach().double().flatten(1)  # (out, r)
        down = self.lora_down.weight.detach().double().flatten(1)  # (r, in * kh * kw)
        return (self.multiplier * (up @ down)).view(self.weight.shape)


class LoRALinear(nn.Linear, _LoRA):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, scale: float = 1.0,
                 dtype: torch.dtype | None = None):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: keys and optimizer state unchanged
        kw = dict(bias=False, device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.lora_down = nn.Linear(base.in_features, rank, **kw)
        self.lora_up = nn.Linear(rank, base.out_features, **kw)
        self._init_adapter(rank, alpha, dropout, scale)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        return self._update(x, F.linear(x, self.weight, self.bias))

    def plain(self) -> nn.Linear:
        m = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        m.weight, m.bias = self.weight, self.bias
        return m


class LoRAConv2d(nn.Conv2d, _LoRA):
    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0, scale: float = 1.0,
                 dtype: torch.dtype | None = None):
        if base.groups != 1:
            raise ValueError(f"LoRA: grouped convolutions are not supported (groups={base.groups})")
        geometry = dict(
            stride=base.stride, padding=base.padding, dilation=base.dilation, padding_mode=base.padding_mode
        )
        super().__init__(base.in_channels, base.out_channels, base.kernel_size, bias=base.bias is not None,
                         device="meta", **geometry)
        self.weight, self.bias = base.weight, base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, **geometry, **kw)
        self.lora_up = nn.Conv2d(rank, base.out_channels, 1, **kw)
        self._init_adapter(rank, alpha, dropout, scale)

    def forward(self, x: Tensor) -> Tensor:  # (B, in, H, W) -> (B, out, H', W')
        return self._update(x, self._conv_forward(x, self.weight, self.bias))

    def plain(self) -> nn.Conv2d:
        geometry = dict(
            stride=self.stride, padding=self.padding, dilation=self.dilation, padding_mode=self.padding_mode
        )
        m = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None,
                      device="meta", **geometry)
        m.weight, m.bias = self.weight, self.bias
        return m


_WRAPPERS = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


def _wrap(base: nn.Module, name: str, rank: int, alpha: float, dropout: float, dtype) -> _LoRA:
    if isinstance(base, _LoRA):
        raise ValueError(f"LoRA: {name!r} already has an adapter (merge_lora first, or load_lora into it)")
    cls = _WRAPPERS.get(type(base))
    if cls is None:
        raise ValueError(f"LoRA: {name!r} is a {type(base).__name__}; only nn.Linear and nn.Conv2d can be adapted")
    return cls(base, rank, alpha, dropout, dtype=dtype)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _lora_modules(model: nn.Module) -> list[tuple[str, _LoRA]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _LoRA)]


def inject_lora(model: nn.Module, cfg: LoRAConfig, *, generator: torch.Generator | None = None,
                dtype: torch.dtype | None = None) -> list[str]:
    """Wrap every Linear/Conv2d whose name ends with one of ``cfg.target_modules``; returns the wrapped names.

    ``generator`` makes the Kaiming init of ``lora_down`` reproducible; ``dtype`` (default: the base weight's)
    is the adapters' dtype, e.g. fp32 adapters on an fp16 network."""
    names = [
        name for name, _ in model.named_modules()
        if name and any(name == s or name.endswith("." + s) for s in cfg.target_modules)
    ]
    if not names:
        raise ValueError(f"cfg.target_modules: {cfg.target_modules} match no module of the model")
    wrapped = [_wrap(model.get_submodule(name), name, cfg.rank, cfg.alpha, cfg.dropout, dtype) for name in names]
    for name, m in zip(names, wrapped):  # all checked first: a bad target leaves the model untouched
        if generator is not None:
            with torch.no_grad():
                nn.init.kaiming_uniform_(m.lora_down.weight, a=math.sqrt(5), generator=generator)
        _replace(model, name, m)
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' trainable weights (down and up of every wrapper)."""
    return [p for _, m in _lora_modules(model) for p in (m.lora_down.weight, m.lora_up.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapters: ``<module>.lora_down.weight``, ``<module>.lora_up.weight``, ``<module>.alpha`` (fp32)."""
    sd: dict[str, Tensor] = {}
    for name, m in _lora_modules(model):
        sd[f"{name}.lora_down.weight"] = m.lora_down.weight.detach()
        sd[f"{name}.lora_up.weight"] = m.lora_up.weight.detach()
        sd[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return sd


_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def load_lora(model: nn.Module, sd: Mapping[str, Tensor], scale: float = 1.0) -> list[str]:
    """Load adapters (wrapping layers that have none yet; rank from the weights, alpha = rank if absent, as kohya)
    and set their ``scale``; returns the module names loaded. Everything is checked before the model changes."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"sd: {key!r} is not a LoRA key (<module>.lora_down.weight / .lora_up.weight / .alpha)")
        groups.setdefault(key[: -len(suffix)], {})[suffix] = value
    plan = []
    for name, g in groups.items():
        if ".lora_down.weight" not in g or ".lora_up.weight" not in g:
            raise ValueError(f"sd: {name!r} needs both lora_down.weight and lora_up.weight")
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"sd: the model has no module {name!r}") from None
        down, up = g[".lora_down.weight"], g[".lora_up.weight"]
        rank = down.shape[0]
        alpha = float(g[".alpha"]) if ".alpha" in g else float(rank)
        new = None if isinstance(m, _LoRA) else _wrap(m, name, rank, alpha, 0.0, None)
        target = m if new is None else new
        for key, value in (("lora_down", down), ("lora_up", up)):
            have = getattr(target, key).weight
            if have.shape != value.shape:
                raise ValueError(
                    f"sd: {name}.{key}.weight has shape {tuple(value.shape)}, the model's {tuple(have.shape)}"
                )
        plan.append((name, new, target, down, up, rank, alpha))
    for name, new, m, down, up, rank, alpha in plan:
        if new is not None:
            _replace(model, name, new)
        with torch.no_grad():
            m.lora_down.weight.copy_(down)
            m.lora_up.weight.copy_(up)
        m.rank, m.alpha, m.scale = rank, alpha, float(scale)
    return list(groups)


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Set the runtime multiplier of every adapter (0 turns them off)."""
    for _, m in _lora_modules(model):
        m.scale = float(scale)


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (in float64, rounded once) and remove the wrappers; the base
    Parameters keep their identity. Returns the names merged."""
    names = []
    for name, m in _lora_modules(model):
        w = m.weight
        w.copy_((w.double() + m.delta_weight()).to(w.dtype))
        _replace(model, name, m.plain())
        names.append(name)
    return names
