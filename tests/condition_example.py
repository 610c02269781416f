"""A condition type of one's own: where the first object should be, as (x, y) in [0, 1] (docs/conditions.md).

Used from YAML with ``type: tests.condition_example:Position``; trained from the shapes data's ``objects`` column
(a JSON scene), given at inference as two numbers (``--cond position=0.2,0.7``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldm.conditions import Condition, Env, register


@dataclass
class PositionArgs:
    width: int = 32  # features added to the U-Net's vector

    def __post_init__(self) -> None:
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"width: an integer >= 1, got {self.width!r}")


@register("position")
class Position(Condition):
    enters = "vector"  # added to the time embedding through the U-Net's vector projection
    value = "raw"  # training: the JSON scene strings; inference: [x, y] numbers
    Args = PositionArgs

    def __init__(self, spec, model):
        super().__init__(spec, model)
        w = self.args.width
        self.mlp = nn.Sequential(nn.Linear(2, w), nn.SiLU(), nn.Linear(w, w))  # trained with the U-Net

    @classmethod
    def width(cls, spec, model) -> int:
        return cls.parse_args(spec).width

    def prepare(self, value, env: Env) -> Tensor:
        rows = []
        for v in value:
            if isinstance(v, str):  # a scene: the first object's centre
                first = json.loads(v)["objects"][0]
                v = (first["x"], first["y"])
            x, y = (float(a) for a in v)
            if not (0 <= x <= 1 and 0 <= y <= 1):
                raise ValueError(f"{self.spec.where}: x and y must lie in [0, 1], got {(x, y)}")
            rows.append((x, y))
        return torch.tensor(rows, device=env.device)  # (B, 2)

    def forward(self, xy: Tensor) -> Tensor:
        return self.mlp(xy * 2 - 1)  # (B, width); "no position" is the zero vector (Condition.null)
