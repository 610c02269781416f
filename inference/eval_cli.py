"""``ldm eval``: how well a model follows its prompts, as numbers (a table, a JSON report and labelled grids).

    ldm eval                                          # the embedded default model, 200 single + 200 relation prompts
    ldm eval --model runs/shapes/final --prompts relation --n 500 --steps 30 --cfg-scale 5
    ldm eval --model m --prompts my_prompts.txt --out eval/m

The default suite, ``shapes``, draws held-out prompts of the procedural shapes grammar (ldm/shapes:
"a small blue square on the left", "a green triangle above a yellow circle"), generates one image per prompt and
reads each image back with the shapes checker (ldm/shapes/checker.py), which decides colour, shape, size,
position and relation. The prompts of each set get seeds ``--seed + i`` (i = the prompt's index in its set or
file), so a run reproduces, and ``--prompts both`` measures exactly the images of ``single`` and ``relation``.
Suites are registered in inference/evaluate.py (``SUITES``); see docs/eval.md for the report's layout.

The ``cifar10`` suite (inference/cifar_eval.py) prompts "a photo of a {class}" ``--n`` times per class and scores the
images with the project's CIFAR-10 classifier (``--classifier``, from ``python -m training.classifier``): prompted-
class accuracy and FD-cls against the test split of ``--data``; ``--baselines`` and ``--vae-psnr`` add reference
numbers:

    ldm eval --suite cifar10 --model runs/cifar/final --classifier runs/cifar10-classifier --n 200 --baselines

Every argument is checked before the model is loaded; a bad one is one line ``ldm eval: error: ...`` (exit code 2).
Nothing heavy is imported at import time, so ``ldm --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .convert import DTYPES
from .evaluate import SUITES, failed_checks
from .generate_cli import check_device, one_line_error

ALL_KINDS = "both"  # --prompts value meaning every prompt set of the suite
DEFAULT_N = 200
DEFAULT_DATA = "../shared/data/cifar10"  # or $LDM_DATA/cifar10
GRID_IMAGES = 16  # the first images of each kind shown in grid-<kind>.png
REPORT = "adherence.json"


# ------------------------------------------------------------------------------------------------ arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="measure prompt adherence: generate, check each image, report the fractions",
        description="Generate one image per evaluation prompt and score how well each follows its prompt; "
        "print a table per kind of prompt, write DIR/adherence.json and a labelled grid per kind.",
        epilog="Suites: " + "; ".join(f"{s.name}: {s.description}" for s in SUITES.values())
        + ". Details: docs/eval.md.",
    )  # fmt: skip
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.error = one_line_error(p)  # argparse's errors too: one line, exit 2
    kinds = "; ".join(f"{name}: {', '.join(s.kinds)}" for name, s in SUITES.items())
    p.add_argument("--suite", default="shapes", choices=sorted(SUITES), help="what is measured "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--model", metavar="PATH", help="original .safetensors/.ckpt file, diffusers folder or ldm folder "
                   "(default: the embedded default model, inference.default_model)")  # fmt: skip
    p.add_argument("--prompts", default=ALL_KINDS, metavar="SET|FILE", help=f"a prompt set of the suite ({kinds}), "
                   f"'{ALL_KINDS}' for every set, or a UTF-8 text file with one prompt a line "
                   "(blank lines and lines starting with # are skipped) (default: %(default)s)")  # fmt: skip
    p.add_argument("--n", type=int, metavar="N", help=f"prompts per set (default: {DEFAULT_N}); --suite cifar10: "
                   "images per class (10 N in all); with a FILE: only its first N prompts (default: all)")  # fmt: skip
    p.add_argument("--prompt-seed", type=int, default=0, metavar="S", help="which prompts a set draws; the sets "
                   "for a larger --n start with those of a smaller one (default: %(default)s)")  # fmt: skip
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default: %(default)s)")
    p.add_argument("--sampler", default="dpmpp_2m", metavar="NAME", help="sampler, see `ldm samplers` "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--cfg-scale", type=float, default=7.5, metavar="S", help="classifier-free guidance scale "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the first image of each set; image i gets "
                   "seed + i (default: %(default)s)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="images per network call: memory vs "
                   "speed; the images do not depend on it (on GPUs up to float rounding) "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--resolution", type=int, metavar="PX", help="side of the square images, a multiple of the "
                   "VAE's downsampling factor (default: the model's default size)")  # fmt: skip
    p.add_argument("--out", default="outputs/eval", metavar="DIR", help=f"folder for {REPORT} and "
                   "grid-<kind>.png; files of an earlier run there are replaced (default: %(default)s/)")  # fmt: skip
    p.add_argument("--teleport", type=float, default=0.0, metavar="F", help="analytical teleportation: replace "
                   "this fraction of the steps by the closed-form solution of the data's Gaussian (docs/analysis.md); "
                   "needs --teleport-stats (default: %(default)s, off)")  # fmt: skip
    p.add_argument("--teleport-stats", metavar="FILE", help="the Gaussian statistics `ldm analyze` writes "
                   "(gaussian.safetensors) for --teleport")  # fmt: skip
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="network dtype (default: %(default)s)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar (default: a bar on stderr)")
    g = p.add_argument_group("cifar10 suite", "options of --suite cifar10 only (--n: images per class)")
    g.add_argument("--classifier", metavar="PATH", help="the CIFAR-10 classifier: a folder written by "
                   "`python -m training.classifier` or its classifier.safetensors (required by --suite cifar10)")
    g.add_argument("--data", metavar="DIR", help="the CIFAR-10 folder with test.parquet (and train.parquet for "
                   f"--baselines) (default: $LDM_DATA/cifar10 if LDM_DATA is set, else {DEFAULT_DATA})")
    g.add_argument("--baselines", action="store_true", help="also score, the same way, as many real training "
                   "images as samples (same classes) and the same prompts and seeds sampled at cfg scale 1")
    g.add_argument("--vae-psnr", action="store_true", help="also measure the model VAE's reconstruction PSNR "
                   "(posterior mean) on the test split")


# ------------------------------------------------------------------------------------------------ the request


@dataclass
class Settings:
    """A checked run: the prompt sets, the model and the sampling settings."""

    suite: str
    model: Path
    prompts_from: str  # the --prompts value
    prompt_sets: dict[str, list[str]]  # set name ("single", "relation", or the file's name) -> prompts
    prompt_seed: int
    sampler: str
    steps: int
    cfg_scale: float
    seed: int
    batch_size: int
    resolution: int | None
    out: Path
    device: str
    dtype: str
    quiet: bool
    options: dict | None = None  # the suite's own options (Suite.options): name -> value
    teleport: float = 0.0  # fraction of the steps teleported (0: off)
    teleport_stats: Path | None = None


def resolve(args: argparse.Namespace) -> Settings:
    """The checked Settings for parsed ``args``; ValueError (one line, naming the argument) for any bad one.
    Reads prompt files and at most the model's config file, never its weights."""
    suite = SUITES[args.suite]
    for flag, value, low in (("--n", args.n, 1), ("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                             ("--seed", args.seed, 0), ("--prompt-seed", args.prompt_seed, 0),
                             ("--resolution", args.resolution, 8)):  # fmt: skip
        if value is not None and value < low:
            raise ValueError(f"{flag}: must be >= {low}, got {value}")
    if not args.cfg_scale >= 0:
        raise ValueError(f"--cfg-scale: must be >= 0, got {args.cfg_scale}")
    _check_sampler(args.sampler)
    prompt_sets = _prompt_sets(suite, args.prompts, args.n, args.prompt_seed)
    model = _check_model(args.model)
    if args.resolution is not None:
        factor = _vae_factor(model)  # None: known only once loaded (Pipeline.check says so then)
        if factor is not None and args.resolution % factor:
            raise ValueError(f"--resolution: must be a multiple of {factor} (the VAE's downsampling factor of "
                             f"{model}), got {args.resolution}")  # fmt: skip
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    options = _suite_options(suite, args)
    teleport, stats = _check_teleport(args)
    return Settings(
        suite=suite.name, model=model, prompts_from=args.prompts, prompt_sets=prompt_sets,
        prompt_seed=args.prompt_seed, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
        seed=args.seed, batch_size=args.batch_size, resolution=args.resolution, out=out,
        device=_device(args.device), dtype=args.dtype, quiet=args.quiet, options=options, teleport=teleport,
        teleport_stats=stats,
    )  # fmt: skip


def _check_teleport(args: argparse.Namespace) -> tuple[float, Path | None]:
    import math  # noqa: PLC0415

    fraction, stats = args.teleport, args.teleport_stats
    if not (math.isfinite(fraction) and 0 <= fraction < 1):
        raise ValueError(f"--teleport: a fraction of the steps in [0, 1), got {fraction}")
    if fraction > 0 and stats is None:
        raise ValueError("--teleport-stats: required by --teleport (ldm analyze writes gaussian.safetensors)")
    if stats is not None and not Path(stats).is_file():
        raise ValueError(f"--teleport-stats {stats}: no such file")
    return fraction, Path(stats) if stats is not None else None


SUITE_FLAGS = {"classifier": "--classifier", "data": "--data", "baselines": "--baselines", "vae_psnr": "--vae-psnr"}


def _suite_options(suite, args: argparse.Namespace) -> dict | None:
    """The checked options of suites that take them (cifar10); ValueError naming a flag given to another suite."""
    given = [flag for name, flag in SUITE_FLAGS.items() if getattr(args, name, None) not in (None, False)]
    if not suite.options:
        if given:
            raise ValueError(f"{given[0]}: only for --suite cifar10 (this is --suite {suite.name})")
        return None
    import os  # noqa: PLC0415

    from ldm.checkpoint import read_metadata  # noqa: PLC0415 - torch: only for this suite
    from ldm.metrics.cifar_net import classifier_weights  # noqa: PLC0415

    from .cifar_eval import check_data  # noqa: PLC0415

    if args.classifier is None:
        raise ValueError(f"--classifier: required by --suite {suite.name} (train one: python -m training.classifier "
                         "--data ../shared/data/cifar10 --out runs/cifar10-classifier)")  # fmt: skip
    try:
        classifier = classifier_weights(args.classifier)
        if "config" not in read_metadata(classifier):
            raise ValueError(f"{classifier}: no classifier config in its metadata (not written by "
                             "training.classifier)")  # fmt: skip
    except ValueError as e:
        raise ValueError(f"--classifier {e}") from None
    data = Path(args.data if args.data else Path(os.environ["LDM_DATA"]) / "cifar10" if os.environ.get("LDM_DATA")
                else DEFAULT_DATA)  # fmt: skip
    check_data(data, args.baselines)
    return {"classifier": classifier, "data": data, "baselines": args.baselines, "vae_psnr": args.vae_psnr}


def _check_sampler(name: str) -> None:
    from ldm.samplers import SAMPLERS  # noqa: PLC0415

    if name not in SAMPLERS:
        raise ValueError(f"--sampler: unknown sampler {name!r}; one of: {', '.join(sorted(SAMPLERS))}")


def _prompt_sets(suite, spec: str, n: int | None, prompt_seed: int) -> dict[str, list[str]]:
    """{set name: prompts} for a --prompts value: one named set, all of them, or a file (checked line by line)."""
    if spec == ALL_KINDS or spec in suite.kinds:
        kinds = suite.kinds if spec == ALL_KINDS else (spec,)
        return {kind: suite.prompts(kind, n or DEFAULT_N, prompt_seed) for kind in kinds}
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--prompts {spec}: neither a prompt set of the {suite.name} suite "
                         f"({', '.join(suite.kinds)}, {ALL_KINDS}) nor an existing file")  # fmt: skip
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    numbered = [(k + 1, line.strip()) for k, line in enumerate(lines) if line.strip() and not line.startswith("#")]
    if not numbered:
        raise ValueError(f"--prompts {path}: no prompts (only blank or # lines)")
    numbered = numbered[:n] if n is not None else numbered
    for line_no, prompt in numbered:
        try:
            suite.check_prompt(prompt)
        except ValueError as e:
            raise ValueError(f"--prompts {path} line {line_no}: {e}") from None
    return {path.name: [prompt for _, prompt in numbered]}


def _check_model(given: str | None) -> Path:
    from ldm.formats import detect_format  # noqa: PLC0415 - reads no weights, only names of files

    path = _default_model() if given is None else Path(given)
    if given is not None and not path.exists():
        raise ValueError(f"--model {path}: no such file or folder")
    try:
        detect_format(path)
    except ValueError as e:
        raise ValueError(f"--model {e}") from None
    return path


def _default_model() -> Path:
    """``inference.default_model.default_model_path()``, checked (that module names the embedded default model)."""
    import importlib  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415

    module = "inference.default_model"
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"no --model given and no embedded default model found at {module} (the module that "
                         "names it is missing); pass --model PATH")  # fmt: skip
    path = Path(importlib.import_module(module).default_model_path())
    if not path.exists():
        raise ValueError(f"no --model given and no embedded default model found at {path}; pass --model PATH")
    return path


def _vae_factor(model: Path) -> int | None:
    """The VAE's downsampling factor from the model's config file (ldm or diffusers folder); None for a single
    file, whose config is known only from its weights."""
    from ldm.formats import detect_format  # noqa: PLC0415

    fmt = detect_format(model)
    try:
        if fmt == "ldm":
            from ldm.model_config import load_model_config  # noqa: PLC0415

            return load_model_config(model / "config.yaml").vae.downsample_factor
        if fmt == "diffusers":
            levels = json.loads((model / "vae" / "config.json").read_text())["block_out_channels"]
            return 2 ** (len(levels) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a broken config: loading the model reports it
    return None


def _device(device: str | None) -> str:
    """--device checked (generate_cli.check_device); default: cuda if available, else cpu."""
    import torch  # noqa: PLC0415

    return check_device(device) or ("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------ running


def load_pipeline(path: Path, **kwargs):
    """``Pipeline.load`` (a seam for tests)."""
    from .pipeline import Pipeline  # noqa: PLC0415

    return Pipeline.load(path, **kwargs)


def run(args: argparse.Namespace) -> int:
    return evaluate(resolve(args))


def evaluate(req: Settings) -> int:
    """Load the model, evaluate every prompt set, print the table, write the report and the grids."""
    suite = SUITES[req.suite]
    pipe = load_pipeline(req.model, device=req.device, dtype=req.dtype)
    resolution = req.resolution or pipe.default_size[0]
    sampling = dict(sampler=req.sampler, steps=req.steps, cfg_scale=req.cfg_scale, batch_size=req.batch_size,
                    resolution=resolution, teleport=req.teleport, teleport_stats=req.teleport_stats)  # fmt: skip
    first = next(iter(req.prompt_sets.values()))[:1]
    try:  # before any step; catches what only the loaded model knows (the VAE factor of a single file)
        pipe.check(prompt=first, seed=req.seed, steps=req.steps, sampler=req.sampler, cfg_scale=req.cfg_scale,
                   width=resolution, height=resolution)  # fmt: skip
    except ValueError as e:
        message = str(e)  # the pipeline names its own argument; width = height = --resolution here
        raise ValueError("--resolution" + message[5:] if message.startswith("width:") else message) from None
    prompts, seeds = [], []
    for names in req.prompt_sets.values():  # each set's seeds start at --seed
        prompts += names
        seeds += [req.seed + i for i in range(len(names))]
    started = time.perf_counter()
    result = suite.evaluate(pipe, prompts, seed=seeds, progress=not req.quiet, **sampling, **(req.options or {}))
    elapsed = time.perf_counter() - started

    print(f"ldm eval: {req.suite} suite, {len(prompts)} images of {resolution} px from {pipe.name or req.model} "
          f"({req.sampler}, {req.steps} steps, cfg {req.cfg_scale}, seed {req.seed}"
          + (f", teleport {req.teleport}" if req.teleport else "") + f"), {elapsed:.0f} s")  # fmt: skip
    print(table(result, suite.columns))
    for line in suite.footer(result) if suite.footer else ():
        print(line)
    req.out.mkdir(parents=True, exist_ok=True)
    report = req.out / REPORT
    report.write_text(json.dumps(_report(req, pipe, resolution, result, elapsed), indent=1) + "\n")
    print(f"wrote {report}")
    for kind, path in write_grids(result, suite.columns, req.out).items():
        print(f"wrote {path} (the first {kind} images)")
    return 0


def _report(req: Settings, pipe, resolution: int, result: dict, elapsed: float) -> dict:
    summary = {k: v for k, v in result.items() if k not in ("scores", "seeds", "images")}
    return {
        "suite": req.suite,
        "model": {"path": str(req.model), "name": pipe.name, "hash": pipe.model_hash},
        "settings": {"prompts": req.prompts_from, "n": {k: len(v) for k, v in req.prompt_sets.items()},
                     "prompt_seed": req.prompt_seed, "sampler": req.sampler, "steps": req.steps,
                     "cfg_scale": req.cfg_scale, "seed": req.seed, "batch_size": req.batch_size,
                     "resolution": resolution, "device": req.device, "dtype": req.dtype, "teleport": req.teleport,
                     "teleport_stats": None if req.teleport_stats is None else str(req.teleport_stats),
                     **{k: str(v) if isinstance(v, Path) else v for k, v in (req.options or {}).items()}},  # fmt: skip
        "seconds": round(elapsed, 3),
        "summary": summary,
        "scores": result["scores"],
    }


def table(result: dict, columns) -> str:
    """One row per kind (and ``all`` when there are several): n, then each column's fraction as a percentage
    ("-" where no prompt of that kind states the check)."""
    rows = [(kind, s) for kind, s in result["by_kind"].items()]
    if len(rows) > 1:
        rows.append(("all", result))
    headers = ["kind", "n"] + [header for _, header in columns]
    cells = [[kind, str(s["n"])] + ["-" if s[key] is None else f"{100 * s[key]:.1f}%" for key, _ in columns]
             for kind, s in rows]  # fmt: skip
    widths = [max(len(r[c]) for r in [headers] + cells) for c in range(len(headers))]
    return "\n".join("  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))
                     for r in [headers] + cells)  # fmt: skip


def write_grids(result: dict, columns, out: Path) -> dict[str, Path]:
    """DIR/grid-<kind>.png for each kind: its first GRID_IMAGES images, labelled with prompt and failed checks."""
    from .evaluate import labelled_grid  # noqa: PLC0415

    written = {}
    for kind in result["by_kind"]:
        picked = [(im, row) for im, row in zip(result["images"], result["scores"]) if row["kind"] == kind]
        picked = picked[:GRID_IMAGES]
        labels = [row["prompt"] + "\n" + ("ok" if row["ok"] else "wrong: " + ", ".join(failed_checks(row, columns)))
                  + (f"\nclassified: {row['predicted']}" if "predicted" in row else "")
                  for _, row in picked]  # fmt: skip
        grid = labelled_grid([im for im, _ in picked], labels, [bool(row["ok"]) for _, row in picked])
        written[kind] = out / f"grid-{kind}.png"
        grid.save(written[kind])
    return written
