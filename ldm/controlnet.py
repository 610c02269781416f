"""ControlNet (Zhang, Rao & Agrawala 2023): a trainable copy of the U-Net's down half, steered by a hint image.

Layout and names are lllyasviel's ``cldm/cldm.py`` ``ControlNet``: the ``control_model.*`` keys of
control_sd15_*.safetensors / control_v11*.safetensors with that prefix stripped (ldm/controlnet_keys.py also
translates diffusers' ``ControlNetModel``). With hint encoder widths ``c_0 .. c_{K-1}`` (16, 32, 96, 256):

    time_embed, label_emb,          the U-Net's own encoder (``UNetEncoder``, built by the same code), a copy of
    input_blocks, middle_block      the U-Net's weights at the start of training (``ControlNet.from_unet``)
    input_hint_block.0              3x3 conv hint_channels -> c_0, then SiLU after every conv but the last
    input_hint_block.{4k-2, 4k}     3x3 conv c_{k-1} -> c_{k-1}, 3x3 stride-2 conv c_{k-1} -> c_k   (k = 1 .. K-1)
    input_hint_block.{4K-2}         3x3 conv c_{K-1} -> model_channels, zero-initialised  (14 for K = 4)
    zero_convs.{i}.0                1x1 conv on input block i's output, zero-initialised
    middle_block_out.0              1x1 conv on the middle block's output, zero-initialised

Forward, for a latent of H x W and f = 2^(K-1) = 8 (the VAE's factor, so the hint is image-sized):

    hint (B, hint_channels, f H, f W) -> input_hint_block -> (B, model_channels, H, W), added to conv_in's output
    residuals = [zero_convs[i](input block i's output) ..., middle_block_out(middle output)] * scale

The residuals are what ``UNet`` takes as ``cond.control``: residual i is added to the U-Net's skip connection i,
the last one to its middle block's output (diffusers' ``down_block_additional_residuals`` and
``mid_block_additional_residual``). Several ControlNets act at once through the sum of their scaled residuals
(``combine_residuals``, diffusers' MultiControlNetModel); when each acts during sampling, from its start / end step
fractions, is the sampler's business: ``control_active`` gives diffusers' rule.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .attention import sdpa_context
from .conditioning import Cond
from .unet import UNet, UNetConfig, UNetEncoder
from .unet_blocks import zero_module

ENCODER_MODULES = ("time_embed", "label_emb", "input_blocks", "middle_block")  # copied from the U-Net


@dataclass
class ControlNetConfig(UNetConfig):
    """The U-Net fields describe the encoder copy (output-side fields such as out_channels are unused)."""

    hint_channels: int = 3  # channels of the hint image (RGB edge / depth / pose maps: 3); any number works
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)  # hint encoder widths; each after the first halves
    global_pool: bool = False  # residuals averaged over space (diffusers' global_pool_conditions: "shuffle")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.hint_block_channels = tuple(self.hint_block_channels)
        if self.hint_channels < 1:
            raise ValueError(f"controlnet.hint_channels: must be >= 1, got {self.hint_channels}")
        if not self.hint_block_channels or min(self.hint_block_channels) < 1:
            raise ValueError(
                f"controlnet.hint_block_channels: needs one or more positive widths, got {self.hint_block_channels}"
            )

    @property
    def hint_factor(self) -> int:
        """Hint size / latent size: the hint encoder's stride-2 convolutions."""
        return 2 ** (len(self.hint_block_channels) - 1)

    @classmethod
    def from_unet(cls, unet: UNetConfig, **control_fields: Any) -> "ControlNetConfig":
        """The encoder of ``unet`` plus the ControlNet's own fields (hint_channels, ...)."""
        return cls(**{f.name: getattr(unet, f.name) for f in fields(UNetConfig)}, **control_fields)

    @classmethod
    def from_original(cls, params: Mapping[str, Any], **overrides: Any) -> "ControlNetConfig":
        """From cldm's yaml ``control_stage_config.params`` (cldm_v15.yaml, cldm_v21.yaml): the U-Net's fields,
        without ``out_channels`` (the copy has no output layers), plus ``hint_channels``."""
        params = {"out_channels": params["in_channels"], **params}
        return super().from_original(params, **{"hint_channels": params.get("hint_channels", 3), **overrides})


def _zero_conv(channels: int) -> nn.Sequential:
    return nn.Sequential(zero_module(nn.Conv2d(channels, channels, 1)))


class ControlNet(UNetEncoder):
    """``net(x (B, C, H, W), hint (B, hint_channels, 8H, 8W), t (B,), cond) -> residuals for cond.control``."""

    def __init__(self, cfg: ControlNetConfig):
        if not isinstance(cfg, ControlNetConfig):
            raise TypeError(f"cfg: expected a ControlNetConfig, got {type(cfg).__name__} (ControlNetConfig.from_unet)")
        super().__init__(cfg)  # time_embed, label_emb, input_blocks, middle_block
        self.zero_convs = nn.ModuleList([_zero_conv(ch) for ch in self.skip_channels])
        c = cfg.hint_block_channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.hint_channels, c[0], 3, padding=1), nn.SiLU()]
        for c_in, c_out in zip(c[:-1], c[1:]):
            layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.SiLU()]
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, stride=2), nn.SiLU()]
        layers.append(zero_module(nn.Conv2d(c[-1], cfg.model_channels, 3, padding=1)))
        self.input_hint_block = nn.Sequential(*layers)
        self.middle_block_out = _zero_conv(self.middle_channels)

    @classmethod
    def from_unet(cls, unet: UNet, **control_fields: Any) -> "ControlNet":
        """A new ControlNet whose encoder is a copy of ``unet``'s (the paper's initialisation; cldm's
        tool_add_control.py, diffusers' ControlNetModel.from_unet). Its zero convolutions and the hint encoder's
        last layer start at zero, so it adds nothing to the U-Net until trained."""
        net = cls(ControlNetConfig.from_unet(unet.cfg, **control_fields))
        net.copy_encoder(unet)
        p = next(unet.parameters())
        return net.to(device=p.device, dtype=p.dtype)

    def copy_encoder(self, unet: UNet) -> None:
        """Load ``unet``'s encoder weights (time_embed, label_emb, input_blocks, middle_block) into this network."""
        encoder = {k: v for k, v in unet.state_dict().items() if k.split(".")[0] in ENCODER_MODULES}
        self.load_state_dict(encoder, strict=False)

    def forward(
        self, x: Tensor, hint: Tensor, t: Tensor, cond: Cond | None = None, scale: float = 1.0
    ) -> tuple[Tensor, ...]:
        """x: the noisy latent; hint: the control image, in [0, 1] as the published ControlNets were trained;
        cond: the U-Net's (context, and vector if the config has one). Returns ``len(input_blocks) + 1`` tensors
        shaped ``block_shapes(B, H, W)`` ((B, C, 1, 1) with global_pool), each times ``scale``.

        ``cond.concat`` is used only when this network's in_channels ask for it: a 4-channel ControlNet beside a
        9-channel inpainting U-Net sees the latent alone, as in diffusers' ControlNet inpainting pipelines."""
        cond = cond if cond is not None else Cond()
        if cond.concat is not None and x.ndim == 4 and x.shape[1] == self.cfg.in_channels:
            cond = replace(cond, concat=None)
        x, t = self._check_encoder_inputs(x, t, cond)
        self._check_hint(hint, x)
        with sdpa_context(self.sdpa_kernel):
            return self._forward(x, hint, t, cond, scale)

    def _forward(self, x: Tensor, hint: Tensor, t: Tensor, cond: Cond, scale: float) -> tuple[Tensor, ...]:
        dtype = self.time_embed[0].weight.dtype
        if cond.concat is not None:
            x = torch.cat([x, cond.concat], dim=1)  # (B, in_channels, H, W)
        emb = self._embed(t, cond)  # (B', 4 mc), B' >= B
        context = cond.context.to(dtype)  # (B, T, context_dim)
        guided_hint = self.input_hint_block(hint.to(dtype))  # (B, mc, H, W)

        outs = []
        h = x
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = self._run(block, h, emb, context)
            if i == 0:
                h = h + guided_hint  # the hint enters after conv_in
            outs.append(zero_conv(h))  # (B, C_i, H_i, W_i)
        h = self._run(self.middle_block, h, emb, context)
        outs.append(self.middle_block_out(h))
        outs = [r * scale for r in outs]  # diffusers' conditioning_scale
        if self.cfg.global_pool:
            outs = [r.mean(dim=(2, 3), keepdim=True) for r in outs]  # (B, C_i, 1, 1)
        return tuple(outs)

    def _check_hint(self, hint: Tensor, x: Tensor) -> None:
        B, _, H, W = x.shape
        f = self.cfg.hint_factor
        want = (B, self.cfg.hint_channels, H * f, W * f)
        got = tuple(hint.shape) if isinstance(hint, Tensor) else type(hint).__name__
        if got != want:
            raise ValueError(
                f"hint: expected shape {want} = (batch, controlnet.hint_channels, {f} x the latent's {H} x {W}: the "
                f"image size), got {got}"
            )


def combine_residuals(
    residual_sets: Sequence[Sequence[Tensor]], weights: Sequence[float] | None = None
) -> tuple[Tensor, ...]:
    """Several controls at once: ``sum_i weights[i] * residual_sets[i]``, block by block, in order.

    For ControlNets this is diffusers' MultiControlNetModel (each net's ``scale`` is its weight, given here or to
    the net); for T2I-Adapter features, diffusers' MultiAdapter (which defaults to weights 1/N)."""
    sets = [tuple(s) for s in residual_sets]
    if not sets:
        raise ValueError("residual_sets: needs at least one set of residuals")
    if weights is not None and len(weights) != len(sets):
        raise ValueError(f"weights: expected one per residual set ({len(sets)}), got {len(weights)}")
    for i, s in enumerate(sets[1:], start=1):
        if [r.shape for r in s] != [r.shape for r in sets[0]]:
            raise ValueError(
                f"residual_sets[{i}]: shapes {[tuple(r.shape) for r in s]} differ from residual_sets[0]'s "
                f"{[tuple(r.shape) for r in sets[0]]}"
            )
    scaled = sets if weights is None else [tuple(w * r for r in s) for w, s in zip(weights, sets)]
    out = list(scaled[0])
    for s in scaled[1:]:
        out = [a + b for a, b in zip(out, s)]
    return tuple(out)


def control_active(step: int, num_steps: int, start: float = 0.0, end: float = 1.0) -> bool:
    """Whether a control with step fractions [start, end] acts at sampling step ``step`` (0-based) of ``num_steps``.

    diffusers' rule (``control_guidance_start`` / ``control_guidance_end`` in its ControlNet pipelines): step i
    covers the fraction [i / n, (i + 1) / n] of the sampling and the control acts when that span lies within
    [start, end], i.e. unless ``i / n < start or (i + 1) / n > end``. So start=0, end=1 is every step; end=0.5 of
    10 steps is steps 0-4. The sampler leaves an inactive control's residuals out (or weights them 0) at that step.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
    if not 0 <= step < num_steps:
        raise ValueError(f"step: must be in [0, {num_steps}), got {step}")
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"start, end: need 0 <= start < end <= 1, got start={start}, end={end}")
    return not (step / num_steps < start or (step + 1) / num_steps > end)
