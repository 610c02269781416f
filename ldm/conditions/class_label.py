"""``class_label``: an integer class (CIFAR-10's label, ImageNet's) as a one-hot vector added to the U-Net's vector.

The U-Net's vector projection (``label_emb``: Linear, SiLU, Linear, the original's num_classes="sequential") maps
the one-hot vector to the time embedding's width, so the first Linear's columns are the learned class embeddings.
"No class" (dropped for guidance) is the all-zero vector.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Condition, Env, register


@dataclass
class ClassLabelArgs:
    num_classes: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes: an integer >= 1, got {self.num_classes!r}")


@register("class_label")
class ClassLabel(Condition):
    enters = "vector"
    value = "label"
    Args = ClassLabelArgs

    @classmethod
    def width(cls, spec, model) -> int:
        return cls.parse_args(spec).num_classes

    def prepare(self, value, env: Env) -> Tensor:
        labels = torch.as_tensor(value).reshape(-1)  # (B,)
        if labels.is_floating_point() and not torch.equal(labels, labels.round()):
            raise ValueError(f"{self.spec.where}: class labels must be integers, got {labels.tolist()[:8]}")
        labels = labels.long()
        bad = (labels < 0) | (labels >= self.args.num_classes)
        if bad.any():
            raise ValueError(f"{self.spec.where}: class label {int(labels[bad][0])} is outside [0, "
                             f"{self.args.num_classes}) (args.num_classes)")  # fmt: skip
        return labels.to(env.device)

    def forward(self, labels: Tensor) -> Tensor:
        return F.one_hot(labels, self.args.num_classes).float()  # (B, num_classes)
