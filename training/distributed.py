"""Training on several processes: which distributions the trainer takes, FSDP sharding, gathering sharded state,
and failing fast instead of hanging.

    DDP   configs/accelerate/ddp.yaml    every process holds the whole model; gradients all-reduced (accelerate)
    FSDP  configs/accelerate/fsdp.yaml   the U-Net's parameters, gradients, AdamW states and EMA sharded (FSDP2)
    DeepSpeed                            refused (its engine owns the optimizer; see deepspeed_zero2.yaml)

FSDP, as done here. Accelerate picks the distribution from its config (``distributed_type: FSDP``); the sharding
itself is ``torch.distributed.fsdp.fully_shard`` (FSDP2) called by ``shard_unet``: one unit per U-Net block
(every ``input_blocks[i]``, the ``middle_block``, every ``output_blocks[i]``) and the root (time embedding, ``out``).
Not accelerate's own ``prepare`` for FSDP2, for three reasons: it takes exactly one model and wraps by a size
threshold that counts nested parameters (every ancestor above it becomes a unit too), its bf16 policy reduces
gradients in bf16 (DDP averages them in fp32), and accelerate offers no FSDP on CPUs, so the CPU tests could
not run the code the GPUs run. Here they do: ``LDM_TEST_FSDP_ON_CPU=1`` (a test hook) takes this same path on
CPU processes over gloo (tests/test_train_distributed.py). The settings read from accelerate's FSDP plugin:
``fsdp_reshard_after_forward`` (FULL_SHARD: true, SHARD_GRAD_OP: false), ``fsdp_offload_params`` and
``fsdp_activation_checkpointing`` (the U-Net's own per-block checkpointing); the rest of fsdp_config is not used.

    mixed precision  the fp32 weights are all-gathered as they are and accelerate's autocast wraps the U-Net's
                     forward as under DDP, so FSDP computes what DDP computes (gradients averaged in fp32). Measured
                     on 2 CPU processes, bf16, 4 steps against one process: losses within 3.4e-6 (fp32: equal).
                     ``LDM_FSDP_PARAM_DTYPE=bf16`` all-gathers bf16 copies instead (MixedPrecisionPolicy param_dtype;
                     half the traffic): normalisation weights and all gradients then pass through bf16, losses
                     moved 7e-5 in the same 4 steps. A speed option to measure (bench/scaling.py), not the default.
    optimizer        made after sharding, over the sharded parameters (DTensors): each rank steps its shard.
    EMA              kept per shard (``ldm.ema.EMA`` over the DTensor parameters, foreach ops run shard-local):
                     1/N of the memory and of the update work, no communication per step; gathered only where a
                     whole copy is needed (checkpoint, validation, final bundle). Gathering it every step, or
                     keeping a whole EMA on rank 0, would cost a full all-gather per step or N x the memory.
    checkpoints      ``gather_full`` / ``full_optimizer_state``: every process takes part in the all-gathers,
                     rank 0 receives whole CPU tensors and writes THE SAME files as one process
                     (training/checkpointing.py), so a checkpoint moves freely between 1 process, DDP and FSDP;
                     on resume every process reads the whole files and keeps its shard (``shard_like``).
    validation,      ``full_view``: gathered on every process (a collective), then rank 0 alone builds a plain,
    final bundle     unsharded U-Net with those weights (and the gathered EMA) and samples / saves from it while
                     the others wait at the next barrier: a sharded module's forward is a collective, so rank 0
                     must not run it alone.

Supported under FSDP: task=unet training the whole U-Net (the text towers frozen), bf16 or fp32. Refused with a
reason: train_text_encoder (a second trained module), LoRA (frozen bf16 base and fp32 adapters in one unit),
train_unet=false and conditions (ControlNets, adapters: further modules beside the U-Net), task=vae, fp16 (its
gradient scaler is accelerate's, bound to accelerate's own FSDP preparation); use DDP there.

No hang. The process group is made with ``timeout = dist_timeout_s`` (TrainConfig, default 600 s): a collective
that waits longer raises (gloo) or is aborted by the NCCL watchdog. A process whose training raises calls
``fail_fast``: it prints "ldm train: rank R failed: ..." with the traceback to stderr and leaves at once with a
non-zero code (``os._exit``, no interpreter teardown that could block on a communicator); torchrun then stops the
other processes and exits non-zero itself. ``dist_timeout_s`` must exceed the longest pause of one process while
the others wait at a barrier (a validation grid, a checkpoint write, the final save).

Test hooks (read once per optimizer step, unset they cost one environment lookup):
``LDM_TEST_FAIL_AT_STEP=K`` makes process ``LDM_TEST_FAIL_RANK`` (default 1) fail at the start of optimizer step K:
``LDM_TEST_FAIL_HOW=raise`` (default) raises a RuntimeError, ``hang`` sleeps for an hour, so that the others must
time out. ``LDM_TEST_FSDP_ON_CPU=1``: the FSDP path on CPU processes (see above).
"""
from __future__ import annotations

import copy
import logging
import os
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "check_distribution", "fail_fast", "full_optimizer_state", "full_view", "gather_full", "is_dtensor",
    "is_sharded", "no_sync", "process_group_kwargs", "shard_bundle_unet", "shard_like", "shard_optimizer_state",
    "shard_unet", "test_fail_hook",
]

logger = logging.getLogger("ldm.train")
TEST_FSDP_ON_CPU = "LDM_TEST_FSDP_ON_CPU"


# ------------------------------------------------------------------------------------------ which distribution


def process_group_kwargs(timeout_s: float):
    """Accelerate's handler that makes the process group with a timeout of ``timeout_s`` seconds."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))


def is_sharded(accelerator) -> bool:
    """FSDP: from accelerate's config, or on CPU processes through the test hook."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return True
    return kind == DistributedType.MULTI_CPU and os.environ.get(TEST_FSDP_ON_CPU, "") == "1"


def check_distribution(accelerator, cfg=None) -> None:
    """Refuse DeepSpeed, and under FSDP what this trainer does not shard, each with its reason and what to use."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ValueError(
            "accelerate: distributed type DEEPSPEED is not supported by this trainer (the DeepSpeed engine owns the "
            "optimizer, its loss scaling and clipping; its sharded state is no torch optimizer state_dict that "
            "training/checkpointing.py can store); use configs/accelerate/ddp.yaml or configs/accelerate/fsdp.yaml"
        )
    if cfg is None or not is_sharded(accelerator):
        return
    clashes = [("train_unet", not getattr(cfg, "train_unet", True), "true"),
               ("train_text_encoder", cfg.train_text_encoder, "false"), ("lora", cfg.lora is not None, "null"),
               ("task", cfg.task != "unet", "unet"),
               ("conditions", bool(getattr(cfg, "conditions", None)), "[]"),
               ("mixed_precision", cfg.mixed_precision == "fp16", "bf16")]  # fmt: skip
    for key, bad, fix in clashes:
        if bad:
            raise ValueError(f"{key}: not supported under FSDP by this trainer (it shards the U-Net alone, "
                             f"trained whole, in bf16 or fp32); set {key}={fix}, or use "
                             f"configs/accelerate/ddp.yaml")  # fmt: skip


# ------------------------------------------------------------------------------------------------ sharding


def _units(unet: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root: every block of the U-Net (whatever has none is sharded as one unit)."""
    units: list[nn.Module] = []
    for name in ("input_blocks", "middle_block", "output_blocks"):
        m = getattr(unet, name, None)
        if isinstance(m, nn.ModuleList):
            units.extend(m)
        elif isinstance(m, nn.Module):
            units.append(m)
    return units


def shard_unet(unet: nn.Module, accelerator, weight_dtype: torch.dtype) -> nn.Module:
    """Shard ``unet`` in place with FSDP2 (module docstring), wrap its forward in accelerate's autocast; returns it.
    Its parameters become DTensor parameters: make the optimizer, the Trainable and the EMA after this."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    reshard = True
    offload: OffloadPolicy = OffloadPolicy()
    if plugin is not None:
        if getattr(plugin, "activation_checkpointing", False):  # the U-Net's own per-block checkpointing
            unet.gradient_checkpointing = True
        if getattr(plugin, "fsdp_version", 2) != 2:
            logger.warning("fsdp_version %s in the accelerate config: this trainer shards with FSDP2 (fully_shard)",
                           plugin.fsdp_version)  # fmt: skip
        value = getattr(plugin, "reshard_after_forward", True)
        reshard = value if isinstance(value, bool) else "SHARD_GRAD_OP" not in str(value)
        if isinstance(getattr(plugin, "cpu_offload", None), CPUOffloadPolicy) or \
                getattr(getattr(plugin, "cpu_offload", None), "offload_params", False):  # fmt: skip
            offload = CPUOffloadPolicy()
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    low = os.environ.get("LDM_FSDP_PARAM_DTYPE") == "bf16" and weight_dtype != torch.float32
    mp = MixedPrecisionPolicy(param_dtype=weight_dtype if low else None, reduce_dtype=torch.float32)
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    for unit in _units(unet):
        fully_shard(unit, reshard_after_forward=reshard, **kw)
    fully_shard(unet, **kw)  # the root: the time embedding and `out`; kept gathered between forward and backward
    if accelerator.is_main_process:
        logger.info("FSDP2: U-Net sharded over %d processes in %d units + the root (reshard_after_forward=%s, "
                    "all-gather dtype %s, fp32 gradient reduction)", accelerator.num_processes, len(_units(unet)),
                    reshard, mp.param_dtype or torch.float32)  # fmt: skip
    # autocast around the forward, as accelerate's prepare does for DDP (no device placement: the shards are placed)
    return accelerator.prepare_model(unet, device_placement=False, evaluation_mode=True)


def shard_bundle_unet(bundle, accelerator, weight_dtype: torch.dtype) -> dict[str, nn.Parameter]:
    """``shard_unet(bundle.unet)`` for the trainer; returns the trained parameters, {"unet.<name>": DTensor}."""
    if getattr(bundle, "conditions", None) is not None:
        raise ValueError("model.source: this model carries conditions (ldm/conditions/, e.g. a ControlNet), which "
                         "this trainer does not shard; train it with configs/accelerate/ddp.yaml")  # fmt: skip
    shard_unet(bundle.unet, accelerator, weight_dtype)
    return {f"unet.{n}": p for n, p in bundle.unet.named_parameters() if p.requires_grad}


@contextmanager
def no_sync(accelerator, module: nn.Module) -> Iterator[None]:
    """No gradient synchronisation on this micro-batch: FSDP2 keeps the unsharded gradients; DDP skips the
    all-reduce (accelerate's no_sync)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(module):
            yield


def clip_grad_norm(accelerator, params: list[Tensor], max_norm: float, sharded: bool) -> Tensor:
    """The global gradient norm, gradients clipped to ``max_norm``. Sharded parameters (DTensors): torch's
    clip_grad_norm_ reduces the shards' norms itself (accelerate's FSDP branch expects a model it prepared, which
    the trainer's own fully_shard is not: it compares tensor lists and fails)."""
    if not sharded:
        return accelerator.clip_grad_norm_(params, max_norm)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if is_dtensor(norm) else norm


# ------------------------------------------------------------------------------------- gathering, sharding back


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support
        return False
    return isinstance(t, DTensor)


def gather_full(named: dict[str, Tensor], main: bool) -> dict[str, Tensor] | None:
    """Whole CPU copies of ``named`` on the main process (None elsewhere). A DTensor is all-gathered, so under FSDP
    EVERY process must call this with the same names in the same order; plain tensors are just copied."""
    out: dict[str, Tensor] | None = {} if main else None
    for name, t in named.items():
        full = t.detach().full_tensor() if is_dtensor(t) else t.detach()
        if main:
            out[name] = full.to("cpu", copy=True)
        del full
    return out


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """This process's shard of the whole tensor ``full``, laid out as the DTensor ``like`` (no communication: every
    process holds ``full``); ``full`` itself where ``like`` is a plain tensor."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"shape {tuple(full.shape)} does not fit the sharded tensor's {tuple(like.shape)}")
    return distribute_tensor(full.detach().to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)  # fmt: skip


def _params_in_order(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(optimizer: torch.optim.Optimizer, main: bool) -> dict | None:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole, on the main process: the format of
    one process's optimizer. Collective where the state holds DTensors (every process calls it)."""
    sd = optimizer.state_dict()
    state = {}
    for index in sorted(sd["state"]):  # the same order on every process
        per_param = sd["state"][index]
        gathered = gather_full({k: v for k, v in per_param.items() if torch.is_tensor(v)}, main)
        if main:
            state[index] = {k: gathered[k] if torch.is_tensor(v) else v for k, v in per_param.items()}
    return {"state": state, "param_groups": sd["param_groups"]} if main else None


def shard_optimizer_state(full: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A whole optimizer state (one process's format) with every per-parameter tensor shaped like its parameter cut
    to this process's shard, ready for ``optimizer.load_state_dict``."""
    params = _params_in_order(optimizer)
    state = {}
    for index, per_param in full["state"].items():
        p = params[int(index)]
        state[index] = {k: shard_like(v, p) if torch.is_tensor(v) and is_dtensor(p) and v.shape == p.shape else v
                        for k, v in per_param.items()}  # fmt: skip
    return {"state": state, "param_groups": full["param_groups"]}


def full_view(bundle, trainable, ema, main: bool, device) -> tuple[Any, Any, Any]:
    """(bundle, trainable, ema) with whole weights, for validation and the final save on the main process.

    Unsharded: the objects themselves. Sharded: every process takes part in gathering the U-Net's weights and the
    EMA (collective); the main process gets a shallow copy of the bundle whose U-Net is a plain module on
    ``device`` with the gathered weights, a Trainable over it under the same names, and an EMA whose shadows are
    the gathered ones (on the CPU); the other processes get their own objects back (they sample and save nothing).
    """
    if not any(is_dtensor(p) for p in trainable.parameters()):
        return bundle, trainable, ema
    from ldm.checkpoint import load_into
    from ldm.components import get_component

    weights = gather_full(dict(bundle.unet.state_dict()), main)
    shadows = gather_full(ema.shadow, main) if ema is not None else None
    if not main:
        return bundle, trainable, ema
    with torch.device("meta"):
        plain = get_component("unet").build(bundle.config.unet)
    load_into(plain, weights, device=device, dtype=torch.float32, source="gathered U-Net")
    plain.train(bundle.unet.training)
    del weights
    view = copy.copy(bundle)
    view._modules = {**bundle._modules, "unet": plain}  # a new dict: the original bundle keeps its sharded U-Net
    by_name = dict(plain.named_parameters())
    view_trainable = type(trainable)({name: by_name[name.removeprefix("unet.")] for name in trainable.named_tensors()})
    view_ema = None
    if ema is not None:
        view_ema = copy.copy(ema)
        view_ema.shadow, view_ema._stored = shadows, None
    return view, view_trainable, view_ema


# ------------------------------------------------------------------------------------------------- failing


def test_fail_hook(step: int, rank: int) -> None:
    """The LDM_TEST_FAIL_* hook of the module docstring, at the start of optimizer step ``step`` (1-based)."""
    at = os.environ.get("LDM_TEST_FAIL_AT_STEP")
    if not at or int(at) != step or int(os.environ.get("LDM_TEST_FAIL_RANK", "1")) != rank:
        return
    if os.environ.get("LDM_TEST_FAIL_HOW", "raise") == "hang":
        time.sleep(3600)
    raise RuntimeError(f"LDM_TEST_FAIL_AT_STEP: process {rank} fails at step {step} (test hook)")


def fail_fast(exc: BaseException, rank: int, code: int, timeout_s: float | None = None) -> None:
    """Report ``exc`` of process ``rank`` on stderr and leave at once with ``code`` (module docstring)."""
    try:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        hint = ""
        if "timed out" in str(exc).lower() or "timeout" in type(exc).__name__.lower():
            hint = (f"\nldm train: rank {rank}: a collective waited longer than dist_timeout_s={timeout_s}: another "
                    f"process failed or stopped answering (see its messages), or it worked alone longer than that")
        sys.stderr.write(f"{text}ldm train: rank {rank} failed: {type(exc).__name__}: {exc}{hint}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        logging.shutdown()
    finally:
        os._exit(code)
