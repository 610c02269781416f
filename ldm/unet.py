"""The Stable Diffusion U-Net: ``UNet``, SD 1.x / 2.x / XL shapes from its ``UNetConfig`` (ldm/unet_config.py) alone.

Rombach et al. 2022 (LDM): the ADM U-Net of Dhariwal & Nichol 2021 (ResBlocks on a sinusoidal time
embedding, Ho et al. 2020) with SpatialTransformers for cross-attention on text tokens; Podell et al. 2023
(SDXL) adds a vector condition through ``label_emb`` and puts deeper transformers on the lower levels.

Layout, names and parameter shapes are those of the original ``openaimodel.UNetModel`` (LDM / SGM), so
an original checkpoint's ``model.diffusion_model.*`` keys load after stripping that prefix; diffusers'
``UNet2DConditionModel`` layout is translated by ``ldm/unet_keys.py``. With ``n = num_res_blocks``:

    input_blocks.0.0                      conv_in 3x3: in_channels -> model_channels
    input_blocks.{1 + l(n+1) + j}         ResBlock [+ SpatialTransformer]   level l, j < n
    input_blocks.{1 + l(n+1) + n}.0.op    Downsample                        every level but the last
    middle_block.0 / .1 / .2              ResBlock, SpatialTransformer, ResBlock
    output_blocks.{u(n+1) + j}            ResBlock [+ SpatialTransformer] [+ Upsample]   u = L-1-l, j <= n
    out.0 / out.2                         GroupNorm, (SiLU), conv_out 3x3

The down half (embeddings, input blocks, middle block) is ``UNetEncoder``, shared with ControlNet
(ldm/controlnet.py: a trainable copy of it, Zhang et al. 2023) so the two are built by the same code.
Extra inputs beyond the latent and ``cond.context``:

    cond.vector    (B, adm_in_channels) floats through ``label_emb`` MLP (SDXL), or (B,) integer class
                   labels through the ``label_emb`` nn.Embedding (``num_classes``, the original LDM class model)
    cond.control   ControlNet residuals: one per input block, then the middle block (diffusers'
                   down_block_additional_residuals + mid_block_additional_residual)
    adapter=       T2I-Adapter features (ldm/t2i_adapter.py): one per level (+ one for the middle block),
                   added inside the down path (diffusers' down_intrablock_additional_residuals); see
                   ``UNet.adapter_slots``
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import check_backend, sdpa_context
from .conditioning import Cond
from .fused_projections import FusedProjections
from .transformer import CrossAttention, SpatialTransformer
from .unet_blocks import Downsample, ResBlock, Upsample, cat_channels, timestep_embedding, zero_module
from .unet_config import UNetConfig  # noqa: F401 (re-exported: ldm.unet.UNetConfig)


MIN_EMB_ROWS = 4


def _pad_rows(v: Tensor, n: int) -> Tensor:
    """(B, D) -> (max(B, n), D), zero rows appended."""
    return v if v.shape[0] >= n else torch.cat([v, v.new_zeros(n - v.shape[0], *v.shape[1:])])


class EmbedSequential(nn.Sequential):
    """The original TimestepEmbedSequential: hands each layer what it needs (emb, context, output size)."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, size=None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            elif isinstance(layer, Upsample):
                h = layer(h, size)
            else:
                h = layer(h)
        return h


class UNetEncoder(FusedProjections, nn.Module):
    """The U-Net's down half in the original names: ``time_embed``, ``label_emb``, ``input_blocks``, ``middle_block``.

    ``UNet`` adds the up half; ``ControlNet`` (ldm/controlnet.py) adds its hint encoder and zero convolutions.
    The modules are created in the order the U-Net always created them, so a seed gives the same initial weights."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.sdpa_kernel = cfg.sdpa_kernel
        mc, n, L = cfg.model_channels, cfg.num_res_blocks, len(cfg.channel_mult)
        emb_dim = 4 * mc

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = None
        if cfg.adm_in_channels:  # the original's num_classes="sequential"
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )
        elif cfg.num_classes:  # the original's integer num_classes: one learned embedding per class
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        # Down: ch tracks the current width; skip_chs the width of every skip connection, in order.
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        ch, skip_chs = mc, [mc]
        for level, mult in enumerate(cfg.channel_mult):
            depth = cfg.transformer_depth[level]
            for _ in range(n):
                layers = [self._res_block(ch, mc * mult)]
                ch = mc * mult
                if depth:
                    layers.append(self._transformer(ch, depth))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chs.append(ch)
            if level != L - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_chs.append(ch)

        self.middle_block = EmbedSequential(
            self._res_block(ch, ch), self._transformer(ch, cfg.transformer_depth_middle), self._res_block(ch, ch)
        )
        self.skip_channels = tuple(skip_chs)  # width of each input block's output, in order
        self.middle_channels = ch
        self._init_fused_projections()  # ldm/fused_projections.py: off until ldm/speed.py switches them on

    def _res_block(self, ch_in: int, ch_out: int) -> ResBlock:
        cfg = self.cfg
        return ResBlock(ch_in, 4 * cfg.model_channels, ch_out, cfg.dropout, cfg.use_scale_shift_norm, cfg.norm_groups)

    def _transformer(self, ch: int, depth: int) -> SpatialTransformer:
        cfg = self.cfg
        heads, dim_head = cfg.heads(ch)
        # Kernel "auto" in the layers: forward pins cfg.sdpa_kernel once around the whole network.
        return SpatialTransformer(
            ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer,
            cfg.dropout, cfg.norm_groups, cfg.attention, "auto",
        )  # fmt: skip

    def block_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """Output shape of every input block, then of the middle block, for a (batch, C, height, width) input:
        the shapes of the ControlNet residuals in ``cond.control``. Each Downsample halves a size, rounding up."""
        cfg = self.cfg
        size = (height, width)
        shapes = [(batch, cfg.model_channels, *size)]
        for level, mult in enumerate(cfg.channel_mult):
            shapes += [(batch, cfg.model_channels * mult, *size)] * cfg.num_res_blocks
            if level != len(cfg.channel_mult) - 1:
                size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
                shapes.append((batch, cfg.model_channels * mult, *size))
        return shapes + [(batch, self.middle_channels, *size)]

    def set_attention_backend(self, backend: str, kernel: str = "auto") -> None:
        """Switch every attention layer to another backend (ldm/attention.py) without rebuilding."""
        check_backend(backend, kernel)
        self.sdpa_kernel = kernel
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.backend = backend

    def _embed(self, t: Tensor, cond: Cond) -> Tensor:
        """Time embedding (+ the vector or class embedding): (B,) -> (B', 4 mc), B' = max(B, MIN_EMB_ROWS)."""
        dtype = self.time_embed[0].weight.dtype
        # The embedding MLPs see at least MIN_EMB_ROWS rows: CPU BLAS rounds a matmul of 1-3 rows differently from a
        # bigger one, which would make an image's last bits depend on how many images share its batch.
        t_emb = _pad_rows(timestep_embedding(t, self.cfg.model_channels).to(dtype), MIN_EMB_ROWS)
        emb = self.time_embed(t_emb)  # (B', 4 mc); ResBlocks take the first B rows
        if self.cfg.num_classes:  # (B,) labels; padded rows look up class 0 and are never used
            emb = emb + self.label_emb(_pad_rows(cond.vector, MIN_EMB_ROWS)).to(dtype)
        elif self.label_emb is not None:
            emb = emb + self.label_emb(_pad_rows(cond.vector.to(dtype), MIN_EMB_ROWS))
        return emb

    def _run(self, block: EmbedSequential, *args) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # The recomputation runs in backward, outside forward's sdpa_context: it gets its own.
            contexts = lambda: (contextlib.nullcontext(), sdpa_context(self.sdpa_kernel))  # noqa: E731
            return checkpoint(block, *args, use_reentrant=False, context_fn=contexts)
        return block(*args)

    def _check_encoder_inputs(self, x: Tensor, t: Tensor | float, cond: Cond) -> tuple[Tensor, Tensor]:
        """x, t, cond.concat / context / vector against the config; returns (x, t as (B,))."""
        cfg = self.cfg
        if x.ndim != 4:
            raise ValueError(f"x: expected (B, C, H, W), got shape {tuple(x.shape)}")
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t: expected shape ({B},) or a scalar, got {tuple(t.shape)}")
        extra = 0 if cond.concat is None else cond.concat.shape[1]
        c = cond.concat
        if c is not None and (c.ndim != 4 or c.shape[0] != B or c.shape[2:] != x.shape[2:]):
            raise ValueError(f"cond.concat: expected ({B}, C, {x.shape[2]}, {x.shape[3]}), got {tuple(c.shape)}")
        if x.shape[1] + extra != cfg.in_channels:
            raise ValueError(
                f"x: {x.shape[1]} channels + cond.concat {extra} channels != unet.in_channels={cfg.in_channels}"
            )
        if cond.context is None:
            raise ValueError(f"cond.context: required, this U-Net cross-attends to ({B}, T, {cfg.context_dim}) tokens")
        if cond.context.ndim != 3 or cond.context.shape[0] != B or cond.context.shape[2] != cfg.context_dim:
            raise ValueError(f"cond.context: expected ({B}, T, {cfg.context_dim}), got {tuple(cond.context.shape)}")
        if cfg.adm_in_channels:
            if cond.vector is None or cond.vector.shape != (B, cfg.adm_in_channels):
                got = None if cond.vector is None else tuple(cond.vector.shape)
                raise ValueError(
                    f"cond.vector: required with shape ({B}, {cfg.adm_in_channels}) (unet.adm_in_channels), got {got}"
                )
        elif cfg.num_classes:
            _check_labels(cond.vector, B, cfg.num_classes)
        elif cond.vector is not None:
            raise ValueError("cond.vector: this U-Net takes no vector condition (unet.adm_in_channels=0)")
        return x, t

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _check_labels(labels: Tensor | None, batch: int, num_classes: int) -> None:
    v = labels
    if v is None or v.shape != (batch,) or v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
        got = None if v is None else f"{tuple(v.shape)} {v.dtype}"
        raise ValueError(
            f"cond.vector: required as ({batch},) integer class labels (unet.num_classes={num_classes}), got {got}"
        )
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
        raise ValueError(
            f"cond.vector: class labels must be in [0, {num_classes}) (unet.num_classes), got {int(v.min())} .. "
            f"{int(v.max())}"
        )


class UNet(UNetEncoder):
    """``net(x (B, C, H, W), t (B,), cond) -> (B, out_channels, H, W)``; see the module docstring for the layout."""

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)  # time_embed, label_emb, input_blocks, middle_block
        self.share_latent = False  # guidance passes one latent for its k conditions (speed.shared_latent, forward)
        mc, n = cfg.model_channels, cfg.num_res_blocks
        ch, skip_chs = self.middle_channels, list(self.skip_channels)

        # Up: each block takes one skip connection; the last block of a level (but the top one) upsamples.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            depth = cfg.transformer_depth[level]
            for j in range(n + 1):
                layers = [self._res_block(ch + skip_chs.pop(), mc * mult)]
                ch = mc * mult
                if depth:
                    layers.append(self._transformer(ch, depth))
                if level and j == n:
                    layers.append(Upsample(ch))
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, ch, eps=1e-5),
            nn.SiLU(),
            zero_module(nn.Conv2d(mc, cfg.out_channels, 3, padding=1)),
        )

    def adapter_slots(self) -> list[int]:
        """Where T2I-Adapter feature k is added: after input block ``adapter_slots()[k]``, to the running features
        and so to the skip taken there; the last slot, ``len(input_blocks)``, is after the middle block (the
        extra feature of T2I-Adapter-XL). This is diffusers' ``down_intrablock_additional_residuals``: a level
        with attention takes its feature after its last ResBlock + transformer, before the Downsample
        (CrossAttnDownBlock2D; the original T2I-Adapter's ``(id + 1) % 3 == 0`` rule for SD 1.x); a level without
        attention after its last block, the Downsample where it has one (DownBlock2D adds in place to its output,
        which is also its last skip)."""
        n, L = self.cfg.num_res_blocks, len(self.cfg.channel_mult)
        slots = []
        for level in range(L):
            last_res = 1 + level * (n + 1) + n - 1
            after_downsample = level != L - 1 and not self.cfg.transformer_depth[level]
            slots.append(last_res + 1 if after_downsample else last_res)
        return slots + [len(self.input_blocks)]

    def forward(
        self, x: Tensor, t: Tensor, cond: Cond | None = None, adapter: Sequence[Tensor] | None = None
    ) -> Tensor:
        """``adapter``: T2I-Adapter features (ldm/t2i_adapter.py), 1 to levels + 1 of them, feature k shaped
        like the output of block ``adapter_slots()[k]`` (see ``block_shapes``).

        One latent under several conditions: ``cond.context`` may have k * B rows for x's (and t's) B, k >= 2, with
        no other condition. The output is then (k B, out_channels, H, W), block j the U-Net of (x, t) under context
        rows [j B, (j + 1) B): what ``torch.cat([x] * k)`` would give, but the layers before the first
        cross-attention (conv_in, the first ResBlock, the first self-attention) run once on the B rows. This is
        classifier-free guidance's batch (ldm/guidance.py)."""
        cond = cond if cond is not None else Cond()
        x, t = self._check_inputs(x, t, cond, adapter)
        with sdpa_context(self.sdpa_kernel):  # once here rather than in each of the attention layers
            return self._forward(x, t, cond, adapter)

    def _forward(self, x: Tensor, t: Tensor, cond: Cond, adapter: Sequence[Tensor] | None = None) -> Tensor:
        dtype = self.time_embed[0].weight.dtype
        k = cond.context.shape[0] // x.shape[0]  # conditions sharing the latent (forward's docstring); usually 1
        if cond.concat is not None:
            x = torch.cat([x, cond.concat], dim=1)  # (B, in_channels, H, W)
        # (B', 4 mc), B' = max(k B, MIN_EMB_ROWS); ResBlocks take their first rows: B before the first cross-attention
        # widens the features to k B, k B after (t repeats, so both are right)
        emb = self._embed(t.repeat(k) if k > 1 else t, cond)
        emb = self._block_emb(emb)  # or every ResBlock's projection of it at once (fuse_emb_projections)
        context = self._block_context(cond.context.to(dtype))  # (k B, T, context_dim), or with every layer's k, v
        control = list(cond.control) if cond.control is not None else None
        features = dict(zip(self.adapter_slots(), adapter)) if adapter is not None else {}

        hs = []  # skip connections, one per input block
        h = x
        for i, block in enumerate(self.input_blocks):
            h = self._run(block, h, emb, context)
            if i in features:  # T2I-Adapter (Mou et al. 2023): into the running features, and so this skip
                h = h + features[i]
            hs.append(h)
        h = self._run(self.middle_block, h, emb, context)
        if h.shape[0] != k * x.shape[0]:  # no cross-attention on the way down: the latent's copies start here
            h = torch.cat([h] * k)
        if len(self.input_blocks) in features:
            h = h + features[len(self.input_blocks)]
        if control is not None:  # ControlNet (Zhang et al. 2023, cldm): residuals on the middle and the skips
            h = h + control.pop()
        for block in self.output_blocks:
            skip = hs.pop()
            if skip.shape[0] != h.shape[0]:  # taken before the first cross-attention: one copy per condition
                skip = torch.cat([skip] * k)
            if control is not None:
                skip = skip + control.pop()
            h = cat_channels(h, skip)  # (k B, C + C_skip, H_i, W_i)
            size = hs[-1].shape[-2:] if hs else None  # where an Upsample must land: the next skip's size
            h = self._run(block, h, emb, context, size)
        return self.out(h)  # (k B, out_channels, H, W)

    @staticmethod
    def _conditions_per_latent(x: Tensor, cond: Cond, adapter: Sequence[Tensor] | None) -> int:
        """k when cond.context has k * B rows (k >= 2) for x's B (forward's docstring), else 1; with k > 1 every
        condition but the context is an error that names it (they would need their own rows per condition)."""
        c = cond.context
        if not isinstance(c, Tensor) or c.ndim != 3 or x.ndim != 4 or x.shape[0] == 0:
            return 1
        B, rows = x.shape[0], c.shape[0]
        if rows <= B or rows % B:
            return 1  # the usual case; a mismatch is reported by _check_encoder_inputs
        others = {"cond.vector": cond.vector, "cond.concat": cond.concat, "cond.control": cond.control,
                  "cond.extra": cond.extra, "adapter": adapter}  # fmt: skip
        given = [name for name, v in others.items() if v is not None]
        if given:
            raise ValueError(f"cond.context has {rows} rows for x's {B}: one latent under {rows // B} conditions "
                             f"takes the context alone, not {', '.join(given)} (repeat x instead)")  # fmt: skip
        return rows // B

    def _check_inputs(
        self, x: Tensor, t: Tensor | float, cond: Cond, adapter: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        k = self._conditions_per_latent(x, cond, adapter)
        x, t = self._check_encoder_inputs(x, t, replace(cond, context=cond.context[: x.shape[0]]) if k > 1 else cond)
        shapes = self.block_shapes(x.shape[0], x.shape[2], x.shape[3])
        if cond.control is not None:
            if len(cond.control) != len(shapes):
                raise ValueError(
                    f"cond.control: expected {len(shapes)} residuals (one per input block, then the "
                    f"middle block), got {len(cond.control)}"
                )
            for i, (r, want) in enumerate(zip(cond.control, shapes)):
                if tuple(r.shape) not in (want, (*want[:2], 1, 1)):  # (B, C, 1, 1): globally pooled residuals
                    raise ValueError(f"cond.control[{i}]: expected shape {want} (or {(*want[:2], 1, 1)}), got "
                                     f"{tuple(r.shape)}")  # fmt: skip
        if adapter is not None:
            slots = self.adapter_slots()
            if not 1 <= len(adapter) <= len(slots):
                raise ValueError(f"adapter: expected 1 to {len(slots)} features (one per level, then the middle "
                                 f"block), got {len(adapter)}")  # fmt: skip
            for k, (f, slot) in enumerate(zip(adapter, slots)):
                if tuple(f.shape) != shapes[slot]:
                    where = "the middle block" if slot == len(self.input_blocks) else f"input block {slot}"
                    raise ValueError(f"adapter[{k}]: expected shape {shapes[slot]} (the output of {where}), got "
                                     f"{tuple(f.shape)}")  # fmt: skip
        return x, t
