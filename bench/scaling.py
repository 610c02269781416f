"""Multi-GPU scaling of the real trainer (DDP and FSDP) at SD1.5 size, and loss curves of 1 GPU vs 2 GPUs.

    python3 bench/scaling.py --out $OUT [--budget-s 450] [--batch 16] [--gpus 1 2 4]
    bash bench/scaling.sh                      # the same, as run on the lent machine (BENCHMARKS.md)

Every run is ``python -m training.train`` (1 GPU) or ``accelerate launch --config_file
configs/accelerate/{ddp,fsdp}.yaml --num_processes N -m training.train`` on a YAML written here: the trainer's own
step, nothing re-implemented.

1. scaling  SD1.5 U-Net (preset sd15: 860M parameters, random init), 512 px, bf16, AdamW, EMA, grad_clip 1, per-GPU
            batch --batch. Precomputed latents: the trainer's latent cache (cache.latents) encodes --rows shapes
            images once before the first step and the text cache (cache.text) keeps each caption's embedding, so the
            measured steps run the U-Net alone, as on a dataset of precomputed (4, 64, 64) latents and (77, 768)
            embeddings. img/s is the trainer's own ``images_per_s`` (global images / wall time of training, pauses
            excluded) over the windows after the first (warm-up: allocator, cuDNN autotuning); the run is stopped
            once they are logged. efficiency = img/s on N GPUs / (N x img/s on 1 GPU). The largest FSDP run instead
            ends normally, so that its checkpoint (weights, AdamW states and EMA gathered from the shards) and the
            final bundles are written at SD1.5 size; the seconds that takes are reported.
2. curves   a small config (preset tiny, 32 px shapes, fp32, 50 steps, EMA, checkpoint at 25, a validation image at
            the end) on 1 GPU (batch 8, grad_accum 2), 2 GPUs DDP and 2 GPUs FSDP (batch 8): the same global batch,
            seeds and per-sample draws, so the loss curves agree up to the float summation order; then the FSDP step
            25 checkpoint resumed on 1 GPU, and the 1-GPU one resumed under FSDP, both against the 1-GPU curve. Max
            |loss difference| reported. fp32 (TF32 off) so that a real difference is not lost in bf16 rounding; then,
            when time is left, the same three runs in bf16.

Each stage runs under its own time limit and inside try/except; results go to OUT/scaling.json after every run
(errors included, with the end of the run's log), the table to OUT/scaling.md, all logs to OUT/logs.tgz.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
T0 = time.time()


def gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60).stdout  # fmt: skip
        return [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        return []


# ------------------------------------------------------------------------------------------------- configs


def sd15_config(out: Path, batch: int, rows: int, window: int, max_steps: int) -> dict:
    return {
        "model": {"source": "sd15"},
        "data": {"source": "shapes", "resolution": 512, "crop": "center", "num_workers": 2},
        "shapes": {"rows": rows, "image_size": 512, "supersample": 1},
        "cache": {"latents": True, "text": True},
        "mixed_precision": "bf16", "batch_size": batch, "grad_accum": 1, "max_steps": max_steps,
        "optim": {"lr": 1e-5, "weight_decay": 0.01}, "ema": {"decay": 0.9999}, "grad_clip": 1.0,
        "checkpoint_every": 0, "keep_last": 1, "log_every": window, "resume": "never",
        "validation": {"prompts": []}, "output_dir": str(out),
    }  # fmt: skip


def small_config(out: Path, grad_accum: int, precision: str, resume: str = "never") -> dict:
    return {
        "model": {"source": "tiny"},
        "data": {"source": "shapes", "resolution": 32, "crop": "center", "num_workers": 1},
        "shapes": {"rows": 512, "image_size": 32},
        "cache": {"latents": True},
        "mixed_precision": precision, "batch_size": 8, "grad_accum": grad_accum, "max_steps": 50,
        "optim": {"lr": 3e-4, "weight_decay": 0.0}, "lr_schedule": {"name": "cosine", "warmup_steps": 5},
        "ema": {"decay": 0.99}, "cond_dropout": {"text": 0.1}, "grad_clip": 1.0,
        "checkpoint_every": 25, "keep_last": 0, "log_every": 1, "resume": resume,
        "validation": {"prompts": ["a red circle"], "every": 0, "sampler": {"name": "euler", "steps": 10,
                                                                            "cfg_scale": 3.0, "seed": 0}},
        "output_dir": str(out),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------- runs


class Runner:
    def __init__(self, out: Path, work: Path, budget_s: float):
        self.out, self.work, self.budget = out, work, budget_s
        self.results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "gpus": gpus(), "runs": {}}
        self.port = 29600
        (work / "logs").mkdir(parents=True, exist_ok=True)
        try:
            import accelerate
            import torch

            self.results["versions"] = {"torch": torch.__version__, "accelerate": accelerate.__version__}
        except Exception as e:  # noqa: BLE001
            self.results["versions"] = repr(e)

    def left(self) -> float:
        return self.budget - (time.time() - T0)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "scaling.json").write_text(json.dumps(self.results, indent=1))
        (self.out / "scaling.md").write_text(table(self.results))
        with tarfile.open(self.out / "logs.tgz", "w:gz") as tar:
            tar.add(self.work / "logs", arcname="logs")

    def run(self, name: str, cfg: dict, n: int, strategy: str, limit_s: float, stop_after: int | None = None,
            env: dict | None = None) -> dict:  # fmt: skip
        """Launch one training; ``stop_after``: stop it (SIGTERM) once that many metric records are logged."""
        rec: dict = {"gpus": n, "strategy": strategy}
        self.results["runs"][name] = rec
        limit = min(limit_s, self.left() - 5)
        if limit < 30:
            rec["skipped"] = f"not enough time left ({self.left():.0f} s)"
            self.save()
            return rec
        run_dir = Path(cfg["output_dir"])
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg_path = self.work / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if n == 1:
            cmd = [sys.executable, "-m", "training.train", str(cfg_path)]
        else:
            self.port += 1
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "configs" / "accelerate" / f"{strategy}.yaml"), "--num_processes", str(n),
                   "--main_process_port", str(self.port), "-m", "training.train", str(cfg_path)]  # fmt: skip
        full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(n))), "PYTHONUNBUFFERED": "1",
                    "TOKENIZERS_PARALLELISM": "false", **(env or {})}  # fmt: skip
        rec["command"] = " ".join(cmd)
        log_path = self.work / "logs" / f"{name}.log"
        start = time.time()
        stopped = None
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
            try:
                while proc.poll() is None:
                    time.sleep(1.0)
                    if stop_after is not None and len(records(run_dir)) >= stop_after:
                        stopped = "measured"
                    elif time.time() - start > limit:
                        stopped = f"time limit {limit:.0f} s"
                    if stopped:
                        stop(proc)
                        break
            finally:
                if proc.poll() is None:
                    stop(proc)
        rec["wall_s"] = round(time.time() - start, 1)
        rec["returncode"] = proc.returncode
        if stopped:
            rec["stopped"] = stopped
        recs = records(run_dir)
        rec["losses"] = {r["step"]: r["loss"] for r in recs}
        text = log_path.read_text(errors="replace")
        if (proc.returncode != 0 and stopped != "measured") or not recs:
            rec["error"] = text[-4000:]
        self.save()
        return rec


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def bundles(run_dir: Path) -> list[str]:
    return [d for d in ("model", "model-ema") if (run_dir / d / "model.safetensors").is_file()]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher (torchrun forwards it to its workers, which sit in sessions of their own), then SIGKILL."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        pass
    try:  # whatever is left in the run's session (the launcher, data-loader workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def throughput(rec: dict, run_dir: Path, window: int) -> None:
    """img/s over the logged windows after the first: total images / total time (each window has the same images)."""
    recs = [r for r in records(run_dir) if "images_per_s" in r][1:]
    if recs:
        rates = [r["images_per_s"] for r in recs]
        rec["img_s_windows"] = [round(x, 2) for x in rates]
        rec["img_s"] = round(len(rates) / sum(1 / x for x in rates), 2)
        rec["measured_steps"] = len(rates) * window


# ----------------------------------------------------------------------------------------------- the table


def table(results: dict) -> str:
    runs = results["runs"]
    base = runs.get("sd15-1gpu", {}).get("img_s")
    lines = [f"GPUs: {', '.join(results.get('gpus', [])) or '?'}; versions: {results.get('versions')}", "",
             "| run | GPUs | strategy | per-GPU batch | img/s | img/s per GPU | efficiency | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, r in runs.items():
        if not name.startswith("sd15"):
            continue
        ips = r.get("img_s")
        eff = f"{ips / (r['gpus'] * base):.3f}" if ips and base else "-"
        note = r.get("skipped") or ("error" if "error" in r else "") or r.get("note", "")
        lines.append(f"| {name} | {r['gpus']} | {r['strategy']} | {r.get('batch', '-')} | {ips or '-'} | "
                     f"{round(ips / r['gpus'], 2) if ips else '-'} | {eff} | {note} |")  # fmt: skip
    curves = results.get("curves", {})
    if curves:
        lines += ["", "| loss curve | against | steps | max abs loss difference |", "| --- | --- | --- | --- |"]
        for name, c in curves.items():
            diff = c.get("max_abs_diff", c.get("error"))
            lines.append(f"| {name} | {c.get('against')} | {c.get('steps')} | {diff} |")
    return "\n".join(lines) + "\n"


def compare(results: dict, name: str, against: str, steps: range) -> None:
    runs = results["runs"]
    a, b = runs.get(against, {}).get("losses", {}), runs.get(name, {}).get("losses", {})
    common = [s for s in steps if s in a and s in b]
    entry: dict = {"against": against, "steps": f"{steps.start}-{steps.stop - 1}"}
    if len(common) != len(steps):
        entry["error"] = f"missing steps ({len(common)} of {len(steps)} in both)"
    else:
        entry["max_abs_diff"] = float(f"{max(abs(a[s] - b[s]) for s in common):.3g}")
        entry["max_rel_diff"] = float(f"{max(abs(a[s] - b[s]) / abs(a[s]) for s in common):.3g}")
    results.setdefault("curves", {})[name] = entry


# ---------------------------------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=None, help="run folders (default: /dev/shm/ldm-scaling or /tmp)")
    p.add_argument("--budget-s", type=float, default=450, help="wall clock for the whole script")
    p.add_argument("--batch", type=int, default=16, help="SD1.5 per-GPU batch")
    p.add_argument("--window", type=int, default=10, help="steps per throughput window")
    p.add_argument("--windows", type=int, default=3, help="measured windows (after one warm-up window)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--skip", nargs="*", default=[], choices=["scaling", "curves", "bf16-curves", "fsdp-bf16-gather"])
    p.add_argument("--smoke", action="store_true", help="check this script on 2 CPU processes: tiny model, gloo")
    a = p.parse_args()
    available = len(gpus())
    if a.smoke:  # CPU processes over gloo; FSDP through the trainer's test hook (accelerate has no FSDP on CPUs)
        available, a.batch = 2, 2
        os.environ.update(ACCELERATE_USE_CPU="true", LDM_TEST_FSDP_ON_CPU="1", OMP_NUM_THREADS="1")
        global sd15_config, small_config
        big, small = sd15_config, small_config

        def sd15_config(*args, **kw):  # noqa: F811
            cfg = big(*args, **kw)
            cfg.update(model={"source": "tiny"}, mixed_precision="no", data={**cfg["data"], "resolution": 32},
                       shapes={**cfg["shapes"], "image_size": 32})  # fmt: skip
            return cfg

        def small_config(*args, **kw):  # noqa: F811
            cfg = small(*args, **kw)
            cfg.update(max_steps=50, shapes={**cfg["shapes"], "rows": 64}, mixed_precision="no")
            return cfg
    ns = [n for n in a.gpus if n <= max(available, 1)]
    work = a.work
    if work is None:
        shm = Path("/dev/shm")
        work = shm / "ldm-scaling" if shm.is_dir() and shutil.disk_usage(shm).free > 60e9 else Path("/tmp/ldm-scaling")
    shutil.rmtree(work, ignore_errors=True)
    R = Runner(a.out, work, a.budget_s)
    R.results["settings"] = {"batch_per_gpu": a.batch, "window_steps": a.window, "windows": a.windows,
                             "gpu_counts": ns, "work": str(work)}  # fmt: skip
    R.save()
    rows = a.batch * max(ns)  # one batch per GPU per epoch at the largest count: every run encodes the same images
    stop_after = 1 + a.windows
    max_steps = a.window * stop_after

    def sd15(n: int, strategy: str, finish: bool = False, env: dict | None = None, suffix: str = "") -> None:
        name = f"sd15-{n}gpu" + ("" if n == 1 else f"-{strategy}") + suffix
        run_dir = work / name
        try:
            rec = R.run(name, sd15_config(run_dir, a.batch, rows, a.window, max_steps), n, strategy,
                        limit_s=300 if finish else 200, stop_after=None if finish else stop_after, env=env)  # fmt: skip
            rec["batch"] = a.batch
            throughput(rec, run_dir, a.window)
            if finish and rec.get("returncode") == 0:
                last = records(run_dir)[-1]
                ck = run_dir / "checkpoints" / f"step-{max_steps:08d}"
                rec["note"] = "ran to the end: checkpoint + final bundles written"
                rec["checkpoint_files"] = sorted(f.name for f in ck.iterdir()) if ck.is_dir() else "missing"
                rec["final_bundles"] = bundles(run_dir)
                ema_file, log_file = run_dir / "model-ema" / "model.safetensors", run_dir / "logs" / "metrics.jsonl"
                if ema_file.is_file():  # the last step's log line to the EMA bundle: gather + checkpoint + bundles
                    rec["save_s_approx"] = round(os.path.getmtime(ema_file) - os.path.getmtime(log_file), 1)
                rec["last_loss"] = last["loss"]
        except Exception:  # noqa: BLE001
            R.results["runs"].setdefault(name, {})["error"] = traceback.format_exc()[-3000:]
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
            R.save()

    def curves(precision: str) -> None:
        tag = "fp32" if precision == "no" else precision
        env = {"NVIDIA_TF32_OVERRIDE": "0"} if precision == "no" else {}
        d = {k: work / f"curve-{tag}-{k}" for k in ("1gpu", "ddp", "fsdp", "fsdp-to-1gpu", "1gpu-to-fsdp")}
        plan = [("1gpu", 1, "single", small_config(d["1gpu"], 2, precision)),
                ("ddp", 2, "ddp", small_config(d["ddp"], 1, precision)),
                ("fsdp", 2, "fsdp", small_config(d["fsdp"], 1, precision))]  # fmt: skip
        if precision == "no":
            at25 = {k: str(d[k] / "checkpoints" / "step-00000025") for k in ("1gpu", "fsdp")}
            plan += [("fsdp-to-1gpu", 1, "single", small_config(d["fsdp-to-1gpu"], 2, precision, at25["fsdp"])),
                     ("1gpu-to-fsdp", 2, "fsdp", small_config(d["1gpu-to-fsdp"], 1, precision, at25["1gpu"]))]
        for key, n, strategy, cfg in plan:
            name = f"curve-{tag}-{key}"
            try:
                if n > max(available, 1):
                    R.results["runs"][name] = {"skipped": f"{n} GPUs needed"}
                    continue
                rec = R.run(name, cfg, n, strategy, limit_s=120, env=env)
                run_dir = Path(cfg["output_dir"])
                rec["validation_image"] = (run_dir / "validation" / "step-00000050.png").is_file()
                rec["final_bundles"] = bundles(run_dir)
                if key != "1gpu":
                    compare(R.results, name, f"curve-{tag}-1gpu", range(26 if "-to-" in key else 1, 51))
            except Exception:  # noqa: BLE001
                R.results["runs"].setdefault(name, {})["error"] = traceback.format_exc()[-3000:]
            R.save()
        for x in d.values():
            shutil.rmtree(x, ignore_errors=True)

    if "scaling" not in a.skip:
        sd15(1, "single")
        if "out of memory" in R.results["runs"]["sd15-1gpu"].get("error", "").lower() and a.batch > 1:
            R.results["runs"]["sd15-1gpu-oom"] = R.results["runs"].pop("sd15-1gpu")
            a.batch //= 2
            R.results["settings"]["batch_per_gpu"] = a.batch
            sd15(1, "single")
        for strategy in ("ddp", "fsdp"):
            if 2 in ns:
                sd15(2, strategy, finish=strategy == "fsdp" and max(ns) == 2)
    if "curves" not in a.skip:
        curves("no")
    if "scaling" not in a.skip:
        for n in [n for n in ns if n > 2]:
            for strategy in ("ddp", "fsdp"):
                sd15(n, strategy, finish=strategy == "fsdp" and n == max(ns))
    if "bf16-curves" not in a.skip:
        curves("bf16")
    if "fsdp-bf16-gather" not in a.skip and max(ns) > 1:
        sd15(max(ns), "fsdp", env={"LDM_FSDP_PARAM_DTYPE": "bf16"}, suffix="-bf16gather")
    R.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    R.results["total_s"] = round(time.time() - T0, 1)
    R.save()
    print(table(R.results))
    print(json.dumps(R.results.get("curves", {}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
