"""Weights as data: safe reading, atomic writing and strict loading of state dicts.

- Untrusted weights are read from safetensors. Legacy ``.ckpt``/``.pt``/``.bin`` pickles go through
  ``torch.load(weights_only=True)`` only, which refuses any pickle that would import or call code.
- Writes go to a temporary file in the target folder, are flushed to disk, then renamed over the target:
  a crash never leaves a half-written file under the final name.
- Loading is strict by default: missing, unexpected and mis-shaped keys are listed in one error that names
  the file. Modules may be built on the meta device; ``load_into`` then assigns tensors converted straight
  to the requested dtype and device, so the weights never exist twice in memory.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used as it is; the message names the file."""


# ----------------------------------------------------------------------------------------------- read


def read_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """All tensors of a safetensors file (or a weights-only pickle) as a flat dict."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a .safetensors file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, device)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path, device)
    raise CheckpointError(f"{path}: unknown weight format {path.suffix!r}; expected .safetensors (or a legacy .ckpt)")


def _read_safetensors(path: Path, device) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_safetensors_header(path)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e


def _check_safetensors_header(path: Path) -> None:
    """Reject truncated files before any tensor is read: the header says how long the data must be."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a valid safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: not a valid safetensors file (header length {n}, file {size} bytes: truncated?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file (unreadable header: {e})") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}")


def _read_pickle(path: Path, device) -> dict[str, Tensor]:
    try:
        obj = torch.load(str(path), map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: this pickle would run code or build Python objects, which is how malicious "
            f"checkpoints work. Only plain tensors are accepted from .ckpt files; convert the file to safetensors "
            f"with a tool you trust. (torch said: {str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read this checkpoint ({e})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # Lightning-era SD checkpoints
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if torch.is_tensor(v)}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file ({} if none)."""
    from safetensors import safe_open

    path = Path(path)
    _check_safetensors_header(path)
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


# ---------------------------------------------------------------------------------------------- write


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; on any error the target is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files owner-only; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_safetensors(state_dict: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Atomically write tensors (made contiguous, shared storage broken) with string metadata."""
    from safetensors.torch import save_file

    tensors = {k: _own_storage(v.detach()) for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _own_storage(t: Tensor) -> Tensor:
    """safetensors refuses views into a shared storage (tied or sliced weights): copy those."""
    t = t.contiguous()
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


# ----------------------------------------------------------------------------------------------- load


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, expected, found)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        parts = []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
                parts.append(f"{len(items)} {title} key(s): {shown}")
        if self.mismatched:
            shown = ", ".join(f"{k} (expected {tuple(a)}, found {tuple(b)})" for k, a, b in self.mismatched[:limit])
            parts.append(f"{len(self.mismatched)} mis-shaped key(s): {shown}")
        return "; ".join(parts)


def compare_keys(module: nn.Module, state_dict: dict[str, Tensor]) -> LoadReport:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    rep = LoadReport()
    rep.missing = sorted(k for k in expected if k not in state_dict)
    rep.unexpected = sorted(k for k in state_dict if k not in expected)
    rep.mismatched = sorted(
        (k, expected[k], tuple(state_dict[k].shape)) for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    )
    return rep


def load_into(
    module: nn.Module,
    state_dict: dict[str, Tensor],
    *,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    source: str = "state dict",
) -> LoadReport:
    """Load ``state_dict`` into ``module`` (possibly on the meta device), converting to dtype/device on the way.

    Strict (default): any missing, unexpected or mis-shaped key raises CheckpointError naming ``source``, and the
    module is left unchanged. Non-strict: matching keys load, the rest is reported in the returned LoadReport.
    Floating-point tensors are cast to ``dtype`` (default: the module's own dtype); integer buffers keep the module's.
    """
    rep = compare_keys(module, state_dict)
    if strict and not rep.ok:
        raise CheckpointError(f"{source}: does not fit {type(module).__name__}: {rep.describe()}")
    bad = set(rep.unexpected) | {k for k, _, _ in rep.mismatched}
    current = module.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k in bad:
            continue
        target = current[k]
        want_dtype = (dtype or target.dtype) if v.is_floating_point() else target.dtype
        want_device = device if device is not None else (v.device if target.device.type == "meta" else target.device)
        out[k] = v.to(device=want_device, dtype=want_dtype)
    if any(p.device.type == "meta" for p in list(module.parameters()) + list(module.buffers())):
        if rep.missing:
            raise CheckpointError(f"{source}: cannot leave keys uninitialised on a meta-device module: {rep.describe()}")
        module.load_state_dict(out, strict=False, assign=True)
    else:
        module.load_state_dict(out, strict=False)
    return rep
