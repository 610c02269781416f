"""Condition types: one registry from dataset column to U-Net to guidance (docs/conditions.md).

    from ldm.conditions import Condition, register          # a new type: one small class (docs/conditions.md)
    stack = ConditionStack(model_cfg.conditions, model_cfg)  # the configured conditions, as modules
    net = ConditionedUNet(unet, stack)                       # the U-Net's signature, conditions applied inside

Built-in types (each in its own file): ``class_label``, ``scalars``, ``image_concat``, ``controlnet``,
``t2i_adapter``. The text condition is the model's text towers (ldm/bundle.py, inference/conditioning.py), whose
tokens every other context condition is appended to.
"""
from .base import ENTRIES, REGISTRY, VALUES, Condition, Env, NoArgs, condition_type, register
from .class_label import ClassLabel
from .control import AdapterCondition, ControlNetCondition
from .guidance import guided_branches
from .image_concat import ImageConcat
from .scalars import Scalars
from .spec import ConditionSpec, check_specs
from .stack import KEEP, ConditionedUNet, ConditionStack, condition_widths, member_widths

__all__ = [
    "ENTRIES", "KEEP", "REGISTRY", "VALUES", "AdapterCondition", "ClassLabel", "Condition", "ConditionSpec",
    "ConditionStack", "ConditionedUNet", "ControlNetCondition", "Env", "ImageConcat", "NoArgs", "Scalars",
    "check_specs", "condition_type", "condition_widths", "guided_branches", "member_widths", "register",
]
