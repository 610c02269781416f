r"""Line charts of training metrics (logs/metrics.jsonl) as PNG, drawn with Pillow alone (no matplotlib).

    python bench/plot_curves.py runs/cifar10/logs/metrics.jsonl --key loss --log-y --smooth 5 --out loss.png
    python bench/plot_curves.py runs/a runs/b --label a b --key vae/psnr --title "PSNR" --out psnr.png
    python bench/plot_curves.py RUN --key vae/rec_loss vae/kl_loss vae/disc_loss --panels --log-y vae/rec_loss \
        --vline 3050:disc_start --out vae.png
    python bench/plot_curves.py part1 part2 --offset 0 1000 --label "part 1" "part 2" --key loss \
        --out both.png

Each FILE is a metrics.jsonl (one JSON object a line with "step" and metrics) or a run folder holding
logs/metrics.jsonl. A series is one (file, key): the lines that have the key, by step; a step logged twice
(a resumed run) keeps its last value. Keys go on one axis, or one panel each with --panels (same x range;
"--key a,b c" puts a and b in one panel).
--smooth N draws the trailing N-point moving average over the raw curve (drawn faint), for series of at least
3N points; unsmoothed series of fewer than 40 points get markers. --log-y alone puts every panel on a log axis,
--log-y KEY ... only those keys' panels. --nonzero KEY keeps the lines where KEY is nonzero (vae/disc_factor:
the steps with the discriminator on). The PNG is palette-coded (line art), a few tens of KB.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
FONTS = ["DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "Arial.ttf", "Helvetica.ttc"]
SS = 2  # supersampling factor: drawn at SS x the size, then downscaled (antialiased lines and text)


def font(size: int) -> ImageFont.ImageFont:
    for name in FONTS:
        try:
            return ImageFont.truetype(name, size * SS)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size * SS)  # Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def read_series(
    path: Path, key: str, offset: float = 0.0, nonzero: tuple[str, ...] = ()
) -> tuple[list[float], list[float]]:
    """(steps, values) of the lines of a metrics.jsonl that have a finite number under ``key`` (and a nonzero one
    under each ``nonzero`` key), sorted by step."""
    if path.is_dir():
        path = path / "logs" / "metrics.jsonl"
    found: dict[float, float] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"{path}:{n}: not JSON, skipped", file=sys.stderr)
            continue
        value, step = row.get(key), row.get("step")
        if any(not row.get(k) for k in nonzero):
            continue
        if isinstance(value, (int, float)) and isinstance(step, (int, float)) and math.isfinite(value):
            found[float(step) + offset] = float(value)  # a repeated step keeps its last value
    steps = sorted(found)
    return steps, [found[s] for s in steps]


def moving_average(values: list[float], n: int) -> list[float]:
    """Trailing mean over up to ``n`` points (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def linear_ticks(lo: float, hi: float, target: int = 6) -> tuple[float, float, list[float]]:
    """Nice (lo, hi, ticks) covering [lo, hi]."""
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = nice_step(hi - lo, target)
    lo2, hi2 = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    ticks = [lo2 + i * step for i in range(int(round((hi2 - lo2) / step)) + 1)]
    return lo2, hi2, ticks


def log_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """(lo, hi, ticks) for a log axis over [lo, hi] (both > 0): bounds at 1-2-5 values, ticks at decades (with 2
    and 5 between when the range is narrow) and at the bounds."""
    a, b = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    fine = [m * 10.0 ** e for e in range(a, b + 1) for m in (1, 2, 5)]
    lo2 = max(t for t in fine if t <= lo * (1 + 1e-9))
    hi2 = min(t for t in fine if t >= hi * (1 - 1e-9))
    if hi2 <= lo2:
        hi2 = min(t for t in fine if t > lo2)
    narrow = math.log10(hi2 / lo2) <= 2.01
    ticks = [t for t in fine if lo2 * (1 - 1e-9) <= t <= hi2 * (1 + 1e-9)
             and (narrow or abs(math.log10(t) - round(math.log10(t))) < 1e-9 or t in (lo2, hi2))]
    return lo2, hi2, ticks


def sci(v: float) -> str:
    m, e = f"{v:.2e}".split("e")
    m = m.rstrip("0").rstrip(".")
    return f"{m}e{int(e)}"


def tick_labels(ticks: list[float], log: bool = False) -> list[str]:
    """Labels in one style for a whole axis: 0.05 / 1500 / 20k / 8e-4."""
    big = max((abs(t) for t in ticks), default=0)
    if log:
        return [sci(t) if (t and (abs(t) < 1e-3 or abs(t) >= 1e5)) else f"{t:g}" for t in ticks]
    if big and (big < 1e-2 or big >= 1e6):
        return ["0" if t == 0 else sci(t) for t in ticks]
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    if big >= 10000 and all(float(round(t) / 1000).is_integer() for t in ticks):
        return [f"{t / 1000:g}k" if t else "0" for t in ticks]
    digits = 0
    while digits < 8 and abs(round(step, digits) - step) > 1e-9 * max(1.0, abs(step)):
        digits += 1
    return ["0" if abs(t) < 1e-12 else f"{t:.{digits}f}" for t in ticks]


class Panel:
    """One set of axes in a box of the image (coordinates in supersampled pixels)."""

    def __init__(self, box, xr, series, log_y, ylabel, title):
        self.box, self.series, self.log_y, self.ylabel, self.title = box, series, log_y, ylabel, title
        self.x0, self.x1, self.xticks = xr
        ys = [v for s in series for v in s["y"]] + [v for s in series for v in s.get("ys", [])]
        if log_y:
            ys = [v for v in ys if v > 0]
            if not ys:
                raise SystemExit(f"--log-y: no positive value to plot for {ylabel}")
            self.y0, self.y1, self.yticks = log_ticks(min(ys), max(ys))
        else:
            self.y0, self.y1, self.yticks = linear_ticks(min(ys), max(ys)) if ys else (0, 1, [0, 1])

    def ty(self, v: float) -> float:
        l, t, r, b = self.box
        if self.log_y:
            f = (math.log10(v) - math.log10(self.y0)) / (math.log10(self.y1) - math.log10(self.y0))
        else:
            f = (v - self.y0) / (self.y1 - self.y0)
        return b - f * (b - t)

    def tx(self, v: float) -> float:
        l, t, r, b = self.box
        return l + (v - self.x0) / (self.x1 - self.x0) * (r - l)


def draw_panel(draw: ImageDraw.ImageDraw, p: Panel, fonts, vlines, show_xlabels: bool, xlabel: str, legend: str):
    small, normal = fonts
    l, t, r, b = p.box
    grid, axis, text = "#e6e6e6", "#444444", "#222222"
    for v, label in zip(p.yticks, tick_labels(p.yticks, p.log_y)):  # horizontal grid and y labels
        y = p.ty(v)
        draw.line([(l, y), (r, y)], fill=grid, width=SS)
        w = draw.textlength(label, font=small)
        draw.text((l - 8 * SS - w, y), label, fill=text, font=small, anchor="lm")
    for v, label in zip(p.xticks, tick_labels(p.xticks)):
        x = p.tx(v)
        draw.line([(x, t), (x, b)], fill=grid, width=SS)
        draw.line([(x, b), (x, b + 5 * SS)], fill=axis, width=SS)
        if show_xlabels:
            draw.text((x, b + 8 * SS), label, fill=text, font=small, anchor="mt")
    for step, label in vlines:
        if p.x0 <= step <= p.x1:
            x = p.tx(step)
            for y in range(int(t), int(b), 10 * SS):  # dashed
                draw.line([(x, y), (x, min(y + 5 * SS, b))], fill="#888888", width=SS)
            if label:
                draw.text((x + 4 * SS, t + 4 * SS), label, fill="#666666", font=small, anchor="lt")
    draw.rectangle([l, t, r, b], outline=axis, width=SS)
    if p.title:
        draw.text((l, t - 6 * SS), p.title, fill=text, font=normal, anchor="lb")
    if show_xlabels and xlabel:
        draw.text(((l + r) / 2, b + 30 * SS), xlabel, fill=text, font=small, anchor="mt")

    def clip_y(v):
        return min(max(v, p.y0), p.y1)

    for s in p.series:
        pts_raw = [(p.tx(x), p.ty(clip_y(y))) for x, y in zip(s["x"], s["y"]) if not p.log_y or y > 0]
        if "ys" in s:  # raw faint, smoothed on top
            faint = blend(s["color"], 0.3)
            if len(pts_raw) > 1:
                draw.line(pts_raw, fill=faint, width=SS, joint="curve")
            pts = [(p.tx(x), p.ty(clip_y(y))) for x, y in zip(s["x"], s["ys"]) if not p.log_y or y > 0]
        else:
            pts = pts_raw
        if len(pts) > 1:
            draw.line(pts, fill=s["color"], width=2 * SS, joint="curve")
        if len(pts) < 40 and "ys" not in s:
            rad = 3 * SS
            for x, y in pts:
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=s["color"])

    # legend, in the corner with the fewest points under it
    if not p.series or legend == "none" or (legend == "auto" and len(p.series) == 1 and p.title):
        return  # one series under a title: the title says it
    labels = [s["label"] for s in p.series]
    lw = max(draw.textlength(x, font=small) for x in labels) + 34 * SS
    lh = len(labels) * 18 * SS + 8 * SS
    m = 8 * SS
    corners = {"upper right": (r - m - lw, t + m), "lower right": (r - m - lw, b - m - lh),
               "upper left": (l + m, t + m), "lower left": (l + m, b - m - lh)}  # fmt: skip
    if legend in corners:
        cx, cy = corners[legend]
    else:
        every = [(p.tx(x), p.ty(clip_y(y))) for s in p.series for x, y in zip(s["x"], s.get("ys", s["y"]))
                 if not p.log_y or y > 0]  # fmt: skip

        def covered(c):
            x, y = c
            return sum(1 for px, py in every if x - m <= px <= x + lw + m and y - m <= py <= y + lh + m)

        cx, cy = min(corners.values(), key=covered)
    draw.rectangle([cx, cy, cx + lw, cy + lh], fill="#ffffff", outline="#bbbbbb", width=SS)
    for i, s in enumerate(p.series):
        y = cy + 4 * SS + i * 18 * SS + 9 * SS
        draw.line([(cx + 6 * SS, y), (cx + 26 * SS, y)], fill=s["color"], width=3 * SS)
        draw.text((cx + 32 * SS, y), s["label"], fill=text, font=small, anchor="lm")


def blend(color: str, alpha: float) -> tuple[int, int, int]:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return tuple(int(round(alpha * c + (1 - alpha) * 255)) for c in (r, g, b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="metrics.jsonl files or run folders")
    ap.add_argument("--key", nargs="+", default=["loss"], help="metric(s) to plot (default: loss)")
    ap.add_argument("--label", nargs="+", help="one legend label per file (default: the run folder's name)")
    ap.add_argument("--offset", nargs="+", type=float, help="one step offset per file (to join a continued run)")
    ap.add_argument("--panels", action="store_true", help="one panel per --key (KEY1,KEY2 share one panel) instead of "
                    "all keys on one axis")
    ap.add_argument("--log-y", nargs="*", metavar="KEY", help="log y axis (for all keys, or only the keys given)")
    ap.add_argument("--smooth", type=int, default=0, metavar="N", help="trailing N-point moving average")
    ap.add_argument("--vline", nargs="+", default=[], metavar="STEP[:LABEL]", help="dashed vertical markers")
    ap.add_argument("--title", default="")
    ap.add_argument("--xlabel", default="step")
    ap.add_argument("--nonzero", nargs="+", default=[], metavar="KEY",
                    help="only the lines where KEY is there and nonzero (e.g. vae/disc_factor: the GAN is on)")
    ap.add_argument("--xmin", type=float)
    ap.add_argument("--xmax", type=float)
    ap.add_argument("--legend", default="auto", choices=["auto", "upper right", "lower right", "upper left",
                                                          "lower left", "none"])  # fmt: skip
    ap.add_argument("--width", type=int, default=720, help="image width in pixels (default: %(default)s)")
    ap.add_argument("--height", type=int, help="image height (default: 360 for one panel, 40 + 200 per panel)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)

    if a.label and len(a.label) != len(a.files):
        ap.error(f"--label: {len(a.label)} labels for {len(a.files)} files")
    if a.offset and len(a.offset) != len(a.files):
        ap.error(f"--offset: {len(a.offset)} offsets for {len(a.files)} files")
    names = a.label or [(f.parent.parent.name if f.is_file() else f.name) or str(f) for f in a.files]
    offsets = a.offset or [0.0] * len(a.files)
    vlines = []
    for v in a.vline:
        step, _, label = v.partition(":")
        vlines.append((float(step), label))
    keys_given = {k for spec in a.key for k in spec.split(",")}
    log_keys = keys_given if a.log_y is not None and not a.log_y else set(a.log_y or [])
    if log_keys - keys_given:
        ap.error(f"--log-y: {sorted(log_keys - keys_given)} not among --key")

    keys_all = [k for spec in a.key for k in spec.split(",")]
    if a.panels:  # "a,b" shares one panel
        groups = [spec.split(",") for spec in a.key]
    else:
        groups = [keys_all]
    panels_series, xs_all = [], []
    for keys in groups:
        series, color_i = [], 0
        for fi, (f, name, off) in enumerate(zip(a.files, names, offsets)):
            for k in keys:
                x, y = read_series(f, k, off, tuple(a.nonzero))
                if not x:
                    print(f"{f}: no values for {k!r}", file=sys.stderr)
                    continue
                if a.xmin is not None or a.xmax is not None:
                    keep = [i for i, v in enumerate(x)
                            if (a.xmin is None or v >= a.xmin) and (a.xmax is None or v <= a.xmax)]  # fmt: skip
                    x, y = [x[i] for i in keep], [y[i] for i in keep]
                if not x:
                    continue
                label = name if len(keys) == 1 else (k if len(a.files) == 1 else f"{name} {k}")
                # colours: by file when panels (the same run has the same colour in every panel), else by series
                color = PALETTE[(fi if a.panels and len(keys) == 1 else color_i) % len(PALETTE)]
                color_i += 1
                s = {"x": x, "y": y, "label": label, "color": color}
                if a.smooth > 1 and len(y) >= 3 * a.smooth:  # a sparse series (PSNR per validation) stays raw
                    s["ys"] = moving_average(y, a.smooth)
                series.append(s)
                xs_all += x
        if series:  # a key no file has gets no panel
            panels_series.append((keys, series))
    if not xs_all:
        raise SystemExit("nothing to plot")
    lo = a.xmin if a.xmin is not None else min(xs_all)
    hi = a.xmax if a.xmax is not None else max(xs_all)
    lo = min(lo, 0.0) if lo >= 0 and lo < 0.15 * (hi - lo) else lo  # start at 0 when the data nearly does
    if hi <= lo:  # one step only
        lo, hi, xt = linear_ticks(lo, hi, 8)
    else:
        _, _, xt = linear_ticks(lo, hi, 8)
    xr = (lo, hi, [v for v in xt if lo - 1e-9 <= v <= hi + 1e-9])  # the axis ends where the data does

    n = len(panels_series)
    W = a.width * SS
    H = (a.height or (360 if n == 1 else 40 + 200 * n)) * SS
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    fonts = (font(12), font(14))
    top = (34 if a.title else 12) * SS
    if a.title:
        draw.text((W / 2, 8 * SS), a.title, fill="#111111", font=font(16), anchor="mt")
    left, right, bottom = 78 * SS, W - 18 * SS, H - 48 * SS
    title_h = 22 * SS
    gap = 14 * SS
    ph = (bottom - top - n * title_h - (n - 1) * gap) / n
    for i, (keys, series) in enumerate(panels_series):
        t = top + i * (ph + title_h + gap) + title_h
        box = (left, t, right, t + ph)
        ptitle = ", ".join(keys) if a.panels or len(a.files) > 1 or len(keys) == 1 else ""
        is_log = any(k in log_keys for k in keys)
        if is_log:
            ptitle += " (log scale)"
        p = Panel(box, xr, series, is_log, keys[0], ptitle)
        draw_panel(draw, p, fonts, vlines, i == n - 1, a.xlabel, a.legend)
    img = img.resize((W // SS, H // SS), Image.LANCZOS)
    img = img.quantize(colors=128, method=Image.Quantize.MEDIANCUT)  # line art: a palette keeps the file small
    a.out.parent.mkdir(parents=True, exist_ok=True)
    img.save(a.out, optimize=True)
    print(f"wrote {a.out} ({a.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
