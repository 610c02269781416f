"""The ``cifar10`` eval suite (registered in inference/evaluate.py's SUITES): class-conditional samples of a model
trained on CIFAR-10 (shared/data/cifar10), scored by the project's own CIFAR-10 classifier (ldm/metrics/cifar_net.py,
trained by ``python -m training.classifier``); no downloaded network.

    result = evaluate_cifar10(pipe, prompts, seed=0, classifier="runs/cifar10-classifier",
                              data="../shared/data/cifar10", baselines=True, vae_psnr=True)

Prompts are the dataset's captions, "a photo of a {class}" (``n`` per class); image i gets seed ``seed + i``. Each
image is scaled to 32 px if the model samples at another size (bicubic) and classified:

- ``ok``: prompted-class accuracy, the fraction of images classified as the class they were prompted with, overall
  and per class in ``by_kind`` (kind = class name);
- ``fd_cls``: the Fréchet distance (ldm/metrics/fd.py) between the samples' penultimate classifier features and those
  of the whole test split ("FD-cls"; like FID, but in a feature space trained on CIFAR-10 itself);
- ``classifier``: its path and its accuracy on the test split, measured here;
- ``baselines`` (``baselines=True``), measured the same way: ``real``, as many training-split images as samples with
  the same classes (a seeded draw per sample from its prompted class): the FD-cls of real data at this sample size
  (FD has a bias that grows as N shrinks, so compare at equal N) and the classifier's accuracy on them; ``cfg1``: the
  same prompts and seeds sampled without guidance (cfg scale 1);
- ``vae_psnr`` (``vae_psnr=True``): the model VAE's reconstruction PSNR (posterior mean, ldm/metrics/psnr.py) on the
  test split at 32 px.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # torch is imported lazily: the command line imports this module to list the suites
    import torch

KIND = "classes"


def class_prompts(kind: str, n: int, prompt_seed: int = 0) -> list[str]:
    """n captions per CIFAR-10 class, class by class ("a photo of an airplane" x n, "a photo of an automobile" ...);
    ``prompt_seed`` changes nothing (the set is fixed)."""
    from ldm.metrics.cifar_net import CIFAR10_CLASSES, class_caption  # noqa: PLC0415

    if kind != KIND:
        raise ValueError(f"unknown prompt set {kind!r}; the cifar10 suite has {KIND!r}")
    return [class_caption(name) for name in CIFAR10_CLASSES for _ in range(n)]


def check_class_prompt(prompt: str) -> None:
    from ldm.metrics.cifar_net import CIFAR10_CLASSES, class_caption  # noqa: PLC0415

    if prompt not in {class_caption(c) for c in CIFAR10_CLASSES}:
        raise ValueError(f"prompt {prompt!r} is not a CIFAR-10 class caption (\"{class_caption('cat')}\", "
                         f"\"{class_caption('airplane')}\", ...)")  # fmt: skip


def to_uint8(images: Sequence, side: int = 32) -> torch.Tensor:
    """PIL images -> uint8 (N, 3, side, side), bicubic-scaled where their size differs."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    arrays = [np.asarray((im if im.size == (side, side) else im.resize((side, side), Image.BICUBIC)).convert("RGB"))
              for im in images]  # fmt: skip
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _scored(net, images, targets, test_stats) -> tuple[dict, object]:
    """{ok, fd_cls} of uint8 images with their target classes, and the predictions."""
    from ldm.metrics.cifar_net import embed  # noqa: PLC0415
    from ldm.metrics.fd import feature_stats, frechet_distance  # noqa: PLC0415

    feats, preds = embed(net, images)
    fd = frechet_distance(*feature_stats(feats), *test_stats) if len(feats) >= 2 else None
    return {"n": len(targets), "ok": float((preds == targets).float().mean()), "fd_cls": fd}, preds


def evaluate_cifar10(pipe, prompts: Sequence[str], *, sampler: str = "dpmpp_2m", steps: int = 25,
                     cfg_scale: float = 7.5, seed: int | Sequence[int] = 0, batch_size: int = 16,
                     resolution: int | None = None, progress: bool = False, classifier=None, data=None,
                     baselines: bool = False, vae_psnr: bool = False, teleport: float = 0.0,
                     teleport_stats=None) -> dict:  # fmt: skip
    """Generate one image per class prompt and score it (module docstring). Returns the summary (``n``, ``ok``,
    ``fd_cls``, ``by_kind``, ``classifier``, [``baselines``], [``vae_psnr``]), ``scores`` (per image: ``prompt``,
    ``seed``, ``kind`` = prompted class, ``predicted``, ``ok``), ``seeds`` and ``images``."""
    import torch  # noqa: PLC0415

    from ldm.metrics.cifar_data import load_cifar_split  # noqa: PLC0415
    from ldm.metrics.cifar_net import class_caption, embed, load_classifier  # noqa: PLC0415
    from ldm.metrics.fd import feature_stats  # noqa: PLC0415

    from .evaluate import _prompt_list, _seed_list, generate_images  # noqa: PLC0415

    if classifier is None:
        raise ValueError("--classifier: the cifar10 suite needs a classifier (python -m training.classifier)")
    if data is None:
        raise ValueError("--data: the cifar10 suite needs the CIFAR-10 folder (test.parquet)")
    prompts = _prompt_list(prompts)
    seeds = _seed_list(seed, len(prompts))
    net = load_classifier(classifier, device=pipe.device)
    names = net.config.classes
    by_caption = {class_caption(name): k for k, name in enumerate(names)}
    unknown = [p for p in prompts if p not in by_caption]
    if unknown:
        raise ValueError(f"prompt {unknown[0]!r} names none of the classifier's classes ({', '.join(names)})")
    targets = torch.tensor([by_caption[p] for p in prompts])

    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    test_x, test_y, _ = load_cifar_split(data, "test")
    say(f"classifying the {len(test_y)} test images")
    test_feats, test_pred = embed(net, test_x)
    test_stats = feature_stats(test_feats)
    sampling = dict(sampler=sampler, steps=steps, batch_size=batch_size, resolution=resolution, progress=progress,
                    teleport=teleport, teleport_stats=teleport_stats)  # the cfg 1 baseline is teleported alike
    images = generate_images(pipe, prompts, seeds=seeds, cfg_scale=cfg_scale, **sampling)
    summary, preds = _scored(net, to_uint8(images), targets, test_stats)
    summary["by_kind"] = {
        names[c]: {"n": int((targets == c).sum()), "ok": float((preds[targets == c] == c).float().mean())}
        for c in dict.fromkeys(targets.tolist())  # the classes in prompt order
    }  # fmt: skip
    summary["classifier"] = {"path": str(classifier), "test_accuracy": float((test_pred == test_y).float().mean()),
                             "feature_dim": int(test_feats.shape[1])}  # fmt: skip
    if baselines:
        train_x, train_y, _ = load_cifar_split(data, "train")
        gen = torch.Generator().manual_seed(0)
        pick = []
        for c in targets.tolist():  # a random training image of each sample's class
            pool = (train_y == c).nonzero().flatten()
            if not len(pool):
                raise ValueError(f"--data {data}: train.parquet has no image of class {names[c]!r}")
            pick.append(int(pool[torch.randint(len(pool), (1,), generator=gen)]))
        real, _ = _scored(net, train_x[pick], targets, test_stats)
        say("sampling the cfg 1 baseline")
        unguided = generate_images(pipe, prompts, seeds=seeds, cfg_scale=1.0, **sampling)
        cfg1, _ = _scored(net, to_uint8(unguided), targets, test_stats)
        summary["baselines"] = {"real": real, "cfg1": cfg1}
    if vae_psnr:
        summary["vae_psnr"] = vae_reconstruction_psnr(pipe, test_x)
    scores = [{"prompt": p, "seed": s, "kind": names[int(t)], "predicted": names[int(q)], "ok": bool(t == q)}
              for p, s, t, q in zip(prompts, seeds, targets, preds)]  # fmt: skip
    return {**summary, "scores": scores, "seeds": seeds, "images": images}


def vae_reconstruction_psnr(pipe, images, batch_size: int = 250) -> float:
    """PSNR in dB of the model VAE's reconstructions (decoded posterior mean) of uint8 (N, 3, H, W) images."""
    import torch  # noqa: PLC0415

    from ldm.metrics.psnr import PSNR  # noqa: PLC0415

    vae, metric = pipe.bundle.vae, PSNR()
    factor = pipe.factor
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise ValueError(f"--vae-psnr: the test images ({images.shape[-1]} px) are not a multiple of the VAE's "
                         f"downsampling factor {factor}")  # fmt: skip
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].float().div(127.5).sub(1)  # (b, 3, H, W) in [-1, 1]
        with torch.no_grad():
            mean, _ = vae.moments(x.to(pipe.device, pipe.dtype))  # (b, z, H/f, W/f)
            metric.update(x, vae._decode_z(mean).float().cpu())
    return metric.compute()


def footer(result: dict) -> list[str]:
    """Lines printed under the table: FD-cls, the classifier's accuracy, baselines, VAE PSNR."""
    clf = result["classifier"]
    lines = [f"FD-cls {_num(result['fd_cls'])} (samples vs test split; classifier test accuracy "
             f"{100 * clf['test_accuracy']:.2f}%)"]  # fmt: skip
    for name, b in result.get("baselines", {}).items():
        what = {"real": "real training images", "cfg1": "samples at cfg 1"}.get(name, name)
        lines.append(f"baseline {name} ({what}, n {b['n']}): FD-cls {_num(b['fd_cls'])}, class acc "
                     f"{100 * b['ok']:.1f}%")  # fmt: skip
    if "vae_psnr" in result:
        lines.append(f"VAE reconstruction PSNR {result['vae_psnr']:.2f} dB (test split, posterior mean)")
    return lines


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def check_data(folder: Path, baselines: bool) -> None:
    """ValueError naming --data when a split the run needs is missing."""
    from ldm.metrics.cifar_data import split_file  # noqa: PLC0415

    for split in ("test", "train") if baselines else ("test",):
        try:
            split_file(folder, split)
        except ValueError as e:
            raise ValueError(f"--data {e}") from None
