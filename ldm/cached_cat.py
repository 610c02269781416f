"""``cached_cat``: a concatenation of weights kept in a non-persistent buffer, for the fused inference
projections (ldm/transformer.py's q/k/v, ldm/unet.py's embedding and context projections)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def cached_cat(owner: nn.Module, buffer: str, tensors: list[Tensor]) -> Tensor:
    """``torch.cat(tensors)`` (detached) kept in ``owner``'s buffer ``buffer`` (registered non-persistent, so
    ``.to()`` moves it and the state dict leaves it out); rebuilt when a tensor changed in place or moved
    (version counter, storage, dtype). Inside a compiled graph a buffer built beforehand is read as it is
    (ldm/speed.py builds it eagerly before compiling)."""
    cached = getattr(owner, buffer)
    if torch.compiler.is_compiling() and cached is not None:
        return cached
    key = tuple((t._version, t.data_ptr(), t.dtype) for t in tensors)
    keys = owner.__dict__.setdefault("_cached_cat_keys", {})
    if cached is None or keys.get(buffer) != key:
        cached = torch.cat([t.detach() for t in tensors])
        setattr(owner, buffer, cached)
        keys[buffer] = key
    return cached
