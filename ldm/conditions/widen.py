"""A trained U-Net given new inputs for new conditions, starting as exactly the model it was (InstructPix2Pix,
Brooks et al. 2023, sec. 3.4: "we add additional input channels to the first convolutional layer ... initialized
to zero"; SD's inpainting and depth models were made the same way).

    unet2 = widen_unet(unet, model_cfg.with_conditions(specs).unet)

Every tensor keeps its trained values; where the new config makes a tensor larger, the new part is zero:

    input_blocks.0.0.weight            (C_out, C_in + C_new, 3, 3)   new input channels (concat conditions)
    label_emb.0.0.weight               (E, V + V_new)                new vector features (vector conditions)
    *.attn2.to_k / to_v .weight        (inner, D + D_new)            new context features (context conditions)

A U-Net that had no vector input gets a new ``label_emb`` whose last Linear is zero, so it adds nothing until
trained. The new inputs are appended after the old ones, which is where ConditionedUNet puts them. With any values
for the new conditions the widened network computes what the old one did (up to the summation order of the
wider matrix products).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["widen_unet"]


@torch.no_grad()
def widen_unet(unet: nn.Module, new_cfg) -> nn.Module:
    """A new UNet of ``new_cfg`` (wider inputs than ``unet.cfg``) holding ``unet``'s weights, zero elsewhere."""
    from ..unet import UNet

    old_sd = unet.state_dict()
    p = next(unet.parameters())
    wide = UNet(new_cfg).to(device=p.device, dtype=p.dtype)
    new_sd = wide.state_dict()
    out = {}
    for key, new in new_sd.items():
        old = old_sd.get(key)
        if old is None:
            if not key.startswith("label_emb."):
                raise ValueError(f"widen_unet: {key} is new in the wider U-Net; only inputs may grow")
            # a new vector path: its last Linear at zero, so the time embedding is unchanged
            out[key] = torch.zeros_like(new) if key.startswith("label_emb.0.2.") else new
            continue
        if old.shape == new.shape:
            out[key] = old
            continue
        grown = [d for d in range(new.ndim) if old.shape[d] != new.shape[d]]
        if old.ndim != new.ndim or len(grown) != 1 or old.shape[grown[0]] > new.shape[grown[0]]:
            raise ValueError(f"widen_unet: {key} changes from {tuple(old.shape)} to {tuple(new.shape)}; only one "
                             f"input dimension may grow")  # fmt: skip
        t = torch.zeros_like(new)
        t.narrow(grown[0], 0, old.shape[grown[0]]).copy_(old)
        out[key] = t
    unexpected = sorted(set(old_sd) - set(new_sd))
    if unexpected:
        raise ValueError(f"widen_unet: {unexpected[0]} has no place in the wider U-Net")
    wide.load_state_dict(out, strict=True)
    return wide.train(unet.training)
