"""What the U-Net receives besides the noisy latent: ``Cond``, a typed bundle of condition tensors.

Each field is one way a condition enters the network (see ARCHITECTURE.md, "Conditioning is explicit"):

- ``context``: (B, T, D) tokens for cross-attention (text embeddings);
- ``vector``:  (B, V) a vector projected and added to the time embedding (class labels, pooled text, SDXL sizes);
- ``concat``:  (B, C, H, W) channels concatenated to the latent input (inpainting mask + masked image, depth);
- ``control``: per-block residuals added to the U-Net's skip connections (ControlNet, adapters);
- ``extra``:   named tensors for the registered condition types (ldm/conditions/): each condition's prepared value
               ``extra[name]`` (B, ...) and its keep flag ``extra[name + ".keep"]`` (B,) (1: present, 0: its "no
               condition"), turned into the fields above by ``ldm.conditions.ConditionedUNet`` inside the network.

Guidance batches the conditional and unconditional passes into one call with ``Cond.cat``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class Cond:
    context: Tensor | None = None  # (B, T, D)
    vector: Tensor | None = None  # (B, V)
    concat: Tensor | None = None  # (B, C, H, W)
    control: tuple[Tensor, ...] | None = None  # residuals, each (B, C_i, H_i, W_i)
    extra: dict[str, Tensor] | None = None  # registered conditions: name -> (B, ...), name.keep -> (B,)

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        """Concatenate along the batch; every Cond must carry the same fields."""
        out = {}
        for f in fields(Cond):
            vals = [getattr(c, f.name) for c in conds]
            present = [v is not None for v in vals]
            if not any(present):
                out[f.name] = None
            elif not all(present):
                raise ValueError(f"Cond.cat: field {f.name!r} is set in some conditions and missing in others")
            elif f.name == "control":
                if len({len(v) for v in vals}) != 1:
                    raise ValueError("Cond.cat: control residual lists differ in length")
                out[f.name] = tuple(torch.cat(parts) for parts in zip(*vals))
            elif f.name == "extra":
                if len({tuple(v) for v in vals}) != 1:
                    raise ValueError("Cond.cat: the extra conditions differ in names")
                out[f.name] = {k: torch.cat([v[k] for v in vals]) for k in vals[0]}
            else:
                out[f.name] = torch.cat(vals)
        return Cond(**out)

    def map(self, fn) -> "Cond":
        """Apply ``fn`` to every tensor (e.g. ``.to(device)``)."""
        return replace(
            self,
            **{
                f.name: (tuple(fn(t) for t in v) if f.name == "control" else
                         {k: fn(t) for k, t in v.items()} if f.name == "extra" else fn(v))
                for f in fields(self)
                if (v := getattr(self, f.name)) is not None
            },
        )
