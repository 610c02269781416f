"""The run's further conditions (``conditions:`` of a TrainConfig, ldm/conditions/) in the trainer.

    cfg = with_condition_columns(cfg)            # their columns into the batch; image columns cropped with the image
    check_condition_columns(cfg, hf_dataset)     # a missing column fails before any model is built
    bundle = build_bundle(cfg)                   # from scratch: the U-Net's inputs are derived from the conditions
    extra = condition_extra(bundle.conditions, batch, ...)   # Cond.extra: values + per-condition dropout

Conditions a loaded model already has are kept (a run's entry with the same name must match its type and args);
new ones are created beside it. A new control (ControlNet) starts from the base U-Net's encoder; a new condition
that widens the U-Net's inputs (context, vector, concat) gets zero-initialised input weights (InstructPix2Pix's
recipe, ldm/conditions/widen.py), so a fine-tune starts from exactly the loaded model.
Dropout: each condition is dropped independently, sample by sample, with its own ``drop`` probability, from the
stream keyed by (seed, epoch, row, "cond/NAME") (training/conditions.py), so N processes drop what one would.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ldm.conditions import ConditionSpec, ConditionStack, Env, condition_type
from ldm.conditions.widen import widen_unet
from ldm.model_config import ModelConfig

from .conditions import drop_flags
from .datasets_io import _column_names

__all__ = ["check_condition_columns", "condition_extra", "merged_conditions", "with_condition_columns"]


def with_condition_columns(cfg):
    """``cfg`` with each condition's column in data.extra_columns, image-valued ones also in data.image_columns."""
    extra, images = list(cfg.data.extra_columns), list(cfg.data.image_columns)
    for spec in cfg.conditions:
        if spec.column not in extra:
            extra.append(spec.column)
        if condition_type(spec).value == "image" and spec.column not in images:
            images.append(spec.column)
    if (extra, images) == (cfg.data.extra_columns, cfg.data.image_columns):
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, extra_columns=extra, image_columns=images))


def check_condition_columns(cfg, hf_dataset) -> None:
    """ValueError naming each condition whose column the dataset lacks, and the columns it has."""
    names = _column_names(hf_dataset)
    for spec in cfg.conditions:
        if spec.column not in names:
            raise ValueError(f"{spec.where}.column: no column {spec.column!r} in {cfg.data.source!r}; available "
                             f"columns: {', '.join(names) or '(none)'}")  # fmt: skip


def merged_conditions(have: list[ConditionSpec], add: list[ConditionSpec]) -> list[ConditionSpec]:
    """The model's conditions followed by the run's new ones; a run entry named like a model one must match it."""
    by_name = {s.name: s for s in have}
    out = list(have)
    for s in add:
        old = by_name.get(s.name)
        if old is None:
            out.append(s)
        elif (old.type, old.args) != (s.type, s.args):
            raise ValueError(f"{s.where}: the model already has a condition {s.name!r} of type {old.type!r} with args "
                             f"{old.args}; name the new one differently")  # fmt: skip
        else:  # the run's training settings (drop, train, scale ...) apply
            out[out.index(old)] = s
    return out


def scratch_config(model_cfg: ModelConfig, specs: list[ConditionSpec]) -> ModelConfig:
    """A from-scratch model's config with the run's conditions and the U-Net inputs derived from them."""
    return model_cfg.with_conditions(merged_conditions(model_cfg.conditions, specs)) if specs else model_cfg


def add_to_loaded(bundle, specs: list[ConditionSpec], seed: int) -> None:
    """New conditions beside a loaded model. Controls start from its U-Net's encoder; conditions that widen the
    U-Net's inputs get zero-initialised input weights (ldm/conditions/widen.py), so training starts from the model
    exactly as it was."""
    cfg = bundle.config
    merged = merged_conditions(cfg.conditions, specs)
    new = [s for s in merged if s.name not in {c.name for c in cfg.conditions}]
    if not new and merged == cfg.conditions:
        return
    grown = cfg.with_conditions(merged)
    torch.manual_seed(seed)
    if grown.unet != cfg.unet:  # new inputs: zero-initialised, so training starts from the model as it was
        controls = [s.name for s in cfg.conditions if condition_type(s).enters in ("control", "adapter")]
        if controls:
            raise ValueError(f"conditions: this model's controls ({', '.join(controls)}) copy the U-Net's input "
                             f"shapes, so its inputs cannot grow for {', '.join(s.name for s in new)}; add the new "
                             f"conditions to the base model first")  # fmt: skip
        bundle.unet = widen_unet(bundle.unet, grown.unet)
    stack = ConditionStack(merged, grown)
    if bundle.conditions is not None:
        stack.load_state_dict(bundle.conditions.state_dict(), strict=False)
    for s in new:
        stack[s.name].init_from_unet(bundle.unet)
    bundle.conditions, bundle.config = stack, grown


def condition_extra(stack: ConditionStack, batch: dict, *, seed: int, epoch: int, indices: list[int],
                    latent_hw: tuple[int, int], device, vae) -> dict[str, Tensor]:  # fmt: skip
    """``Cond.extra`` of one micro-batch: each condition's prepared column value and its keep flags (dropout)."""
    values, keep = {}, {}
    for c in stack:
        s = c.spec
        values[s.name] = batch[s.column]
        keep[s.name] = ~drop_flags(s.drop, seed, epoch, indices, f"cond/{s.name}")
    env = Env(latent_hw=tuple(latent_hw), device=device, vae=vae)
    return stack.prepare(values, env, len(indices), keep)
