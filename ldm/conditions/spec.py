"""ConditionSpec: one entry of a model's or a training run's ``conditions:`` list (YAML-able, validated).

    conditions:
      - type: controlnet      # a registered condition type (ldm/conditions/registry.py)
        name: edges           # unique key; default: the type
        column: edge_map      # the dataset column (training) / the call argument (inference); default: the name
        drop: 0.1             # probability of dropping it in a training sample (classifier-free guidance)
        train: true           # its own parameters are trained (a frozen base model can stay frozen)
        scale: null           # guidance scale of its own (null: not guided separately, present in every branch)
        weight: 1.0           # strength of what it adds (ControlNet's conditioning_scale)
        start: 0.0            # control types: the fraction of the sampling steps where it starts acting ...
        end: 1.0              # ... and stops (diffusers' control_guidance_start / _end)
        args: {hint_channels: 1}   # the type's own settings (its ``Args`` dataclass)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ConditionSpec:
    type: str = ""
    name: Optional[str] = None
    column: Optional[str] = None
    drop: float = 0.0
    train: bool = True
    scale: Optional[float] = None
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not self.type:
            raise ValueError(f"conditions: every entry needs a 'type' (a registered condition type), got {self.type!r}")
        self.name = self.name or self.type.rpartition(":")[2].lower()  # module:Class -> class
        self.column = self.column or self.name
        where = f"conditions[{self.name}]"
        for key in ("name", "column"):
            v = getattr(self, key)
            if not isinstance(v, str) or not v.strip() or "." in v:
                raise ValueError(f"{where}.{key}: a non-empty string without '.', got {v!r}")
        if not _num(self.drop) or not 0.0 <= self.drop <= 1.0:
            raise ValueError(f"{where}.drop: a probability in [0, 1], got {self.drop!r}")
        if not isinstance(self.train, bool):
            raise ValueError(f"{where}.train: true or false, got {self.train!r}")
        if self.scale is not None and (not _num(self.scale) or self.scale < 0):
            raise ValueError(f"{where}.scale: a guidance scale >= 0 or null, got {self.scale!r}")
        if not _num(self.weight):
            raise ValueError(f"{where}.weight: a number, got {self.weight!r}")
        if not (_num(self.start) and _num(self.end) and 0.0 <= self.start < self.end <= 1.0):
            raise ValueError(f"{where}.start, end: need 0 <= start < end <= 1, got start={self.start!r}, end={self.end!r}")
        if not isinstance(self.args, dict):
            raise ValueError(f"{where}.args: a mapping of the type's settings, got {self.args!r}")
        self.args = dict(self.args)

    @property
    def where(self) -> str:
        """How errors name this entry: ``conditions[NAME]``."""
        return f"conditions[{self.name}]"


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_specs(specs: list[ConditionSpec]) -> list[ConditionSpec]:
    """Names unique, columns unique; returns the list. Raises ValueError naming the duplicate."""
    seen: dict[str, str] = {}
    for s in specs:
        if not isinstance(s, ConditionSpec):
            raise ValueError(f"conditions: each entry is a mapping with a 'type', got {s!r}")
        if s.name in seen:
            raise ValueError(f"conditions[{s.name}]: two conditions with the name {s.name!r}; give one a 'name'")
        seen[s.name] = s.column
    columns = list(seen.values())
    dup = sorted({c for c in columns if columns.count(c) > 1})
    if dup:
        raise ValueError(f"conditions: column {dup[0]!r} is read by two conditions; give each its own 'column'")
    return specs
