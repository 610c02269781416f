"""Train the CIFAR-10 classifier of the ``cifar10`` eval suite (ldm/metrics/cifar_net.py: ResNet-9, 6.6 M params).

    python -m training.classifier --data ../shared/data/cifar10 --out runs/cifar10-classifier --epochs 24

Writes OUT/classifier.safetensors (config in its metadata), OUT/config.json and OUT/metrics.json
(``test_accuracy``, per-class accuracy, epochs, seconds). The recipe is Page's DAWNBench ResNet-9 ("How to train
your ResNet", 2018: 94% test accuracy in 24 epochs): batch 512, SGD with Nesterov momentum 0.9, weight decay 5e-4
(on the mean loss), a one-cycle learning rate (linear 0 -> 0.4 over the first 5/24 of training, then linear to 0),
label smoothing 0.1, the logits scaled by 0.125. Augmentation on the device, per image and epoch: random crop of 32
from the image reflect-padded by 4, and a horizontal flip with probability 1/2. bf16 autocast on CUDA.

The whole split lives in memory as uint8 (150 MB for train), decoded once (ldm/metrics/cifar_data.py); there is no
DataLoader. Every argument and the data folder are checked before the data is decoded or a network is built.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.metrics.cifar_data import load_cifar_split, split_file
from ldm.metrics.cifar_net import CifarNet, CifarNetConfig, save_classifier

METRICS = "metrics.json"


def augment(images: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """(B, 3, H, W) float -> the same shape: a random crop of the reflect-padded image and a random horizontal flip,
    drawn per image from ``generator`` (on the images' device)."""
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")  # (B, 3, H + 2p, W + 2p)
    dev = images.device
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, W)
    out = padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(3, device=dev)[None, :, None, None],
                 rows, cols]  # (B, 3, H, W)  # fmt: skip
    flip = torch.rand(b, generator=generator, device=dev) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def one_cycle(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear 0 -> peak over the first ``warmup`` fraction of ``total`` steps, then linear to 0."""
    up = max(1, round(warmup * total))
    return peak * (step + 1) / up if step < up else peak * max(0.0, (total - step) / max(1, total - up))


def make_optimizer(net: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.SGD:
    """SGD, Nesterov momentum 0.9; weight decay on conv / linear weights only (not on BatchNorm)."""
    decay = [p for p in net.parameters() if p.ndim > 1]
    rest = [p for p in net.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                           lr=lr, momentum=0.9, nesterov=True)  # fmt: skip


def train_steps(net: CifarNet, images: Tensor, labels: Tensor, *, epochs: int, batch_size: int, lr: float = 0.4,
                weight_decay: float = 5e-4, label_smoothing: float = 0.1, warmup: float = 5 / 24, seed: int = 0,
                augmentation: bool = True, progress: bool = False) -> list[float]:  # fmt: skip
    """Train ``net`` in place on uint8 (N, 3, H, W) ``images`` already on its device; returns each step's loss.
    The last incomplete batch of an epoch is dropped (BatchNorm statistics of a tiny batch are noise)."""
    from tqdm import tqdm  # noqa: PLC0415

    dev = images.device
    n = images.shape[0]
    per_epoch = max(1, n // batch_size)
    total = epochs * per_epoch
    gen = torch.Generator(device=dev).manual_seed(seed)
    opt = make_optimizer(net, lr, weight_decay)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    losses: list[float] = []
    net.train()
    bar = tqdm(total=total, unit="step", desc="training", disable=not progress, file=sys.stderr)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen, device=dev)
        for k in range(per_epoch):
            idx = order[k * batch_size : (k + 1) * batch_size]
            x = images[idx].float().div_(255)
            if augmentation:
                x = augment(x, gen)
            for group in opt.param_groups:
                group["lr"] = one_cycle(step, total, lr, warmup)
            with autocast:
                loss = F.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)), labels[idx],
                                       label_smoothing=label_smoothing)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if progress or step % 50 == 0 or step == total:
                losses.append(float(loss.detach()))
                bar.set_postfix_str(f"epoch {epoch + 1}/{epochs} loss {losses[-1]:.3f}")
            bar.update(1)
    bar.close()
    net.eval()
    return losses


@torch.no_grad()
def predict(net: CifarNet, images: Tensor, batch_size: int = 1000) -> Tensor:
    """uint8 (N, 3, H, W) on the net's device -> predicted class (N,), eval mode."""
    net.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.device.type == "cuda")
    out = []
    for start in range(0, images.shape[0], batch_size):
        with autocast:
            out.append(net(images[start : start + batch_size].float().div(255)).argmax(1))
    return torch.cat(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.classifier", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--data", default="../shared/data/cifar10", help="folder holding train.parquet and test.parquet")
    p.add_argument("--out", default="runs/cifar10-classifier", help="output folder")
    p.add_argument("--epochs", type=int, default=24, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=512, help="images per step")
    p.add_argument("--lr", type=float, default=0.4, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (conv / linear weights)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    p.add_argument("--width", type=int, default=64, help="channels of the first conv (ResNet-9: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, order and augmentation")
    p.add_argument("--limit", type=int, default=None, help="train on a random N of the training rows (for quick checks)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the argument, before any heavy work."""
    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 2),
                             ("--width", args.width, 1), ("--seed", args.seed, 0)):  # fmt: skip
        if value < low:
            raise ValueError(f"{flag}: must be >= {low}, got {value}")
    if args.limit is not None and args.limit < args.batch_size:
        raise ValueError(f"--limit: must be >= --batch-size ({args.batch_size}), got {args.limit}")
    for flag, value in (("--lr", args.lr), ("--weight-decay", args.weight_decay)):
        if not value >= 0:
            raise ValueError(f"{flag}: must be >= 0, got {value}")
    if not 0 <= args.label_smoothing < 1:
        raise ValueError(f"--label-smoothing: must be in [0, 1), got {args.label_smoothing}")
    for split in ("train", "test"):
        try:
            split_file(args.data, split)
        except ValueError as e:
            raise ValueError(f"--data {e}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        print(f"training.classifier: error: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    train_x, train_y, names = load_cifar_split(args.data, "train")
    if args.limit is not None:  # a seeded random subset: the parquet's rows are sorted by class
        keep = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed))[: args.limit]
        train_x, train_y = train_x[keep], train_y[keep]
    test_x, test_y, _ = load_cifar_split(args.data, "test")
    print(f"data: {len(train_y)} train, {len(test_y)} test images ({time.perf_counter() - started:.1f} s)",
          file=sys.stderr)  # fmt: skip
    net = CifarNet(CifarNetConfig(width=args.width, classes=tuple(names), num_classes=len(names)))
    net = net.to(device, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    losses = train_steps(net, train_x.to(device), train_y.to(device), epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                         seed=args.seed, progress=not args.quiet)  # fmt: skip
    seconds = time.perf_counter() - started
    pred = predict(net, test_x.to(device)).cpu()
    correct = pred == test_y
    per_class = {name: float(correct[test_y == c].float().mean()) for c, name in enumerate(names)
                 if (test_y == c).any()}  # fmt: skip
    metrics = dict(test_accuracy=float(correct.float().mean()), per_class=per_class, epochs=args.epochs,
                   batch_size=args.batch_size, lr=args.lr, train_images=len(train_y), seconds=round(seconds, 1),
                   final_loss=losses[-1] if losses else None, device=str(device))  # fmt: skip
    weights = save_classifier(net, args.out, extra={"test_accuracy": f"{metrics['test_accuracy']:.4f}"})
    (Path(args.out) / METRICS).write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"test accuracy {100 * metrics['test_accuracy']:.2f}% after {args.epochs} epochs ({seconds:.0f} s); "
          f"wrote {weights}, {Path(args.out) / METRICS}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
