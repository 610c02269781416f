"""Control branches as condition types: ``controlnet`` (Zhang et al. 2023; ldm/controlnet.py) and ``t2i_adapter``
(Mou et al. 2023; ldm/t2i_adapter.py). Their value is a hint image of the generated image's size, given to the
networks in [0, 1] as the published ones were trained (``hint_channels: 1`` takes the mean of R, G, B: masks, edge
and depth maps).

A new ControlNet beside a base model starts as a copy of the base U-Net's encoder with zero-initialised output
convolutions (``init_from_unet``), so it adds nothing until trained; its hint encoder has one stride-2 stage per
factor of 2 of the VAE (cldm's 16, 32, 96, 256 widths for SD's factor 8, the first log2(f) + 1 of them otherwise).
The adapter's feature widths are the U-Net's level widths.

"No control" adds nothing (the branch's residuals are multiplied by 0, or the branch is skipped).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..controlnet import ControlNet, ControlNetConfig
from ..t2i_adapter import T2IAdapter, T2IAdapterConfig
from .base import Condition, Env, register
from .image_concat import check_image

CLDM_HINT_WIDTHS = (16, 32, 96, 256)


@dataclass
class ControlNetArgs:
    hint_channels: int = 3  # 1: grey (the mean of R, G, B), 3: RGB, any other: tensors of that many channels
    hint_block_channels: Optional[list[int]] = None  # null: cldm's widths cut to the VAE's factor
    global_pool: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.hint_channels, bool) or not isinstance(self.hint_channels, int) or self.hint_channels < 1:
            raise ValueError(f"hint_channels: an integer >= 1, got {self.hint_channels!r}")


@dataclass
class AdapterArgs:
    hint_channels: int = 3
    num_res_blocks: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.hint_channels, bool) or not isinstance(self.hint_channels, int) or self.hint_channels < 1:
            raise ValueError(f"hint_channels: an integer >= 1, got {self.hint_channels!r}")
        if isinstance(self.num_res_blocks, bool) or not isinstance(self.num_res_blocks, int) or self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks: an integer >= 1, got {self.num_res_blocks!r}")


def hint_tensor(value, where: str, channels: int, env: Env, factor: int) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> hints (B, channels, H, W) in [0, 1]; H, W must be the image size. A hint
    of another channel count (a depth + normal stack, say) is given as a (B, channels, H, W) tensor in [-1, 1]."""
    if channels not in (1, 3) and isinstance(value, Tensor) and value.ndim == 4 and value.shape[1] == channels:
        value = value.to(torch.float32)
        image = value
    else:
        if channels not in (1, 3):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{where}: expected a (B, {channels}, H, W) tensor in [-1, 1] (args.hint_channels), "
                             f"got {got}")  # fmt: skip
        image = check_image(value, where)
    h, w = env.latent_hw
    if tuple(image.shape[-2:]) != (h * factor, w * factor):
        raise ValueError(f"{where}: the control image is {image.shape[-1]}x{image.shape[-2]}, the generated image is "
                         f"{w * factor}x{h * factor}; give a control image of that size")  # fmt: skip
    hint = (image.to(env.device, torch.float32) + 1) / 2
    return hint.mean(dim=1, keepdim=True) if channels == 1 else hint


def _vae_factor(model) -> int:
    f = model.vae.downsample_factor
    stages = int(round(math.log2(f)))
    if 2**stages != f:
        raise ValueError(f"controls need a VAE factor that is a power of 2, got {f}")
    return stages


@register("controlnet")
class ControlNetCondition(Condition):
    enters = "control"
    value = "image"
    Args = ControlNetArgs

    def __init__(self, spec, model):
        super().__init__(spec, model)
        stages = _vae_factor(model)
        widths = self.args.hint_block_channels
        if widths is None:
            widths = list(CLDM_HINT_WIDTHS[: stages + 1]) + [CLDM_HINT_WIDTHS[-1]] * max(0, stages + 1 - 4)
        if len(widths) != stages + 1:
            raise ValueError(f"{spec.where}.args.hint_block_channels: {len(widths)} widths give a hint factor of "
                             f"{2 ** (len(widths) - 1)}, the VAE's is {2 ** stages}; give {stages + 1}")  # fmt: skip
        self.net = ControlNet(ControlNetConfig.from_unet(model.unet, hint_channels=self.args.hint_channels,
                                                         hint_block_channels=tuple(widths),
                                                         global_pool=self.args.global_pool))  # fmt: skip

    def init_from_unet(self, unet) -> None:
        self.net.copy_encoder(unet)

    def prepare(self, value, env: Env) -> Tensor:
        return hint_tensor(value, self.spec.where, self.args.hint_channels, env, self.net.cfg.hint_factor)

    def control(self, x: Tensor, t: Tensor, cond, hint: Tensor) -> tuple[Tensor, ...]:
        return self.net(x, hint.to(x.dtype), t, cond)


@register("t2i_adapter")
class AdapterCondition(Condition):
    enters = "adapter"
    value = "image"
    Args = AdapterArgs

    def __init__(self, spec, model):
        super().__init__(spec, model)
        u = model.unet
        self.factor = 2 ** _vae_factor(model)
        self.net = T2IAdapter(T2IAdapterConfig(in_channels=self.args.hint_channels,
                                               channels=tuple(u.model_channels * m for m in u.channel_mult),
                                               num_res_blocks=self.args.num_res_blocks,
                                               downscale_factor=self.factor))  # fmt: skip
        self._kept: tuple | None = None  # (the hint, what was computed from it: key, features); see control()

    def prepare(self, value, env: Env) -> Tensor:
        return hint_tensor(value, self.spec.where, self.args.hint_channels, env, self.factor)

    def control(self, x: Tensor, t: Tensor, cond, hint: Tensor) -> tuple[Tensor, ...]:
        """The adapter's features of ``hint``. They depend on the hint alone, not on the step, so without gradients
        they are computed once and reused while the same hint tensor comes back unchanged (a sampling run hands the
        same one to every step; diffusers' adapter pipelines compute the features once before their loop). The key
        is the tensor itself (held, so it cannot be freed and its memory reused), its in-place version, the dtype
        and size asked for, and the adapter's parameters' storage and in-place versions (.to(), load_state_dict)."""
        size = tuple(x.shape[-2:])
        if torch.is_grad_enabled() or hint.is_inference():  # an inference tensor has no version counter to watch
            self._kept = None
            return self.net(hint.to(x.dtype), latent_size=size)
        key = (hint._version, x.dtype, size, tuple((p.data_ptr(), p._version) for p in self.net.parameters()))
        if self._kept is not None and self._kept[0] is hint and self._kept[1] == key:
            return self._kept[2]
        features = self.net(hint.to(x.dtype), latent_size=size)
        self._kept = (hint, key, features)
        return features
