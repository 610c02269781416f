"""Checkpoints of a running training: write the live state (``save_state``), load it back (``resume``).

The files and their atomicity are training/checkpointing.py's; this module maps them to the trainer's live objects
(the Trainable of trained tensors, the optimizer, the EMA, the RNG states and the data position).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ldm.checkpoint import CheckpointError, read_state_dict
from ldm.config import to_yaml

from . import checkpointing as ckpt
from . import distributed as dist
from .conditions import keyed_seed
from .config import TrainConfig

__all__ = ["resume", "save_state"]

logger = logging.getLogger("ldm.train")


def save_state(cfg, state, trainable, param_names, optimizer, ema, ckroot, accelerator) -> Path:
    """Every process calls it. Under FSDP (sharded DTensor parameters) every process first takes part in gathering
    the weights, the optimizer states and the EMA; rank 0 then writes the files of a one-process checkpoint."""
    main = accelerator.is_main_process
    if any(dist.is_dtensor(p) for p in trainable.parameters()):
        model_state = dist.gather_full(trainable.named_tensors(), main)
        optimizer_state = dist.full_optimizer_state(optimizer, main)
        ema_state = dist.gather_full(ema.state_dict(), main) if ema is not None else None
    else:
        model_state = {k: p.detach() for k, p in trainable.named_tensors().items()} if main else None
        optimizer_state = optimizer.state_dict() if main else None
        ema_state = ema.state_dict() if (ema is not None and main) else None
    return ckpt.save_checkpoint(
        ckroot, state, model_state=model_state, optimizer_state=optimizer_state, param_names=param_names,
        ema_state=ema_state, generator=None,
        config_yaml=to_yaml(cfg), rank=accelerator.process_index, world_size=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone, keep_last=cfg.keep_last,
    )  # fmt: skip


def resume(path: Path, cfg, trainable, param_names, optimizer, ema, rank: int, world: int) -> ckpt.TrainState:
    """Load a checkpoint folder into the live objects; returns its TrainState (the data position included).
    Whatever wrote it (1 process, DDP, FSDP), the files hold whole tensors; under FSDP every process reads them and
    keeps its own shard of each (training/distributed.py)."""
    state = ckpt.read_train_state(path)
    changed = _changed_settings(path / "config.yaml", cfg)
    if changed:
        logger.warning("resuming with settings that differ from the checkpoint's (the run is then not the one an "
                       "uninterrupted run would have been): %s", ", ".join(changed))  # fmt: skip
    # read and check every file first, then apply: a truncated or corrupt file leaves the live objects untouched
    weights = read_state_dict(path / "model.safetensors")
    if sorted(weights) != sorted(param_names):
        missing, extra = sorted(set(param_names) - set(weights)), sorted(set(weights) - set(param_names))
        raise CheckpointError(f"{path / 'model.safetensors'}: holds other weights than this run trains: missing "
                              f"{missing[:3]} ({len(missing)}), unexpected {extra[:3]} ({len(extra)})")  # fmt: skip
    for name, p in trainable.named_tensors().items():
        if weights[name].shape != p.shape:
            raise CheckpointError(f"{path / 'model.safetensors'}: {name} has shape {tuple(weights[name].shape)}, "
                                  f"the model {tuple(p.shape)}")  # fmt: skip
    optimizer_state = ckpt.read_optimizer_state(path, param_names)
    ema_state = None
    if ema is not None and (path / "ema.json").is_file():
        ema_state = ckpt.read_state(path / "ema")
    sharded = any(dist.is_dtensor(p) for p in trainable.parameters())
    if sharded:
        optimizer_state = dist.shard_optimizer_state(optimizer_state, optimizer)
        if ema_state is not None:
            shadows = {f"shadow.{n}": s for n, s in ema.shadow.items()}
            ema_state = {k: dist.shard_like(v, shadows[k]) if k in shadows else v for k, v in ema_state.items()}
    with torch.no_grad():
        for name, p in trainable.named_tensors().items():
            p.copy_(dist.shard_like(weights[name], p))
    optimizer.load_state_dict(optimizer_state)
    for group in optimizer.param_groups:  # hyper-parameters come from this run's config
        group.update(betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    if ema is not None:
        if ema_state is not None:
            ema.load_state_dict(ema_state)
        else:
            logger.warning("%s has no EMA state: the EMA starts from the resumed weights", path)
            current = {f"shadow.{n}": p.detach() for n, p in trainable.named_parameters()}
            ema.load_state_dict({**current, "num_updates": torch.tensor(0)})
    if state.world_size == world:
        ckpt.load_rng(path / "rng" / f"rank-{rank}")
    else:  # the same global position, in this run's per-process batches; draws stay keyed, so only order moves
        logger.warning("checkpoint written by %d processes, resuming with %d: not bit-exact", state.world_size, world)
        state.batch_in_epoch = state.batch_in_epoch * state.world_size // world
        torch.manual_seed(keyed_seed(cfg.seed, "process", rank, state.step))
    state.world_size = world
    return state


# settings whose change makes a resumed run differ from the uninterrupted one (max_steps, logging, validation ... may change)
_EXACTNESS_KEYS = ("task", "vae_loss", "vae_fit_scale", "model", "data", "shapes", "loss", "optim", "lr_schedule", "batch_size", "grad_accum", "seed", "ema",
                   "lora", "train_text_encoder", "cond_dropout", "mixed_precision", "grad_clip")  # fmt: skip


def _changed_settings(saved_yaml: Path, cfg: TrainConfig) -> list[str]:
    import yaml

    try:
        saved = yaml.safe_load(saved_yaml.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return ["(the checkpoint's config.yaml is unreadable)"]
    now = yaml.safe_load(to_yaml(cfg))
    return [k for k in _EXACTNESS_KEYS if saved.get(k) != now.get(k)]
