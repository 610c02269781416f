"""How well a text-to-image model follows its prompts, as numbers: one image per prompt, scored by a checker.

    from inference.pipeline import Pipeline
    from ldm.shapes import prompt_set

    pipe = Pipeline.load("model")
    result = evaluate_adherence(pipe, prompt_set("relation", 200), steps=25, seed=0)
    result["ok"], result["by_kind"]["relation"]["relation_ok"], result["scores"][0], result["images"][0]

``evaluate_adherence`` generates image ``i`` from ``prompts[i]`` with seed ``seed + i`` (or ``seed[i]`` for a list),
``batch_size`` images per network call. The pipeline gives every image its own generator (inference/pipeline.py),
so image ``i`` depends on its prompt and seed only, never on the batch size or on the other prompts. The images are
then scored by ldm.shapes.adherence (the checker's rules: ldm/shapes/checker.py).

A *suite* is a named way to evaluate: which prompt sets it has, how a prompt file is checked, how images are
scored and which summary fields make the table. ``SUITES`` holds them by name; ``ldm eval --suite NAME`` picks one
(inference/eval_cli.py). Adding a suite (a classifier-based one, say) is one ``Suite`` entry here; the command
line, the JSON report and the grids work for it unchanged, given that its ``evaluate`` returns the same layout:
overall fractions, ``by_kind`` fractions, per-prompt ``scores`` (each with ``prompt``, ``seed``, ``kind``, ``ok``)
and the ``images``.

Nothing heavy is imported at import time (the command line imports this module to list the suites).
"""
from __future__ import annotations

import math
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable, Sequence

from ldm.checks import check_int

from . import cifar_eval  # the cifar10 suite (imports nothing heavy at import time)

GRID_TILE = 128  # px: each image of a labelled grid is scaled (nearest neighbour) to this side


# ------------------------------------------------------------------------------------------------ generating


def generate_images(pipe, prompts: Sequence[str], *, seeds: Sequence[int], sampler: str = "dpmpp_2m",
                    steps: int = 25, cfg_scale: float = 7.5, batch_size: int = 16, resolution: int | None = None,
                    progress: bool = False, teleport: float = 0.0, teleport_stats=None) -> list:  # fmt: skip
    """One square PIL image per prompt, image i from ``seeds[i]``, ``batch_size`` per pipeline call.
    ``resolution``: the side in pixels (default: the model's default size). ``teleport`` / ``teleport_stats``: the
    pipeline's analytical teleportation (that fraction of the steps replaced by the closed-form Gaussian solution)."""
    from tqdm import tqdm  # noqa: PLC0415

    prompts, seeds = list(prompts), list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds: one per prompt ({len(prompts)}), got {len(seeds)}")
    check_int("batch_size", batch_size, 1)
    side = pipe.default_size[0] if resolution is None else resolution
    kwargs = dict(sampler=sampler, steps=steps, cfg_scale=cfg_scale, width=side, height=side, n=1)
    if teleport:
        kwargs.update(teleport=teleport, teleport_stats=teleport_stats)
    starts = range(0, len(prompts), batch_size)
    bar = tqdm(total=len(starts) * steps, unit="step", desc="generating", disable=not progress, file=sys.stderr)
    images = []
    try:
        for b, start in enumerate(starts):
            end = min(start + batch_size, len(prompts))
            bar.set_postfix_str(f"images {start + 1}-{end} of {len(prompts)}")
            done = b * steps

            def step_done(step, done=done) -> None:  # robust to samplers that call it more than once per step
                bar.update(max(0, done + step.i + 1 - bar.n))

            result = pipe(prompts[start:end], seed=seeds[start:end], callback=step_done, **kwargs)
            images += list(result.images)
            bar.update(done + steps - bar.n)
    finally:
        bar.close()
    return images


def evaluate_adherence(pipe, prompts: Sequence[str], *, sampler: str = "dpmpp_2m", steps: int = 25,
                       cfg_scale: float = 7.5, seed: int | Sequence[int] = 0, batch_size: int = 16,
                       resolution: int | None = None, progress: bool = False, teleport: float = 0.0,
                       teleport_stats=None) -> dict:  # fmt: skip
    """Generate one image per prompt of the shapes grammar and score it with ldm.shapes.adherence.

    ``seed``: image i gets ``seed + i``, or ``seed[i]`` for a list. Returns the checker's summary (the fraction of
    images passing each check over all prompts, and ``by_kind``: "single" / "relation"), ``scores`` (one dict per
    prompt: ``prompt``, ``seed``, ``kind`` and the checks of ldm.shapes.score), ``seeds`` and ``images``.
    """
    from ldm.shapes import adherence  # noqa: PLC0415

    prompts = _prompt_list(prompts)
    seeds = _seed_list(seed, len(prompts))
    images = generate_images(pipe, prompts, seeds=seeds, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                             batch_size=batch_size, resolution=resolution, progress=progress, teleport=teleport,
                             teleport_stats=teleport_stats)  # fmt: skip
    if progress:
        print(f"scoring {len(images)} images", file=sys.stderr, flush=True)
    summary = adherence(prompts, images)
    summary["scores"] = [
        {"prompt": p, "seed": s, "kind": "single" if row["relation_ok"] is None else "relation", **row}
        for p, s, row in zip(prompts, seeds, summary["scores"])  # the checker's own split of by_kind
    ]  # fmt: skip
    return {**summary, "seeds": seeds, "images": images}


def _prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts: give a non-empty sequence of strings")
    return prompts


def _seed_list(seed, n: int) -> list[int]:
    if isinstance(seed, int) and not isinstance(seed, bool):
        if seed < 0:
            raise ValueError(f"seed: must be >= 0, got {seed}")
        return [seed + i for i in range(n)]
    seeds = list(seed)
    if len(seeds) != n or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"seed: an int, or one int >= 0 per prompt ({n}), got {seed!r}")
    return seeds


# ------------------------------------------------------------------------------------------------ suites


@dataclass(frozen=True)
class Suite:
    """A named evaluation: prompt sets, a check for prompts from a file, the scorer and the table's columns."""

    name: str
    description: str
    kinds: tuple[str, ...]  # the named prompt sets (``--prompts KIND``)
    columns: tuple[tuple[str, str], ...]  # (summary key, table header), in table order
    prompts: Callable[[str, int, int], list[str]]  # (kind, n, prompt_seed) -> n prompts
    check_prompt: Callable[[str], None]  # ValueError when a prompt (from a file) cannot be scored
    evaluate: Callable[..., dict]  # (pipe, prompts, **sampling) -> summary, by_kind, scores, seeds, images
    options: tuple[str, ...] = ()  # extra keyword arguments of ``evaluate`` the command line passes (its flags)
    footer: Callable[[dict], list[str]] | None = None  # lines printed under the table (numbers that are no fraction)


def _shapes_prompts(kind: str, n: int, prompt_seed: int) -> list[str]:
    from ldm.shapes import prompt_set  # noqa: PLC0415

    return prompt_set(kind, n, prompt_seed)


def _shapes_check(prompt: str) -> None:
    from ldm.shapes import parse_caption  # noqa: PLC0415

    parse_caption(prompt)  # ValueError naming the first word outside the grammar


SUITES: dict[str, Suite] = {
    "shapes": Suite(
        name="shapes",
        description="held-out prompts of the procedural shapes grammar (ldm/shapes), read back by its checker",
        kinds=("single", "relation"),
        columns=(("colour_shape_ok", "colour+shape"), ("size_ok", "size"), ("position_ok", "position"),
                 ("relation_ok", "relation"), ("ok", "all")),  # fmt: skip
        prompts=_shapes_prompts,
        check_prompt=_shapes_check,
        evaluate=evaluate_adherence,
    ),
    "cifar10": Suite(
        name="cifar10",
        description="class prompts of CIFAR-10 (\"a photo of a cat\"), scored by the project's CIFAR-10 classifier "
        "(--classifier): prompted-class accuracy and FD-cls against the test split (--data)",
        kinds=(cifar_eval.KIND,),
        columns=(("ok", "class acc"),),
        prompts=cifar_eval.class_prompts,
        check_prompt=cifar_eval.check_class_prompt,
        evaluate=cifar_eval.evaluate_cifar10,
        options=("classifier", "data", "baselines", "vae_psnr"),
        footer=cifar_eval.footer,
    ),
}


# ------------------------------------------------------------------------------------------------ grids


def failed_checks(row: dict, columns: Sequence[tuple[str, str]]) -> list[str]:
    """The headers of the checks a scored prompt failed (None = not stated = not failed); ``all`` left out."""
    return [header for key, header in columns if key != "ok" and row.get(key) is False]


def labelled_grid(images: Sequence, labels: Sequence[str], ok: Sequence[bool], cols: int = 4, tile: int = GRID_TILE):
    """A contact sheet: each image scaled to ``tile`` px (nearest neighbour, pixels stay visible) in a green
    (``ok``) or red frame of 2 px, its ``label`` (newlines kept) word-wrapped below it. Layout: inference/grid.py's
    image_grid."""
    from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415

    from .grid import image_grid  # noqa: PLC0415

    if not (len(images) == len(labels) == len(ok)) or not images:
        raise ValueError(f"labelled_grid: images, labels and ok must be non-empty and equally long, got "
                         f"{len(images)}, {len(labels)}, {len(ok)}")  # fmt: skip
    font = ImageFont.load_default()
    line_h = math.ceil(font.getbbox("Ag")[3]) + 2
    chars = max(8, int(tile / max(font.getlength("abcdefghij") / 10, 1)) - 1)  # characters per line
    wrapped = [[line for part in label.split("\n") for line in textwrap.wrap(part, chars) or [""]] for label in labels]
    strip = 4 + line_h * max(len(lines) for lines in wrapped)
    cells = []
    for image, lines, good in zip(images, wrapped, ok):
        cell = Image.new("RGB", (tile + 4, tile + 4 + strip), "white")
        cell.paste((40, 160, 60) if good else (200, 40, 40), (0, 0, tile + 4, tile + 4))  # the frame
        cell.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (2, 2))
        draw = ImageDraw.Draw(cell)
        for k, line in enumerate(lines):
            draw.text((2, tile + 6 + k * line_h), line, fill="black", font=font)
        cells.append(cell)
    return image_grid(cells, cols)
