"""Training checkpoints as data: save a step folder atomically, find the newest complete one, resume from it.

    output_dir/checkpoints/
        step-00000100/
            state.json               TrainState: step, epoch, batches consumed in that epoch, skip counters
            config.yaml              the TrainConfig of the run that wrote it
            model.safetensors        the trainable weights (U-Net [+ text towers], or the LoRA tensors alone)
            optimizer.safetensors    optimizer tensors (exp_avg, exp_avg_sq, step ...)
            optimizer.json           everything else of optimizer.state_dict(), plus the parameter names in order
            ema.safetensors/.json    EMA state (when EMA is on)
            rng/rank-{r}.safetensors torch CPU / CUDA / training-generator states of process r; numpy MT keys
            rng/rank-{r}.json        Python `random` state and the rest of numpy's state
        step-00000200/
        latest                       "step-00000200": the newest complete checkpoint

Nothing is pickled: tensors go to safetensors, the rest to JSON / YAML (ARCHITECTURE.md, habit 8). A nested
state (``optimizer.state_dict()``, an EMA state) is split by ``split_state`` into its tensors and a JSON skeleton
that names them; ``join_state`` puts it back together, int dict keys and tuples included.

Atomicity ("nothing is lost"): every process writes into ``.tmp-step-XXXXXXXX``; once all are done the main
process renames it to ``step-XXXXXXXX`` (a rename within one folder is atomic), then replaces ``latest``
atomically, and only then prunes old checkpoints beyond ``keep_last``. An exception while writing leaves the
previous checkpoint and ``latest`` untouched (the partial temp folder is removed, or ignored and cleaned later).
``find_latest`` trusts ``latest`` when it names a complete folder, and otherwise picks the highest complete step.

A failed write (disk full: ``OSError(ENOSPC)``, a read-only disk ...) raises an OSError with the same errno whose
message names the checkpoint and says that the older checkpoints and ``latest`` are unchanged.

Test hook (tests/test_reliability_training.py, which kills a real training process in the middle of a write):
``LDM_TEST_CHECKPOINT_PAUSE="STEP:PATH"`` makes the main process, while writing checkpoint STEP, create the file
PATH once the weights are in the temp folder and then sleep, so that the kill lands between two files. Unset, it
costs one environment lookup per checkpoint.

The data position is ``(epoch, batches consumed in that epoch)``: the batch order depends only on (seed, epoch)
(training/buckets.py), so a resumed run skips exactly the consumed batches and continues mid-epoch.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from ldm.checkpoint import CheckpointError, atomic_write, read_state_dict, write_safetensors

__all__ = [
    "TrainState", "find_latest", "join_state", "list_checkpoints", "load_rng", "read_json", "rng_state",
    "save_checkpoint", "split_state", "step_dir_name",
]

STEP_DIR = re.compile(r"^step-(\d{8,})$")
LATEST = "latest"
COMPLETE_MARKER = "state.json"  # written last into the temp folder; a step folder without it is not a checkpoint


@dataclass
class TrainState:
    """Where the loop is. ``step`` counts optimizer steps attempted (applied or skipped); ``epoch`` and
    ``batch_in_epoch`` are the data position of every process (micro-batches of that epoch consumed)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    images_seen: int = 0  # summed over processes
    skipped_nonfinite: int = 0  # steps skipped for a NaN / inf loss or gradient
    skipped_scaler: int = 0  # steps the fp16 gradient scaler skipped
    consecutive_nonfinite: int = 0
    world_size: int = 1

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "TrainState":
        names = {f.name for f in fields(cls)}
        bad = [k for k, v in data.items() if k not in names or not isinstance(v, int) or isinstance(v, bool)]
        if bad or "step" not in data:
            raise CheckpointError(f"{source}: not a training state (bad or missing keys: {bad or ['step']})")
        return cls(**data)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ----------------------------------------------------------------------------------- nested state <-> data


def split_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """(JSON skeleton, tensors) of a nested dict / list / tuple of tensors and plain values.

    Tensors become ``{"__tensor__": key}``; dicts with non-string keys ``{"__items__": [[k, v], ...]}``; tuples
    ``{"__tuple__": [...]}``; so ``join_state(*split_state(x))`` rebuilds ``x`` with the same types."""
    tensors: dict[str, Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if torch.is_tensor(node):
            tensors[path] = node.detach().to("cpu")
            return {"__tensor__": path}
        if isinstance(node, dict):
            if all(isinstance(k, str) for k in node):
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in node.items()}
            return {"__items__": [[k, walk(v, f"{path}.{k}" if path else str(k))] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"split_state: {path or '<root>'} is a {type(node).__name__}; only tensors, numbers, "
                        f"strings, None, lists, tuples and dicts can be stored without pickling")  # fmt: skip

    return walk(obj, prefix), tensors


def join_state(skeleton: Any, tensors: dict[str, Tensor], source: str = "checkpoint") -> Any:
    """Inverse of ``split_state``; a tensor named in the skeleton but absent is a CheckpointError naming ``source``."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"__tensor__"}:
                key = node["__tensor__"]
                if key not in tensors:
                    raise CheckpointError(f"{source}: tensor {key!r} is missing")
                return tensors[key]
            if set(node) == {"__items__"}:
                return {k: walk(v) for k, v in node["__items__"]}
            if set(node) == {"__tuple__"}:
                return tuple(walk(v) for v in node["__tuple__"])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(skeleton)


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, allow_nan=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_state(path_stem: Path, obj: Any) -> None:
    """``obj`` as ``<stem>.safetensors`` (its tensors) + ``<stem>.json`` (the rest)."""
    skeleton, tensors = split_state(obj)
    write_safetensors(tensors, path_stem.with_suffix(".safetensors"))
    write_json(path_stem.with_suffix(".json"), skeleton)


def read_state(path_stem: Path) -> Any:
    skeleton = read_json(path_stem.with_suffix(".json"))
    tensors = read_state_dict(path_stem.with_suffix(".safetensors"))
    return join_state(skeleton, tensors, str(path_stem.with_suffix(".safetensors")))


# ------------------------------------------------------------------------------------------------ RNG


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """The random states of this process: torch CPU (+ CUDA), the training generator, numpy, Python."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},  # fmt: skip
        "python": _python_state_to_data(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def _python_state_to_data(state: tuple) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def load_rng(path_stem: Path, generator: torch.Generator | None = None) -> None:
    """Restore the states written by ``rng_state``; any damage is a loud CheckpointError naming the file."""
    state = read_state(path_stem)
    src = str(path_stem.with_suffix(".json"))
    try:
        torch_state = state["torch"]
        numpy_state = state["numpy"]
        version, internal, gauss_next = state["python"]
        keys = numpy_state["keys"]
        if not (torch.is_tensor(torch_state) and torch_state.dtype == torch.uint8
                and torch_state.numel() == torch.get_rng_state().numel()):  # fmt: skip
            raise ValueError("torch CPU state has the wrong size or dtype")
        if keys.numel() != 624 or not 0 <= int(numpy_state["pos"]) <= 624:
            raise ValueError("numpy MT19937 state is not 624 words")
        if len(internal) != 625 or not all(isinstance(v, int) for v in internal):
            raise ValueError("Python random state is not 625 integers")
        if generator is not None and "generator" not in state:
            raise ValueError("the training generator's state is missing")
        torch.set_rng_state(torch_state)
        np.random.set_state((numpy_state["kind"], keys.numpy().astype(np.uint32), int(numpy_state["pos"]),
                             int(numpy_state["has_gauss"]), float(numpy_state["cached_gaussian"])))  # fmt: skip
        random.setstate((version, tuple(internal), gauss_next))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(state["cuda"]))
        if generator is not None:
            generator.set_state(state["generator"])
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{src}: corrupt random-number state ({type(e).__name__}: {e}); "
                              f"resume from another checkpoint or delete this one") from None  # fmt: skip


# ----------------------------------------------------------------------------------------------- save


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    root: str | os.PathLike,
    state: TrainState,
    *,
    model_state: dict[str, Tensor] | None,
    optimizer_state: dict | None,
    param_names: list[str] | None,
    ema_state: dict | None,
    generator: torch.Generator | None,
    config_yaml: str,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint ``step-{state.step}`` under ``root``; every process calls this (each writes its RNG).

    ``model_state``, ``optimizer_state``, ``ema_state`` are needed on the main process (rank 0) only.
    ``param_names``: names of the optimizer's parameters in its order, stored to check them on resume.
    Returns the final folder. On any exception the temp folder is removed and nothing else changes.
    """
    root = Path(root)
    name = step_dir_name(state.step)
    final, tmp = root / name, root / f".tmp-{name}"
    main = rank == 0
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    barrier()
    try:
        write_state(tmp / "rng" / f"rank-{rank}", rng_state(generator))
        if main:
            if model_state is None or optimizer_state is None:
                raise ValueError("save_checkpoint: the main process needs model_state and optimizer_state")
            write_safetensors(model_state, tmp / "model.safetensors")
            _test_pause(state.step)
            write_state(tmp / "optimizer", {"param_names": list(param_names or []), "state_dict": optimizer_state})
            if ema_state is not None:
                write_state(tmp / "ema", ema_state)
            atomic_write(tmp / "config.yaml", lambda p: Path(p).write_text(config_yaml, encoding="utf-8"))
    except BaseException as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _write_error(e, final) from e
        raise
    barrier()
    if main:
        try:
            missing = [r for r in range(world_size) if not (tmp / "rng" / f"rank-{r}.json").is_file()]
            if missing:
                raise CheckpointError(f"{tmp}: processes {missing} did not write their RNG state")
            state.world_size = world_size
            write_json(tmp / COMPLETE_MARKER, asdict(state))  # last: marks the folder complete
            _fsync_dir(tmp)
            if final.exists():  # the same step written again (e.g. a rerun): swap, then delete the old one
                old = root / f".old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(root)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise _write_error(e, final) from e
            raise
        try:
            atomic_write(root / LATEST, lambda p: Path(p).write_text(name + "\n", encoding="utf-8"))
        except OSError as e:  # the new folder is complete; `latest` still names the previous one, nothing is pruned
            raise _oserror(e, f"checkpoint {final} is complete, but {root / LATEST} could not be updated "
                              f"({e.strerror or e}); it still names the previous checkpoint") from e
        _fsync_dir(root)
        if keep_last:
            prune(root, keep_last)
    barrier()
    return final


def _write_error(e: OSError, final: Path) -> OSError:
    """``e`` (same errno, e.g. ENOSPC) with a message that names the checkpoint and what is left."""
    return _oserror(e, f"could not write checkpoint {final} ({e.strerror or e}); the older checkpoints and "
                       f"{final.parent / LATEST} are unchanged")


def _oserror(e: OSError, message: str) -> OSError:
    return OSError(e.errno, message, e.filename) if e.errno is not None else OSError(message)


def _test_pause(step: int) -> None:
    """The test hook of the module docstring (LDM_TEST_CHECKPOINT_PAUSE="STEP:PATH")."""
    at, _, path = os.environ.get("LDM_TEST_CHECKPOINT_PAUSE", "").partition(":")
    if path and at == str(step):
        Path(path).write_text(str(os.getpid()), encoding="utf-8")
        time.sleep(600)  # killed by the test long before this ends


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (never the one ``latest`` names), and stale
    temp folders. Returns what was deleted."""
    current = find_latest(root)
    done = list_checkpoints(root)
    doomed = [p for p in done[:-keep_last] if p != current] if keep_last > 0 else []
    doomed += [p for p in root.iterdir() if p.is_dir() and p.name.startswith((".tmp-", ".old-"))]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------------------------- find


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete step folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / COMPLETE_MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_latest(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names if it is complete, else the highest complete step folder, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if STEP_DIR.match(name) and (root / name / COMPLETE_MARKER).is_file():
            return root / name
    done = list_checkpoints(root)
    return done[-1] if done else None


def read_train_state(path: str | os.PathLike) -> TrainState:
    path = Path(path)
    return TrainState.from_dict(read_json(path / COMPLETE_MARKER), str(path / COMPLETE_MARKER))


def read_optimizer_state(path: str | os.PathLike, param_names: Iterable[str]) -> dict:
    """The saved optimizer.state_dict(), after checking it was written for the same parameters, in order."""
    path = Path(path)
    data = read_state(path / "optimizer")
    saved, want = list(data.get("param_names", [])), list(param_names)
    if saved != want:
        extra, missing = sorted(set(saved) - set(want)), sorted(set(want) - set(saved))
        detail = (f"{len(missing)} not in the checkpoint (e.g. {missing[:3]}), {len(extra)} only in the checkpoint "
                  f"(e.g. {extra[:3]})" if extra or missing else "same parameters in a different order")  # fmt: skip
        raise CheckpointError(f"{path / 'optimizer.json'}: optimizer state is for other parameters than this run "
                              f"trains: {detail}. Was the model, LoRA or train_text_encoder setting changed?")  # fmt: skip
    return data["state_dict"]
