"""Does a control map place the object? IoU of each generated image's objects with the map it was given.

    python bench/control_obedience.py --model runs/shapes-controlnet/model-ema --n 200 --out results.json

For each held-out scene (ldm.shapes.control_eval_set: test split, the scene's caption as the prompt, its mask /
edge map) one image is generated three ways from the same seed: with the control, with the control switched off
(the base model's behaviour: what the prompt alone gives), and the chance reference without any model
(ldm.shapes.chance_scores: the same descriptions laid out again at random). Scored by ldm.shapes.placement
(object_mask + IoU); the acceptance asks IoU > 0.5 in >= 90% of samples with the control.
Writes the JSON summary and a grid (map | with control | without) of the first 16 scenes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def run(model: str, n: int, kind: str, steps: int, cfg_scale: float, device: str, batch: int, seed: int,
        condition: str, map_name: str, out: Path | None) -> dict:  # fmt: skip
    from inference.pipeline import Pipeline
    from ldm.shapes import ShapesConfig, chance_scores, control_eval_set, placement_scores

    pipe = Pipeline.load(model, device=device)
    side = pipe.default_size[0]
    cfg = ShapesConfig(image_size=side, p_position=0.0)  # prompts without a position: the map alone places
    examples = control_eval_set(n, seed=seed, cfg=cfg, kind=kind)
    prompts = [e.prompt for e in examples]
    maps = [(e.mask if map_name == "mask" else e.edges).convert("RGB") for e in examples]
    targets = [e.mask for e in examples]
    t0 = time.perf_counter()
    with_c, without = [], []
    for i in range(0, n, batch):
        sl = slice(i, min(n, i + batch))
        kw = dict(steps=steps, cfg_scale=cfg_scale, sampler="dpmpp_2m", seed=[seed + k for k in range(sl.start, sl.stop)],
                  width=side, height=side)  # fmt: skip
        with_c += pipe(prompts[sl], conditions={condition: maps[sl]}, **kw).images
        without += pipe(prompts[sl], **kw).images
    secs = time.perf_counter() - t0
    iou_c = placement_scores(with_c, targets)
    iou_0 = placement_scores(without, targets)
    iou_r = chance_scores(n, seed=seed, cfg=cfg, kind=kind)
    frac = lambda xs: float(np.mean([x > 0.5 for x in xs]))  # noqa: E731
    summary = {
        "model": model, "n": n, "kind": kind, "steps": steps, "cfg_scale": cfg_scale, "map": map_name,
        "with_control": {"iou_gt_0.5": frac(iou_c), "mean_iou": float(np.mean(iou_c))},
        "control_off": {"iou_gt_0.5": frac(iou_0), "mean_iou": float(np.mean(iou_0))},
        "chance_layouts": {"iou_gt_0.5": frac(iou_r), "mean_iou": float(np.mean(iou_r))},
        "seconds": secs, "device": str(pipe.device),
    }  # fmt: skip
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "control_obedience.json").write_text(json.dumps(summary, indent=1))
        k = min(16, n)
        tiles = [[maps[i], with_c[i], without[i]] for i in range(k)]
        grid = Image.new("RGB", (3 * side, k * side), "white")
        for r, row in enumerate(tiles):
            for c, im in enumerate(row):
                grid.paste(im.convert("RGB"), (c * side, r * side))
        grid.resize((3 * side * 4, k * side * 4), Image.NEAREST).save(out / "control_obedience.png")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--kind", default="single", choices=("single", "relation"))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--condition", default="mask", help="the model's control condition name")
    ap.add_argument("--map", default="mask", choices=("mask", "edges"))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    s = run(a.model, a.n, a.kind, a.steps, a.cfg_scale, a.device, a.batch, a.seed, a.condition, a.map, a.out)
    print(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
