"""``ldm analyze``: the reverse process made visible (Wang & Vastola 2023, "Diffusion models generate images like
painters"), as numbers (DIR/analysis.json) and PNG plots (DIR/analysis-*.png).

    ldm analyze --out outputs/analyze                        # the embedded default model, shapes data
    ldm analyze --model runs/cifar/final --prompts prompts.txt --data images/ --n 16 --steps 25 --out DIR

Four analyses (formulas in ldm/analysis/ and docs/analysis.md):

1. trajectory geometry: record ``--n`` trajectories (prompts of the shapes grammar, or a file; seeds ``--seed + i``)
   and measure the share of each one's variance in its top two principal components and the angle it sweeps;
2. coarse to fine: per step, the energy of the predicted x0 (latent, and decoded to pixels) in the low and high
   spatial-frequency bands, and the step at which each band settles;
3. perturbation sensitivity: nudge x_t at step k with noise of fixed (VP-scale) norm; the final latent's change vs k;
4. analytical teleportation: fit the data's Gaussian in latent space (``--data``: the builtin shapes images, or a
   folder of images, encoded by the model's VAE; or ``--stats FILE`` from an earlier run), replace the first part of
   the reverse process by its closed-form solution, and score prompt adherence (ldm.shapes checker) against the
   fraction of network evaluations saved, next to the same sampler given only the remaining steps.

The sampling is the pipeline's txt2img path (inference/pipeline.py): start ``noise * sqrt(1 + sigma_0^2)`` from a
per-image CPU generator, classifier-free guidance with the empty negative prompt, the sampler's own sigmas.
Plots are drawn with Pillow by bench/plot_curves.py (imported from the repository checkout; without it only the
JSON is written). Every argument is checked before the model is loaded.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .analysis_plots import write_plots
from .convert import DTYPES
from . import eval_cli  # its load_pipeline is looked up at call time (a seam tests replace)
from .eval_cli import ALL_KINDS, _check_model, _check_sampler, _device
from .generate_cli import one_line_error

REPORT = "analysis.json"
STATS = "gaussian.safetensors"
DEFAULT_FRACTIONS = "0,0.08,0.16,0.24,0.32,0.4,0.48,0.56,0.64,0.72,0.8"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="the reverse process made visible: trajectory geometry, coarse-to-fine, perturbations, "
        "analytical teleportation", description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="Details and results: docs/analysis.md.",
    )  # fmt: skip
    p.error = one_line_error(p)
    a = p.add_argument
    a("--model", metavar="PATH", help="model file or folder (default: the embedded default model)")
    a("--prompts", default=ALL_KINDS, metavar="SET|FILE", help="shapes prompt set (single, relation, both) or a "
      "text file, one prompt a line (default: %(default)s)")  # fmt: skip
    a("--n", type=int, default=8, help="trajectories per prompt set (with a FILE: its first N prompts) "
      "(default: %(default)s)")  # fmt: skip
    a("--steps", type=int, default=25, help="sampling steps (default: %(default)s)")
    a("--sampler", default="dpmpp_2m", metavar="NAME", help="a deterministic sampler (default: %(default)s)")
    a("--cfg-scale", type=float, default=5.0, metavar="S", help="guidance scale (default: %(default)s)")
    a("--seed", type=int, default=0, help="image i gets seed + i (default: %(default)s)")
    a("--data", default="shapes", metavar="shapes|DIR", help="data for the Gaussian fit: the builtin shapes images "
      "or a folder of images (resized and centre-cropped to the model's size) (default: %(default)s)")  # fmt: skip
    a("--data-n", type=int, default=2000, metavar="N", help="images for the Gaussian fit (default: %(default)s)")
    a("--rank", type=int, metavar="R", help="eigenpairs kept by the fit; the rest is isotropic (default: all the "
      "data supports, min(N - 1, D))")  # fmt: skip
    a("--stats", metavar="FILE", help=f"Gaussian statistics from an earlier run ({STATS}) instead of fitting")
    a("--radius", type=float, default=0.1, help="perturbation norm per unit of VP-scale norm per element: "
      "|delta| = radius sqrt(D (1 + sigma_k^2)) (default: %(default)s)")  # fmt: skip
    a("--perturb-points", type=int, default=9, metavar="K", help="steps k perturbed, evenly spread "
      "(default: %(default)s)")  # fmt: skip
    a("--cutoff", type=float, default=0.25, help="low/high band boundary, cycles per pixel (default: %(default)s)")
    a("--settle-tol", type=float, default=0.05, help="a band has settled once within this relative distance of "
      "its final energy for good (default: %(default)s)")  # fmt: skip
    a("--teleport-n", type=int, default=50, metavar="N", help="prompts (half single, half relation) scored per "
      "teleportation fraction; 0 skips the curve (default: %(default)s)")  # fmt: skip
    a("--teleport-fractions", default=DEFAULT_FRACTIONS, metavar="F,F,...", help="fractions of the steps "
      "teleported (default: %(default)s)")  # fmt: skip
    a("--batch-size", type=int, default=50, metavar="B", help="images per network call (default: %(default)s)")
    a("--out", default="outputs/analyze", metavar="DIR", help="folder for analysis.json, the plots and "
      f"{STATS} (default: %(default)s/)")  # fmt: skip
    a("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    a("--dtype", default="fp32", choices=DTYPES, help="network dtype (default: %(default)s)")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------ checking


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    from ldm.samplers import STOCHASTIC  # noqa: PLC0415

    for flag, value, low in (("--n", args.n, 1), ("--steps", args.steps, 2), ("--seed", args.seed, 0),
                             ("--data-n", args.data_n, 2), ("--perturb-points", args.perturb_points, 1),
                             ("--teleport-n", args.teleport_n, 0), ("--batch-size", args.batch_size, 1),
                             ("--rank", args.rank, 1)):  # fmt: skip
        if value is not None and value < low:
            raise ValueError(f"{flag}: must be >= {low}, got {value}")
    _check_sampler(args.sampler)
    if args.sampler in STOCHASTIC:
        raise ValueError(f"--sampler: {args.sampler} is stochastic; the analyses need a deterministic sampler")
    for flag, v in (("--cfg-scale", args.cfg_scale), ("--radius", args.radius), ("--cutoff", args.cutoff),
                    ("--settle-tol", args.settle_tol)):  # fmt: skip
        if not (math.isfinite(v) and v >= 0) or (flag != "--cfg-scale" and v == 0):
            raise ValueError(f"{flag}: must be a positive number, got {v}")
    try:
        args.fractions = sorted({float(f) for f in args.teleport_fractions.split(",") if f.strip()} | {0.0})
    except ValueError:
        raise ValueError(f"--teleport-fractions: comma-separated numbers, got {args.teleport_fractions!r}") from None
    if any(not 0 <= f < 1 for f in args.fractions):
        raise ValueError(f"--teleport-fractions: each in [0, 1), got {args.teleport_fractions}")
    args.model_path = _check_model(args.model)
    args.prompt_list = _prompts(args.prompts, args.n)
    if args.stats is not None and not Path(args.stats).is_file():
        raise ValueError(f"--stats {args.stats}: no such file")
    if args.stats is None and args.data != "shapes":
        folder = Path(args.data)
        if not folder.is_dir() or not _image_files(folder):
            raise ValueError(f"--data {args.data}: neither 'shapes' nor a folder with images ({', '.join(IMAGE_SUFFIXES)})")
    args.out = Path(args.out)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out}: exists and is not a folder")
    args.device = _device(args.device)
    return args


def _prompts(spec: str, n: int) -> list[str]:
    from ldm.shapes import prompt_set  # noqa: PLC0415

    if spec in ("single", "relation"):
        return prompt_set(spec, n)
    if spec == ALL_KINDS:
        return prompt_set("single", n) + prompt_set("relation", n)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--prompts {spec}: neither single, relation, {ALL_KINDS} nor a file")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")][:n]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts")
    return prompts


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


# ------------------------------------------------------------------------------------------------ sampling


class Sampling:
    """The pipeline's txt2img path with its pieces exposed: denoise for a batch of prompts, the start, sigmas."""

    def __init__(self, pipe, sampler: str, steps: int, cfg_scale: float):
        from ldm.samplers.config import SamplerConfig, make_sigmas  # noqa: PLC0415

        from .conditioning import PromptEncoder  # noqa: PLC0415
        from .pipeline import _quantize  # noqa: PLC0415

        if pipe.bundle.conditions is not None:
            raise ValueError("ldm analyze: models with further conditions (ldm/conditions/) are not supported yet")
        self.pipe, self.cfg_scale = pipe, cfg_scale
        self.config = SamplerConfig(name=sampler, steps=steps, cfg_scale=cfg_scale)
        self.denoiser = pipe.bundle.denoiser(quantize=_quantize(self.config))
        self.sigmas = make_sigmas(self.denoiser.schedule, self.config)  # (steps + 1,) float64
        self.encoder = PromptEncoder(pipe.bundle)
        self.side = pipe.default_size[0]
        f, c = pipe.factor, pipe.bundle.config.vae.latent_channels
        self.latent_shape = (c, self.side // f, self.side // f)

    def denoise(self, prompts: list[str]):
        from ldm.guidance import cfg  # noqa: PLC0415

        guided = self.cfg_scale > 1
        cond, uncond = self.encoder.conds(prompts, [""] * len(prompts), height=self.side, width=self.side,
                                          guided=guided)  # fmt: skip
        if guided:
            return cfg(self.denoiser, cond, uncond, self.cfg_scale)
        return lambda x, sigma: self.denoiser(x, sigma, cond)

    def start(self, seeds: list[int], sigmas=None):
        """The txt2img start noise * sqrt(1 + sigma_0^2) of ``sigmas`` (default: this run's), as the pipeline does."""
        from ldm.generate import generators  # noqa: PLC0415
        from ldm.samplers import randn_per_sample  # noqa: PLC0415

        noise = randn_per_sample(generators(seeds), self.latent_shape, self.pipe.device, self.pipe.dtype)
        sigma_0 = float((self.sigmas if sigmas is None else sigmas)[0])
        return noise * (1 + sigma_0**2) ** 0.5

    def decode(self, z):
        """(B, C, h, w) latents -> (B, 3, H, W) float32 images in [-1, 1] on the CPU."""
        import torch  # noqa: PLC0415

        vae = self.pipe.bundle.vae
        with torch.no_grad():
            out = [vae.decode(z[i : i + 64].to(self.pipe.device, next(vae.parameters()).dtype)).float().cpu()
                   for i in range(0, z.shape[0], 64)]  # fmt: skip
        return torch.cat(out).clamp(-1, 1)


def data_latents(pipe, side: int, data: str, n: int, seed: int = 0):
    """(n, C, h, w) VAE posterior samples of the data images (image i drawn from generator seed + i)."""
    import torch  # noqa: PLC0415
    from itertools import islice  # noqa: PLC0415

    from ldm.generate import generators  # noqa: PLC0415

    from .images import image_to_tensor, resize  # noqa: PLC0415

    if data == "shapes":
        from ldm.shapes import ShapesConfig, iter_shapes  # noqa: PLC0415

        images = (row["image"] for row in islice(iter_shapes(ShapesConfig(image_size=side)), n))
    else:
        from PIL import Image  # noqa: PLC0415

        images = (resize(Image.open(p).convert("RGB"), side, side) for p in _image_files(Path(data))[:n])
    vae = pipe.bundle.vae
    dtype = next(vae.parameters()).dtype
    out, batch, k = [], [], 0
    for im in list(images) + [None]:
        if im is not None:
            batch.append(image_to_tensor(im))
        if batch and (im is None or len(batch) == 256):
            x = torch.cat(batch).to(pipe.device, dtype)
            out.append(vae.encode(x, sample=True, generator=generators(range(seed + k, seed + k + len(batch)))).float().cpu())
            k += len(batch)
            batch = []
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------ running


def run(args: argparse.Namespace) -> int:
    return analyze(resolve(args))


def analyze(args) -> int:
    import torch  # noqa: PLC0415

    from ldm.analysis import fit_gaussian, load_gaussian, record_trajectory, save_gaussian  # noqa: PLC0415
    from ldm.samplers import get_sampler  # noqa: PLC0415

    started = time.perf_counter()
    pipe = eval_cli.load_pipeline(args.model_path, device=args.device, dtype=args.dtype)
    smp = Sampling(pipe, args.sampler, args.steps, args.cfg_scale)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"model": {"path": str(args.model_path), "name": pipe.name, "hash": pipe.model_hash},
              "settings": {k: v for k, v in vars(args).items() if k not in ("func", "model_path", "prompt_list", "out",
                                                                           "teleport_fractions")}}  # fmt: skip
    report["settings"]["out"] = str(args.out)
    timings = report["seconds"] = {}
    sampler = get_sampler(args.sampler)
    with torch.no_grad():
        t0 = time.perf_counter()
        if args.stats is not None:
            gaussian = load_gaussian(args.stats)
        else:
            lat = data_latents(pipe, smp.side, args.data, args.data_n)
            gaussian = fit_gaussian(lat, args.rank)
            save_gaussian(gaussian, args.out / STATS)
        if gaussian.shape != smp.latent_shape:
            raise ValueError(f"--stats: latents of shape {gaussian.shape}, the model samples {smp.latent_shape}")
        timings["gaussian"] = round(time.perf_counter() - t0, 1)
        report["gaussian"] = _gaussian_summary(gaussian)

        t0 = time.perf_counter()
        prompts = args.prompt_list
        seeds = [args.seed + i for i in range(len(prompts))]
        denoise = smp.denoise(prompts)
        traj = record_trajectory(sampler, denoise, smp.start(seeds), smp.sigmas)
        timings["trajectories"] = round(time.perf_counter() - t0, 1)
        report["prompts"] = prompts

        t0 = time.perf_counter()
        report["geometry"] = geometry_section(traj)
        report["bands"], band_curves = bands_section(traj, smp, args.cutoff, args.settle_tol)
        timings["geometry_bands"] = round(time.perf_counter() - t0, 1)

        t0 = time.perf_counter()
        report["perturbation"] = perturbation_section(sampler, denoise, traj, smp, args)
        timings["perturbation"] = round(time.perf_counter() - t0, 1)

        t0 = time.perf_counter()
        report["teleport"] = {"state_error": teleport_state_error(traj, gaussian)}
        if args.teleport_n:
            report["teleport"] |= teleport_curve(smp, sampler, gaussian, args)
        timings["teleport"] = round(time.perf_counter() - t0, 1)
    timings["total"] = round(time.perf_counter() - started, 1)
    path = args.out / REPORT
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    for p in write_plots(report, traj, band_curves, smp, args.out):
        print(f"wrote {p}")
    print(summary_text(report))
    return 0


def _gaussian_summary(g) -> dict:
    total = float(g.eigvals.sum()) + g.noise_var * (g.dim - g.rank)
    cum = (g.eigvals.cumsum(0) / total).tolist()
    return {"dim": g.dim, "rank": g.rank, "noise_var": g.noise_var, "total_variance": total,
            "top_eigvals": [round(v, 5) for v in g.eigvals[:10].tolist()],
            "variance_share_top": {str(r): round(cum[r - 1], 4) for r in (1, 2, 4, 8, 16, 32, 64) if r <= len(cum)}}  # fmt: skip


def _stats(values) -> dict:
    import torch  # noqa: PLC0415

    v = torch.as_tensor(values, dtype=torch.float64)
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max())}  # fmt: skip


def geometry_section(traj) -> dict:
    from ldm.analysis import trajectory_geometry  # noqa: PLC0415

    geo = trajectory_geometry(traj.vp_states())
    return {k: {"per_trajectory": [round(x, 6) for x in v.tolist()], **_stats(v)} for k, v in geo.items()}


def bands_section(traj, smp, cutoff: float, tol: float):
    """Band energies of the x0 predictions (S steps) and the final sample, in latent and decoded-pixel space."""
    import torch  # noqa: PLC0415

    from ldm.analysis import band_energy, settle_step  # noqa: PLC0415

    seqs = {"latent": torch.cat([traj.x0s, traj.xs[-1:]])}  # (S + 1, B, C, h, w)
    flat = seqs["latent"].flatten(0, 1)
    seqs["pixel"] = smp.decode(flat).reshape(*seqs["latent"].shape[:2], 3, smp.side, smp.side)
    out, curves = {"cutoff": cutoff, "settle_tol": tol, "sigmas": traj.sigmas.tolist()}, {}
    for space, seq in seqs.items():
        low, high = band_energy(seq, cutoff)  # (S + 1, B)
        sec = {}
        for band, e in (("low", low), ("high", high)):
            rel = e / e[-1]  # relative to the final sample's energy
            settle = settle_step(e, tol)
            sec[band] = {"relative_energy_mean": [round(x, 5) for x in rel.mean(1).tolist()],
                         "settle_step": {"per_trajectory": settle.tolist(), **_stats(settle.double())}}  # fmt: skip
            curves[(space, band)] = rel
        out[space] = sec
    return out, curves


def perturbation_section(sampler, denoise, traj, smp, args) -> dict:
    import torch  # noqa: PLC0415

    from ldm.analysis import perturbation_sensitivity  # noqa: PLC0415

    steps = len(smp.sigmas) - 1
    ks = sorted({int(round(j * (steps - 1) / max(args.perturb_points - 1, 1))) for j in range(args.perturb_points)})
    d = math.prod(smp.latent_shape)
    g = torch.Generator().manual_seed(args.seed)
    states = traj.xs.to(smp.pipe.device, smp.pipe.dtype)
    res = perturbation_sensitivity(sampler, denoise, states, smp.sigmas, ks, radius=args.radius * d**0.5,
                                   generator=g)  # fmt: skip
    return {"k": res["k"], "sigma": res["sigma"], "radius_per_element": args.radius,
            "relative_change": res["relative_change"], "gain": res["gain"],
            "relative_change_std": res["relative_change_all"].std(1).tolist()}  # fmt: skip


def teleport_state_error(traj, gaussian) -> dict:
    """How far the Gaussian's closed-form state at step k is from where the network's sampler actually is:
    |teleport(x_0, sigma_0, sigma_k) - x_k| / |x_k|, batch mean, for k = 1 .. S - 1."""
    xs, sig = traj.xs.double(), traj.sigmas
    ks = list(range(1, len(sig) - 1))
    err = []
    for k in ks:
        tp = gaussian.teleport(xs[0], float(sig[0]), float(sig[k]))
        err.append(float(((tp - xs[k]).flatten(1).norm(dim=1) / xs[k].flatten(1).norm(dim=1)).mean()))
    return {"k": ks, "sigma": [float(sig[k]) for k in ks], "relative_error": err}


def teleport_curve(smp, sampler, gaussian, args) -> dict:
    """Adherence vs the fraction of steps teleported, and vs the same sampler with only the remaining steps."""
    from ldm.samplers import get_sampler  # noqa: PLC0415
    from ldm.samplers.config import SamplerConfig, make_sigmas  # noqa: PLC0415
    from ldm.samplers.teleport import teleport_steps, with_teleport  # noqa: PLC0415
    from ldm.shapes import adherence, prompt_set  # noqa: PLC0415

    from .images import pixels_to_pil  # noqa: PLC0415

    half = args.teleport_n // 2
    prompts = prompt_set("single", args.teleport_n - half) + prompt_set("relation", half)
    seeds = [args.seed + i for i in range(len(prompts))]
    steps = len(smp.sigmas) - 1

    def score(sample, sigmas) -> dict:
        images = []
        for s in range(0, len(prompts), args.batch_size):
            z = sample(smp.denoise(prompts[s : s + args.batch_size]),
                       smp.start(seeds[s : s + args.batch_size], sigmas), sigmas)  # fmt: skip
            images += pixels_to_pil((smp.decode(z) / 2 + 0.5).permute(0, 2, 3, 1))
        res = adherence(prompts, images)
        return {"ok": res["ok"], "by_kind": {k: v["ok"] for k, v in res["by_kind"].items()}}

    rows = []
    for f in args.fractions:
        k = teleport_steps(f, steps)
        t0 = time.perf_counter()
        tele = score(with_teleport(sampler, f, gaussian), smp.sigmas)
        row = {"fraction": f, "steps_teleported": k, "evaluations_saved": k / steps, "teleport": tele,
               "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        if 0 < k < steps:  # the fair baseline: the same sampler with the same number of steps, no teleportation
            fewer = make_sigmas(smp.denoiser.schedule, SamplerConfig(name=args.sampler, steps=steps - k))
            row["fewer_steps"] = score(get_sampler(args.sampler), fewer)
        rows.append(row)
        print(f"teleport {f:.2f} ({k}/{steps} steps): ok {tele['ok']:.3f}"
              + (f", {steps - k} steps alone: ok {row['fewer_steps']['ok']:.3f}" if "fewer_steps" in row else ""),
              file=sys.stderr, flush=True)  # fmt: skip
    full = rows[0]["teleport"]["ok"]
    within = [r for r in rows if r["teleport"]["ok"] >= 0.95 * full]
    best = 0.0
    for r in rows:  # the largest saving with every smaller one also within 5%
        if r["teleport"]["ok"] < 0.95 * full:
            break
        best = r["evaluations_saved"]
    return {"prompts": len(prompts), "curve": rows, "full_ok": full,
            "saved_within_5pct": best, "saved_within_5pct_any": max(r["evaluations_saved"] for r in within)}  # fmt: skip


def summary_text(report: dict) -> str:
    g, b, p, t = report["geometry"], report["bands"], report["perturbation"], report["teleport"]
    lines = [
        f"geometry: top-2 variance share {g['top2_fraction']['mean']:.4f} (min {g['top2_fraction']['min']:.4f}); "
        f"angle swept {g['angle_deg']['mean']:.1f} deg, endpoint angle {g['endpoint_angle_deg']['mean']:.1f} deg",
        *(f"bands ({s}): settle step low {b[s]['low']['settle_step']['mean']:.1f}, high "
          f"{b[s]['high']['settle_step']['mean']:.1f} of {len(b['sigmas']) - 1}" for s in ("pixel", "latent")),
        "perturbation: relative change " + ", ".join(f"k={k}: {v:.3f}" for k, v in zip(p["k"], p["relative_change"])),
    ]
    if "curve" in t:
        lines.append(f"teleport: full sampler ok {t['full_ok']:.3f}; evaluations saved within 5%: "
                     f"{t['saved_within_5pct']:.2f}")  # fmt: skip
    return "\n".join(lines)
