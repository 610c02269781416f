"""The PatchGAN discriminator used to train the KL autoencoder adversarially.

``NLayerDiscriminator`` of Isola et al. 2017 ("Image-to-Image Translation with Conditional Adversarial Networks",
pix2pix, sec. 3.2.2), as taming-transformers (Esser et al. 2021) and latent-diffusion use it: a plain stack of
4x4 convolutions, LeakyReLU(0.2), no pooling and no fully connected head, so it outputs a MAP of logits, one per
overlapping image patch, instead of one logit per image. For ``n_layers`` = 3 (the default everywhere):

    image (B, 3, H, W)
      conv 4x4 s2, LeakyReLU                           (B,  64, H/2,   W/2)      first layer: no norm, with bias
      conv 4x4 s2, norm, LeakyReLU                     (B, 128, H/4,   W/4)      n = 1 .. n_layers - 1
      conv 4x4 s2, norm, LeakyReLU                     (B, 256, H/8,   W/8)
      conv 4x4 s1, norm, LeakyReLU                     (B, 512, H/8-1, W/8-1)
      conv 4x4 s1                                      (B,   1, H/8-2, W/8-2)    the patch logits

Output size: each stride-2 conv (kernel 4, padding 1) maps n -> floor(n / 2), each stride-1 conv maps n -> n - 1,
so a 256x256 image gives the well-known 30x30 map, 64x64 gives 6x6 and 32x32 gives 2x2 (``output_size``).

Receptive field: one output logit sees a square of ``receptive_field(n_layers)`` input pixels,
1 + sum_l (k - 1) * prod_{j<l} s_j = 1 + 3 * (1 + 2 + 4 + 8 + 8) = 70 for n_layers = 3: the "70x70 PatchGAN".
(n_layers = 1: 16, n_layers = 2: 34, n_layers = 4: 142.) Each logit judges whether its 70x70 patch looks real,
which is what pushes the decoder towards sharp local texture while the L1/L2 term keeps the low frequencies.

Parameter names (``main.{i}.weight``) are those of taming-transformers, so the ``loss.discriminator.main.*``
tensors of an original LDM autoencoder training checkpoint load after stripping ``loss.discriminator.``.

Normalization: ``norm="batch"`` is the original (BatchNorm2d). Under data-parallel training BatchNorm sees
only the local batch (or needs SyncBatchNorm); ``norm="group"`` (GroupNorm) normalizes each sample alone and
is independent of the batch split, at the cost of no longer being the published configuration. As in the
original, the normalized convolutions have no bias (the norm's shift replaces it); ``norm="none"`` gives
them one.

Initialization (taming-transformers ``weights_init``, after DCGAN, Radford et al. 2016): conv weights
N(0, 0.02), norm scales N(1, 0.02) and shifts 0. Conv biases keep PyTorch's default, as in the original.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ldm.config import check_choices, choice

KERNEL, PADDING = 4, 1
NORMS = ("batch", "group", "none")


@dataclass
class DiscriminatorConfig:
    """Shape of the PatchGAN; defaults are those of every LDM / SD autoencoder config (ndf 64, 3 layers)."""

    in_channels: int = 3  # disc_in_channels
    base_channels: int = 64  # ndf: width of the first layer; layer n has base_channels * min(2^n, 8)
    n_layers: int = 3  # disc_num_layers: stride-2 convolutions; sets the receptive field (70 px for 3)
    norm: str = choice("batch", *NORMS)  # batch = original; group = DDP-friendly without SyncBatchNorm
    norm_num_groups: int = 32  # GroupNorm groups (norm="group" only); must divide every normalized width

    def __post_init__(self) -> None:
        for name in ("in_channels", "base_channels", "n_layers", "norm_num_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"discriminator.{name} must be a positive integer, got {value!r}")
        check_choices(self, "discriminator")
        if self.norm == "group":
            for width in self.normalized_widths():
                if width % self.norm_num_groups:
                    raise ValueError(
                        f"discriminator.norm_num_groups={self.norm_num_groups} must divide every normalized width "
                        f"{self.normalized_widths()}, but {width} is not a multiple of it"
                    )

    def widths(self) -> list[int]:
        """Output channels of the n_layers + 1 hidden convolutions: ndf * min(2^n, 8), n = 0 .. n_layers."""
        return [self.base_channels * min(2**n, 8) for n in range(self.n_layers + 1)]

    def normalized_widths(self) -> list[int]:
        return self.widths()[1:]  # the first convolution is not normalized


def output_size(size: int, n_layers: int = 3) -> int:
    """Logit map side for an input side ``size``: n_layers halvings (floor), then two stride-1 convs (-1 each)."""
    for _ in range(n_layers):
        size = (size + 2 * PADDING - KERNEL) // 2 + 1  # = size // 2
    return size - 2


def receptive_field(n_layers: int = 3) -> int:
    """Input pixels seen by one logit, per side: 1 + sum over convs of (kernel - 1) * (product of earlier strides)."""
    strides = [2] * n_layers + [1, 1]
    field, jump = 1, 1
    for s in strides:
        field += (KERNEL - 1) * jump
        jump *= s
    return field


def min_input_size(n_layers: int = 3) -> int:
    """Smallest input side that still gives a 1x1 logit map (24 for n_layers = 3)."""
    return 3 * 2**n_layers


class NLayerDiscriminator(nn.Module):
    """PatchGAN: image (B, C, H, W) -> patch logits (B, 1, output_size(H), output_size(W)); see the module docstring."""

    def __init__(self, config: DiscriminatorConfig | None = None):
        super().__init__()
        self.config = c = config if config is not None else DiscriminatorConfig()
        if not isinstance(c, DiscriminatorConfig):
            raise ValueError(f"config must be a DiscriminatorConfig, got {type(c).__name__}")
        widths = c.widths()
        bias = c.norm == "none"  # a norm with an affine shift makes a conv bias redundant (original: use_bias)
        layers: list[nn.Module] = [
            nn.Conv2d(c.in_channels, widths[0], KERNEL, stride=2, padding=PADDING),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for n in range(1, c.n_layers + 1):  # n_layers - 1 stride-2 convs, then one stride-1 conv
            stride = 2 if n < c.n_layers else 1
            layers += [nn.Conv2d(widths[n - 1], widths[n], KERNEL, stride=stride, padding=PADDING, bias=bias)]
            layers += [_norm(c, widths[n]), nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(widths[-1], 1, KERNEL, stride=1, padding=PADDING)]  # one logit per patch
        self.main = nn.Sequential(*[m for m in layers if m is not None])
        self.apply(_init_weights)

    def forward(self, image: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 1, h, w) logits
        c = self.config
        if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[1] != c.in_channels:
            got = f"shape {tuple(image.shape)}" if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"image must be a (B, {c.in_channels}, H, W) tensor, got {got}")
        smallest = min_input_size(c.n_layers)
        if min(image.shape[2:]) < smallest:
            raise ValueError(
                f"image height and width must be >= {smallest} for a {c.n_layers}-layer PatchGAN "
                f"(else the logit map is empty), got {image.shape[2]}x{image.shape[3]}"
            )
        return self.main(image)


def _norm(c: DiscriminatorConfig, width: int) -> nn.Module | None:
    if c.norm == "batch":
        return nn.BatchNorm2d(width)
    if c.norm == "group":
        return nn.GroupNorm(c.norm_num_groups, width)
    return None


def _init_weights(m: nn.Module) -> None:
    """taming-transformers ``weights_init``: conv weight N(0, 0.02); norm scale N(1, 0.02), shift 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
