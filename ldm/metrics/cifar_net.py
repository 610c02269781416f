"""A small CIFAR-10 classifier (ResNet-9, the DAWNBench network of Page, "How to train your ResNet", 2018), the
feature extractor of the ``cifar10`` eval suite (inference/evaluate.py) and trained by training/classifier.py.

    net = CifarNet(CifarNetConfig())          # 6.57 M parameters at width 64
    logits = net(images)                      # (B, 3, 32, 32) float in [0, 1] -> (B, 10)
    feats = net.features(images)              # (B, 512): the penultimate layer (global max pool), FD-cls lives here
    save_classifier(net, "runs/c"); net = load_classifier("runs/c")   # classifier.safetensors + config.json

The layout (width w = 64):  prep conv3x3 w -> [conv 2w, maxpool 2, residual(2 convs 2w)] -> [conv 4w, maxpool 2]
-> [conv 8w, maxpool 2, residual(2 convs 8w)] -> global max pool (8w features) -> linear -> x ``logit_scale``
(0.125, Page's output scaling, which lets the SGD learning rate be 0.4). Every conv is conv3x3 -> BatchNorm -> ReLU.

BatchNorm, not GroupNorm: this family reaches 94% on CIFAR-10 in minutes with BatchNorm (the published recipe), and
in eval mode BatchNorm is a fixed per-channel affine map, so an image's features never depend on which other images
share its batch; the FD and the accuracies do not depend on the batch size. The input normalisation (CIFAR-10
channel mean / std) is inside the network, so callers pass plain [0, 1] images.

Checkpoints are data (ARCHITECTURE.md habit 8): safetensors, the config as JSON beside it and in its metadata.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

WEIGHTS = "classifier.safetensors"
CONFIG = "config.json"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def class_caption(name: str) -> str:
    """The CIFAR-10 parquet's caption of a class: "a photo of a cat", "a photo of an airplane"."""
    return f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"


@dataclass(frozen=True)
class CifarNetConfig:
    width: int = 64  # channels of the first conv; the stages have 2w, 4w, 8w
    num_classes: int = 10
    logit_scale: float = 0.125
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)  # CIFAR-10 train channel statistics in [0, 1]
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
    classes: tuple[str, ...] = CIFAR10_CLASSES

    def __post_init__(self):
        if self.width < 1 or self.num_classes < 2 or len(self.classes) != self.num_classes:
            raise ValueError(f"CifarNetConfig: width >= 1, num_classes >= 2 and one class name each, got {self}")

    @classmethod
    def from_dict(cls, d: dict) -> CifarNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown classifier config keys: {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class CifarNet(nn.Module):
    def __init__(self, config: CifarNetConfig = CifarNetConfig()):
        super().__init__()
        self.config = config
        w = config.width
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self.body = nn.Sequential(
            conv_bn(3, w),                                                    # (B, w, 32, 32)
            conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w),              # (B, 2w, 16, 16)
            conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),                           # (B, 4w, 8, 8)
            conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w),          # (B, 8w, 4, 4)
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),                            # (B, 8w)
        )  # fmt: skip
        self.head = nn.Linear(8 * w, config.num_classes, bias=False)

    @property
    def feature_dim(self) -> int:
        return 8 * self.config.width

    def features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 8w) penultimate features."""
        return self.body((images - self.mean.to(images.dtype)) / self.std.to(images.dtype))

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, num_classes) logits."""
        return self.head(self.features(images)) * self.config.logit_scale


def save_classifier(net: CifarNet, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """FOLDER/classifier.safetensors (config in its metadata) + FOLDER/config.json; returns the weights' path."""
    from ldm.checkpoint import atomic_write, write_safetensors  # noqa: PLC0415

    folder = Path(folder)
    config = json.dumps(asdict(net.config))
    state = {k: v.detach().float().cpu() for k, v in net.state_dict().items()}
    write_safetensors(state, folder / WEIGHTS, metadata={"config": config, **(extra or {})})
    atomic_write(folder / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(asdict(net.config), indent=1) + "\n"))
    return folder / WEIGHTS


def classifier_weights(path: str | os.PathLike) -> Path:
    """The weights file of ``path`` (a folder holding classifier.safetensors, or the file); ValueError naming it."""
    path = Path(path)
    weights = path / WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise ValueError(f"{path}: no such file" if not path.exists() else f"{path}: holds no {WEIGHTS}")
    if weights.suffix != ".safetensors":
        raise ValueError(f"{weights}: expected a .safetensors file (written by training/classifier.py)")
    return weights


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> CifarNet:
    """The CifarNet of ``path`` (folder or .safetensors file) in eval mode; ValueError naming the file."""
    from ldm.checkpoint import load_into, read_metadata, read_state_dict  # noqa: PLC0415

    weights = classifier_weights(path)
    meta = read_metadata(weights)
    if "config" not in meta:
        raise ValueError(f"{weights}: no classifier config in its metadata (not written by training/classifier.py)")
    net = CifarNet(CifarNetConfig.from_dict(json.loads(meta["config"])))
    load_into(net, read_state_dict(weights), source=str(weights))
    return net.to(device).eval()


@torch.no_grad()
def embed(net: CifarNet, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """uint8 (N, 3, 32, 32) images -> (features float32 (N, 8w) on the CPU, predicted class int64 (N,)), in float32
    on the net's device, eval mode, ``batch_size`` at a time (the results do not depend on it: BatchNorm in eval)."""
    net.eval()
    device = next(net.parameters()).device
    feats, preds = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device).float().div(255)
        f = net.features(x)  # (b, 8w)
        preds.append((net.head(f) * net.config.logit_scale).argmax(1).cpu())
        feats.append(f.float().cpu())
    return torch.cat(feats), torch.cat(preds)
