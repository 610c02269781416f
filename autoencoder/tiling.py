"""Tiled VAE encode / decode: bounded memory for large images, seams hidden by linear blending.

Policy (both directions, per axis; the 2-D weight of a tile is the outer product of its two 1-D weights):

1. Placement. Along an axis of ``size`` latent pixels, a side that fits in one tile is not split (the tile
   shrinks to the image). Otherwise ``n = 1 + ceil((size - tile) / (tile - overlap))`` tiles of exactly
   ``tile`` latent pixels are spread evenly from 0 to ``size - tile`` (starts rounded to integers). Every
   tile is full size, so no tile sees a sliver of the image, and neighbours overlap by at least ``overlap``.
   Encoding uses the same grid in latent units (``tile`` and ``overlap`` are image pixels, multiples of f).
2. Blending. Inside the overlap of neighbours k and k+1 a band of width ``overlap`` (output pixels),
   centred in the overlap, carries a linear ramp: tile k's weight falls 1 -> 0 while tile k+1's rises
   0 -> 1, evaluated at pixel centres. Outside the bands each output pixel belongs to exactly one tile with
   weight 1 (copied unchanged). Bands are narrowed where needed so that they never overlap each other,
   hence at most two tiles touch a pixel per axis and the weights sum to 1 (up to float rounding); the
   pixels next to a tile's border, the ones worst affected by zero padding, get weight 0 when the overlap
   is wider than the band.
3. Encoding blends the posterior mean and logvar (not samples: averaging two independent noise draws
   would shrink the variance in the overlaps) and draws the noise once for the whole latent, so a tile
   covering the whole image reproduces the untiled ``encode`` exactly, sampling included.

Limitation: GroupNorm statistics (and the mid-block attention) are computed per tile, so a tiled result
differs from the untiled one; this is inherent to tiling (diffusers' ``enable_tiling`` has the same
limitation). Larger tiles and overlaps make the difference smaller; a tile covering the whole image
gives exactly the untiled result.

Each tile goes through the public ``vae.decode`` / ``vae.moments``, so the float32 NaN fallback of
``decode`` applies per tile.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from autoencoder.vae import AutoencoderKL


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of evenly spread, full-size tiles covering [0, size) with neighbours overlapping >= overlap."""
    if size <= tile:
        return [0]
    n = 1 + -(-(size - tile) // (tile - overlap))  # ceil division
    span = size - tile
    return [(k * span + (n - 1) // 2) // (n - 1) for k in range(n)]  # round(k * span / (n - 1))


def blend_weights_1d(starts: list[int], tile: int, overlap: float) -> list[Tensor]:
    """(tile,) float64 weight of each tile over its own extent [start, start + tile); see the module docstring.

    ``starts`` must be increasing with no gaps between tiles (start[k+1] <= start[k] + tile).
    """
    n = len(starts)
    ends = [s + tile for s in starts]
    for k in range(n - 1):
        if not starts[k] < starts[k + 1] <= ends[k]:
            raise ValueError(f"tile starts must increase and leave no gaps, got {starts} for tile {tile}")
    centres = [(starts[k + 1] + ends[k]) / 2 for k in range(n - 1)]  # middle of each pairwise overlap
    widths = []
    for k in range(n - 1):
        w = min(float(overlap), float(ends[k] - starts[k + 1]))
        if k > 0:
            w = min(w, centres[k] - centres[k - 1])  # bands never overlap: each fits within half the gap
        if k < n - 2:
            w = min(w, centres[k + 1] - centres[k])
        widths.append(w)

    def rise(k: int, pos: Tensor) -> Tensor:  # 0 -> 1 across band k (a step at the centre if it has no width)
        if widths[k] > 0:
            return ((pos - (centres[k] - widths[k] / 2)) / widths[k]).clamp(0.0, 1.0)
        return (pos > centres[k]).double()

    weights = []
    for k, s in enumerate(starts):
        pos = torch.arange(tile, dtype=torch.float64) + (s + 0.5)  # global pixel centres
        w = torch.ones(tile, dtype=torch.float64)
        if k > 0:
            w = w * rise(k - 1, pos)
        if k < n - 1:
            w = w * (1.0 - rise(k, pos))
        weights.append(w)
    return weights


def decode_tiled(
    vae: AutoencoderKL, latent: Tensor, tile: int = 64, overlap: int = 16, out: Tensor | None = None
) -> Tensor:
    """Scaled latent (B, z, h, w) -> image (B, Cout, h*f, w*f), decoded in tiles of ``tile`` latent pixels.

    out: optional preallocated (B, Cout, h*f, w*f) buffer to write into (its contents are ignored).
    """
    vae._check_latent(latent)
    _check_tiling(tile, overlap, unit=1, what="latent pixels")
    f = vae.config.downsample_factor
    outs = None if out is None else (out,)
    (image,) = _run_tiled(lambda x: (vae.decode(x),), latent, tile, overlap, in_scale=1, out_scale=f, outs=outs)
    return image


def moments_tiled(
    vae: AutoencoderKL, image: Tensor, tile: int = 512, overlap: int = 128, out: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """(B, Cin, H, W) image -> blended posterior (mean, logvar), each (B, z, H/f, W/f); tiles of ``tile`` pixels.

    out: optional preallocated (mean, logvar) buffers to write into (their contents are ignored).
    """
    vae._check_image(image)
    f = vae.config.downsample_factor
    _check_tiling(tile, overlap, unit=f, what="image pixels")
    mean, logvar = _run_tiled(vae.moments, image, tile // f, overlap // f, in_scale=f, out_scale=1, outs=out)
    return mean, logvar


def encode_tiled(
    vae: AutoencoderKL,
    image: Tensor,
    tile: int = 512,
    overlap: int = 128,
    sample: bool = True,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> Tensor:
    """``vae.encode`` in tiles: blended moments, then one posterior sample and the latent scaling."""
    return vae.encode(image, sample=sample, generator=generator, tile=tile, tile_overlap=overlap)


def _check_tiling(tile: int, overlap: int, unit: int, what: str) -> None:
    for name, value, low in (("tile", tile, 1), ("overlap", overlap, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low * unit or value % unit:
            raise ValueError(
                f"{name} must be an integer >= {low * unit} ({what}) and a multiple of {unit}, got {value!r}"
            )
    if overlap >= tile:
        raise ValueError(f"overlap must be smaller than tile, got overlap={overlap}, tile={tile}")


def _run_tiled(
    fn: Callable[[Tensor], tuple[Tensor, ...]],
    x: Tensor,
    tile: int,
    overlap: int,
    in_scale: int,
    out_scale: int,
    outs: tuple[Tensor, ...] | None,
) -> tuple[Tensor, ...]:
    """Apply ``fn`` to overlapping tiles of x (B, C, H, W) and blend its outputs.

    The tile grid is in "grid" units: grid pixel g covers input pixels [g*in_scale, (g+1)*in_scale) and
    output pixels [g*out_scale, (g+1)*out_scale). ``tile`` and ``overlap`` are in grid units.
    """
    gh, gw = x.shape[2] // in_scale, x.shape[3] // in_scale
    th, tw = min(tile, gh), min(tile, gw)
    ys, xs = tile_starts(gh, th, overlap), tile_starts(gw, tw, overlap)
    if len(ys) == 1 and len(xs) == 1 and outs is None:
        return fn(x)  # one tile covering everything: exactly the untiled computation
    wys = blend_weights_1d([s * out_scale for s in ys], th * out_scale, overlap * out_scale)
    wxs = blend_weights_1d([s * out_scale for s in xs], tw * out_scale, overlap * out_scale)
    written = torch.zeros(gh * out_scale, gw * out_scale, dtype=torch.bool, device=x.device)  # (Hout, Wout)
    for sy, wy in zip(ys, wys):
        y0, y1 = _support(wy)  # rows of this tile with weight > 0, relative to its output extent
        for sx, wx in zip(xs, wxs):
            x0, x1 = _support(wx)
            piece = x[:, :, sy * in_scale : (sy + th) * in_scale, sx * in_scale : (sx + tw) * in_scale]
            results = fn(piece)  # each (B, C_r, th*out_scale, tw*out_scale)
            if outs is None:
                outs = tuple(r.new_empty(r.shape[:2] + (gh * out_scale, gw * out_scale)) for r in results)
            oy, ox = sy * out_scale, sx * out_scale
            region = (slice(oy + y0, oy + y1), slice(ox + x0, ox + x1))
            done = written[region]  # (h, w): pixels a previous tile already contributed to
            for buf, r in zip(outs, results):
                _check_out(buf, r.shape[:2] + (gh * out_scale, gw * out_scale))
                w = (wy[y0:y1, None] * wx[None, x0:x1]).to(device=r.device, dtype=r.dtype)  # (h, w)
                contrib = r[:, :, y0:y1, x0:x1] * w  # (B, C_r, h, w); weight 1 copies exactly
                buf[(...,) + region] = torch.where(done, buf[(...,) + region] + contrib, contrib)
            written[region] = True
    return outs


def _support(w: Tensor) -> tuple[int, int]:
    nz = torch.nonzero(w > 0).flatten()
    return int(nz[0]), int(nz[-1]) + 1


def _check_out(buf: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(buf, Tensor) or tuple(buf.shape) != tuple(shape):
        got = tuple(buf.shape) if isinstance(buf, Tensor) else type(buf).__name__
        raise ValueError(f"out must be a tensor of shape {tuple(shape)}, got {got}")
