"""The condition base class and the registry of condition types.

A condition type is one small class registered under a name::

    @register("class_label")
    class ClassLabel(Condition):
        enters = "vector"           # how it enters the U-Net: context | vector | concat | control | adapter
        value = "label"             # what its column / argument holds: image | label | number
        Args = ClassLabelArgs       # a dataclass of its own settings (``args:`` in YAML), validated

        @classmethod
        def width(cls, spec, model): ...          # features it adds to the U-Net's input of that kind
        def prepare(self, value, env): ...        # raw batch value -> tensor (no gradient; once per batch / call)
        def forward(self, x): ...                 # prepared -> what enters the U-Net (may have trained weights)

What each entry point means for the U-Net (sgm's GeneralConditioner concatenates the same way):

    context  (B, T, D_c) tokens, concatenated to the text tokens along features: unet.context_dim grows by D_c
    vector   (B, V_c) concatenated to the vector (pooled text / SDXL sizes): unet.adm_in_channels grows by V_c
    concat   (B, C_c, h, w) channels after the latent's: unet.in_channels grows by C_c
    control  ``control(x, t, cond, hint)`` -> residuals for the skip connections (ControlNet); several add up
    adapter  ``control(x, t, cond, hint)`` -> T2I-Adapter features added inside the encoder

"No condition" (dropped in training, the unconditional branch of guidance) is ``null``: zeros of the entered
shape by default (a zero one-hot label, zero channels; control types add nothing).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .spec import ConditionSpec

ENTRIES = ("context", "vector", "concat", "control", "adapter")
VALUES = ("image", "label", "number", "raw")  # raw: the column's values as they are (strings, JSON, lists)

REGISTRY: dict[str, type["Condition"]] = {}


@dataclass
class NoArgs:
    pass


@dataclass
class Env:
    """What ``prepare`` may need: the latent's size, where tensors go, and the (frozen) VAE for image latents."""

    latent_hw: tuple[int, int]
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    vae: nn.Module | None = None


class Condition(nn.Module):
    type_name: ClassVar[str] = ""
    enters: ClassVar[str] = ""
    value: ClassVar[str] = "image"
    Args: ClassVar[type] = NoArgs

    def __init__(self, spec: ConditionSpec, model: Any):
        super().__init__()
        self.spec = spec
        self.args = self.parse_args(spec)

    @classmethod
    def parse_args(cls, spec: ConditionSpec) -> Any:
        """``spec.args`` as this type's ``Args`` dataclass; errors name ``conditions[NAME].args.KEY``."""
        known = {f.name for f in dataclasses.fields(cls.Args)}
        unknown = sorted(set(spec.args) - known)
        if unknown:
            raise ValueError(f"{spec.where}.args.{unknown[0]}: not a setting of condition type {cls.type_name!r}; "
                             f"its settings: {', '.join(sorted(known)) or '(none)'}")  # fmt: skip
        try:
            return cls.Args(**spec.args)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{spec.where}.args: {e}") from None

    @classmethod
    def width(cls, spec: ConditionSpec, model: Any) -> int:
        """Features this condition adds to the U-Net's input of its kind (context, vector, concat); 0 for controls."""
        return 0

    def prepare(self, value: Any, env: Env) -> Tensor:
        """The raw value of a batch (collated column, or the call argument as tensors) -> (B, ...) on env.device."""
        return torch.as_tensor(value).to(env.device)

    def forward(self, x: Tensor) -> Tensor:
        """Prepared -> what enters the U-Net; control types return the hint unchanged."""
        return x

    def null(self, entered: Tensor) -> Tensor:
        """The "no condition" in place of ``entered``."""
        return torch.zeros_like(entered)

    def init_from_unet(self, unet: nn.Module) -> None:
        """A new condition beside a base U-Net (ControlNet copies its encoder); not called when loading weights."""

    def control(self, x: Tensor, t: Tensor, cond: Any, hint: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError(f"condition type {self.type_name!r} enters {self.enters!r}, not as a control")


def register(name: str):
    """Class decorator: register a Condition subclass under ``name`` (the ``type:`` of a conditions entry)."""

    def add(cls: type[Condition]) -> type[Condition]:
        if not (isinstance(cls, type) and issubclass(cls, Condition)):
            raise TypeError(f"register({name!r}): expected a Condition subclass, got {cls!r}")
        if cls.enters not in ENTRIES:
            raise ValueError(f"condition type {name!r}: enters must be one of {', '.join(ENTRIES)}, got {cls.enters!r}")
        if cls.value not in VALUES:
            raise ValueError(f"condition type {name!r}: value must be one of {', '.join(VALUES)}, got {cls.value!r}")
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"condition type {name!r} is already registered ({REGISTRY[name].__qualname__})")
        cls.type_name = name
        REGISTRY[name] = cls
        return cls

    return add


def condition_type(spec: ConditionSpec) -> type[Condition]:
    """The registered class of ``spec.type``; ValueError naming the entry and the known types.

    ``type: package.module:Class`` imports ``package.module`` first (which registers its types with
    ``@register``; nothing else of the module is used) and takes the Condition subclass ``Class`` from it: a
    condition type of your own needs no edit of this library."""
    if ":" in spec.type and spec.type not in REGISTRY:
        return _imported_type(spec)
    if spec.type not in REGISTRY:
        raise ValueError(f"{spec.where}.type: unknown condition type {spec.type!r}; registered: "
                         f"{', '.join(sorted(REGISTRY))} (a new type registers with @ldm.conditions.register)")  # fmt: skip
    return REGISTRY[spec.type]


def _imported_type(spec: ConditionSpec) -> type[Condition]:
    import importlib

    module_name, _, attr = spec.type.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{spec.where}.type: cannot import {module_name!r} ({e})") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Condition) and REGISTRY.get(cls.type_name) is cls):
        raise ValueError(f"{spec.where}.type: {spec.type!r} is not a condition type registered with "
                         f"@ldm.conditions.register")  # fmt: skip
    return cls
