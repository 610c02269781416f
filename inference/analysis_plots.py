"""The PNG plots of `ldm analyze` (inference/analyze_cli.py): line charts drawn with Pillow by
bench/plot_curves.py (imported from the repository checkout; without it, no charts but the image grids), the
decoded x0 grid, and the teleportation curve.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["chart", "write_plots"]



def _plot_module():
    """bench/plot_curves.py of the repository checkout (a sibling of this package), or None."""
    try:
        import bench.plot_curves as mod  # noqa: PLC0415

        return mod
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "bench" / "plot_curves.py"
        if not path.is_file():
            return None
        spec = importlib.util.spec_from_file_location("_ldm_plot_curves", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


def chart(panels: list[dict], out: Path, title: str = "", width: int = 720, height: int | None = None) -> Path | None:
    """panels: [{"title", "series": [{"x", "y", "label"}], "xlabel", "log_y"?}] stacked vertically, each with its
    own x range, drawn by bench/plot_curves.py's Panel / draw_panel."""
    pc = _plot_module()
    if pc is None:
        print("ldm analyze: bench/plot_curves.py not found (no repository checkout): plots skipped", file=sys.stderr)
        return None
    from PIL import Image, ImageDraw  # noqa: PLC0415

    ss, n = pc.SS, len(panels)
    w, h = width * ss, (height or 40 + 230 * n + (24 if title else 0)) * ss
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    fonts = (pc.font(12), pc.font(14))
    top = (34 if title else 12) * ss
    if title:
        draw.text((w / 2, 8 * ss), title, fill="#111111", font=pc.font(16), anchor="mt")
    ph = (h - top - n * (22 + 48) * ss) / n
    for i, panel in enumerate(panels):
        t = top + i * (ph + 70 * ss) + 22 * ss
        series = [dict(s, color=s.get("color") or pc.PALETTE[j % len(pc.PALETTE)]) for j, s in enumerate(panel["series"])]
        xs = [x for s in series for x in s["x"]]
        lo, hi, ticks = pc.linear_ticks(min(xs), max(xs), 8)
        p = pc.Panel((78 * ss, t, w - 18 * ss, t + ph), (lo, hi, ticks), series, panel.get("log_y", False), "",
                     panel.get("title", ""))  # fmt: skip
        pc.draw_panel(draw, p, fonts, panel.get("vlines", []), True, panel.get("xlabel", ""), panel.get("legend", "auto"))
    img = img.resize((w // ss, h // ss), Image.LANCZOS).quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    img.save(out, optimize=True)
    return out


def write_plots(report: dict, traj, band_curves: dict, smp, out: Path) -> list[Path]:
    import torch  # noqa: PLC0415

    from .grid import image_grid  # noqa: PLC0415
    from .images import pixels_to_pil  # noqa: PLC0415

    written = []
    # 1. geometry: each trajectory projected on its own top-2 plane (through the origin), up to 8 of them
    y = traj.vp_states().flatten(2).double().transpose(0, 1)  # (B, T, D)
    series = []
    for b in range(min(8, y.shape[0])):
        _, _, vh = torch.linalg.svd(y[b] - y[b].mean(0), full_matrices=False)
        pr = y[b] @ vh[:2].T  # (T, 2)
        sign = torch.sign(pr[-1])  # orient: the sample on the positive axes
        pr = pr * torch.where(sign == 0, 1.0, sign)
        series.append({"x": pr[:, 0].tolist(), "y": pr[:, 1].tolist(), "label": f"traj {b}"})
    series.append({"x": [0.0], "y": [0.0], "label": "origin", "color": "#000000"})  # the rotation's centre
    geo = report["geometry"]
    written.append(chart([{"title": f"top-2 PCs, VP scale: share {geo['top2_fraction']['mean']:.3f}, "
                           f"angle {geo['angle_deg']['mean']:.0f} deg (means)", "series": series,
                           "xlabel": "PC 1 (start: left, sample: right)", "legend": "none"}],
                         out / "analysis-geometry.png", width=600, height=560))  # fmt: skip
    # 2. bands: mean relative energy per step, latent and pixel
    steps = list(range(traj.steps + 1))
    panels = []
    for space in ("pixel", "latent"):
        sec = report["bands"][space]
        panels.append({"title": f"{space}: energy of the predicted x0 / final (mean); settle step low "
                       f"{sec['low']['settle_step']['mean']:.1f}, high {sec['high']['settle_step']['mean']:.1f}",
                       "series": [{"x": steps, "y": sec[b]["relative_energy_mean"], "label": f"{b} band"}
                                  for b in ("low", "high")], "xlabel": "step", "log_y": True,
                       "vlines": [(sec[b]["settle_step"]["mean"], b) for b in ("low", "high")]})  # fmt: skip
    written.append(chart(panels, out / "analysis-bands.png"))
    # 3. perturbation
    pt = report["perturbation"]
    written.append(chart([
        {"title": "relative change of the final latent", "series": [{"x": pt["k"], "y": pt["relative_change"],
         "label": "relative change"}], "xlabel": "step k of the perturbation"},
        {"title": "gain |change| / |delta|", "series": [{"x": pt["k"], "y": pt["gain"], "label": "gain"}],
         "xlabel": "step k of the perturbation"}], out / "analysis-perturbation.png"))  # fmt: skip
    # 4. teleportation
    tp = report["teleport"]
    panels = [{"title": "closed-form Gaussian state vs the network's trajectory: |x_gauss(k) - x_k| / |x_k|",
               "series": [{"x": tp["state_error"]["k"], "y": tp["state_error"]["relative_error"], "label": "error"}],
               "xlabel": "step k"}]  # fmt: skip
    if "curve" in tp:
        rows = tp["curve"]
        base = [r for r in rows if "fewer_steps" in r]
        panels.insert(0, {"title": f"prompt adherence (all checks, {tp['prompts']} prompts) vs evaluations saved",
                          "series": [{"x": [r["evaluations_saved"] for r in rows], "y": [r["teleport"]["ok"] for r in rows],
                                      "label": "teleport + sampler"},
                                     {"x": [0.0] + [r["evaluations_saved"] for r in base],
                                      "y": [rows[0]["teleport"]["ok"]] + [r["fewer_steps"]["ok"] for r in base],
                                      "label": "sampler, fewer steps"},
                                     {"x": [0.0, rows[-1]["evaluations_saved"]], "y": [0.95 * tp["full_ok"]] * 2,
                                      "label": "95% of full", "color": "#888888"}],
                          "xlabel": "fraction of network evaluations saved"})  # fmt: skip
    written.append(chart(panels, out / "analysis-teleport.png"))
    # 5. the predicted x0, decoded, step by step for the first trajectories ("outline first, details later")
    picks = list(range(min(4, traj.xs.shape[1])))
    cols = sorted(set(range(0, traj.steps, max(1, traj.steps // 10))) | {traj.steps - 1})
    seq = torch.cat([traj.x0s[cols][:, picks], traj.xs[-1:, picks]])  # (len(cols) + 1, b, C, h, w)
    ims = pixels_to_pil((smp.decode(seq.transpose(0, 1).flatten(0, 1)) / 2 + 0.5).permute(0, 2, 3, 1))
    from PIL import Image  # noqa: PLC0415

    ims = [im.resize((64, 64), Image.NEAREST) for im in ims]
    grid = out / "analysis-x0.png"
    image_grid(ims, len(cols) + 1).save(grid)
    written.append(grid)
    return [p for p in written if p is not None]
