"""Our format: a folder with ``model.safetensors`` (keys ``unet.*``, ``vae.*``, ``text.{i}.*``, our names) and
``config.yaml`` (the ModelConfig, ``ldm.config.to_yaml``). Nothing is inferred: the config says it all.

Folders are written atomically (``atomic_folder``): everything goes into a hidden temporary folder beside the
target, which is renamed onto the target once complete; an older folder there is moved aside first and deleted
last. A crash leaves either the old folder or the new one under the target name, never a half-written one (at
worst, between the two renames, no folder and the old one under ``.NAME.old-*``). The diffusers writer uses the
same helper.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from torch import Tensor

from ..checkpoint import CheckpointError, read_state_dict, write_safetensors
from ..config import ConfigError, save_config
from ..model_config import ModelConfig, load_model_config

NAME = "ldm"
DESCRIPTION = "ldm model folder"
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
FORMAT_VERSION = "1"

StateDict = dict[str, Tensor]


def read(path: Path, *, family=None, prediction=None, overrides=(), strict=True, progress=None):
    """(ModelConfig, {part: state dict}) from our folder."""
    say = progress or (lambda msg: None)
    extra = ([f"family={family}"] if family else []) + ([f"diffusion.prediction={prediction}"] if prediction else [])
    try:
        cfg = load_model_config(path / CONFIG, extra + list(overrides))
    except ConfigError as e:
        raise CheckpointError(f"{path / CONFIG}: {e}") from None
    sd = read_state_dict(path / WEIGHTS)
    names = [name for name, _, _ in cfg.parts()]
    parts: dict[str, StateDict] = {name: {} for name in names}
    unexpected = []
    for k, v in sd.items():
        name = next((n for n in names if k.startswith(n + ".")), None)
        if name is None:
            unexpected.append(k)
        else:
            parts[name][k[len(name) + 1 :]] = v
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:10])
        if strict:
            raise CheckpointError(f"{path / WEIGHTS}: keys of no part of the config ({', '.join(names)}): {shown}")
        say(f"ignoring {len(unexpected)} keys of no part: {shown}")
    return cfg, parts


def write(cfg: ModelConfig, parts: dict[str, StateDict], path: Path, progress=None) -> None:
    with atomic_folder(path, looks_like=is_ldm_folder) as tmp:
        flat = {f"{name}.{k}": v for name, sd in parts.items() for k, v in sd.items()}
        write_safetensors(flat, tmp / WEIGHTS, metadata={"format": "pt", "ldm.format": NAME,
                                                          "ldm.format_version": FORMAT_VERSION})  # fmt: skip
        save_config(cfg, tmp / CONFIG)


def is_ldm_folder(path: Path) -> bool:
    return (path / WEIGHTS).is_file() or (path / CONFIG).is_file()


# ------------------------------------------------------------------------------------- atomic folders


@contextmanager
def atomic_folder(path: Path, looks_like: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces ``path`` (see the module docstring).

    An existing ``path`` is replaced only if it is empty or ``looks_like(path)`` (a model folder of the same
    format): never a file, never an unrelated folder.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: exists and is not a folder")
        if any(path.iterdir()) and not looks_like(path):
            raise CheckpointError(f"{path}: exists and is not a model folder of this format; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old / path.name, path)  # put the old folder back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file to disk before the folder becomes visible under its final name."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def write_json(data: dict, path: Path) -> None:
    """A JSON file (inside an atomic_folder's temporary folder: no rename dance of its own needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
