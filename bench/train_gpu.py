"""Run several trainings side by side on one GPU within a wall-clock budget, each sized to fill it.

    python bench/train_gpu.py --stage vae  --jobs shapes cifar10 openmoji --data .data --budget-s 500 --out $OUT
    python bench/train_gpu.py --stage unet --jobs shapes cifar10 openmoji --data .data --budget-s 520 --out $OUT \
        --vae-from $PWD/.prev                     # the model-ema folders of the vae stage, by job

The small models of configs/train/{job}[-vae].yaml leave most of an H200 idle, so the jobs run concurrently.
Each job first trains CAL_STEPS steps (all jobs at once, so the measured speed is the shared one); its
max_steps is then what fits the rest of the budget at that speed, less a margin for start-up, validation and the
final save. Every real run's exact command line goes to OUT/commands.txt (rerunning it reproduces the run;
for the VAE stage with the discriminator switched on halfway). Outputs (logs/, validation/,
config.yaml, the training log) are copied to OUT/{job}[-vae]/; the models stay in runs/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CAL_STEPS = int(os.environ.get("LDM_CAL_STEPS", 60))
SOURCES = {"cifar10": "cifar10/train.parquet", "openmoji": "openmoji", "shapes": None,
           "openmoji-finetune": "openmoji", "openmoji-scratch": "openmoji"}
VAE_OF = {"openmoji-finetune": "cifar10", "openmoji-scratch": "cifar10"}  # U-Net jobs on another job's VAE


def command(job: str, stage: str, data: Path, out_dir: Path, extra: list[str]) -> list[str]:
    name = f"{job}-vae" if stage == "vae" else job
    args = [sys.executable, "-m", "training.train", f"configs/train/{name}.yaml", f"output_dir={out_dir}"]
    if SOURCES[job]:
        args.append(f"data.source={data / SOURCES[job]}")
    return args + extra


def last_rate(run: Path) -> float:
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(ln)["images_per_s"] for ln in lines if "images_per_s" in ln]
    return rates[-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["vae", "unet"], required=True)
    p.add_argument("--jobs", nargs="+", choices=sorted(SOURCES), required=True)
    p.add_argument("--data", type=Path, required=True, help="folder holding cifar10/ and openmoji/")
    p.add_argument("--budget-s", type=float, required=True, help="wall-clock seconds for this whole script")
    p.add_argument("--margin-s", type=float, default=75, help="start-up, validation and saving of the real run")
    p.add_argument("--vae-from", type=Path, help="unet stage: folder with {job}-vae/model-ema")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", nargs="*", default=[], metavar="JOB:KEY=VALUE", help="extra overrides for one job")
    a = p.parse_args()
    t0 = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    extra = {job: [s.split(":", 1)[1] for s in a.set if s.startswith(job + ":")] for job in a.jobs}
    if a.stage == "unet":
        for job in a.jobs:
            extra[job].append(f"model.vae={a.vae_from / f'{VAE_OF.get(job, job)}-vae' / 'model-ema'}")

    # 1. calibration, all jobs at once
    cal = {}
    for job in a.jobs:
        run = a.runs / f"cal-{job}-{a.stage}"
        shutil.rmtree(run, ignore_errors=True)
        cmd = command(job, a.stage, a.data, run, extra[job] + [f"max_steps={CAL_STEPS}", "resume=never",
                      "validation.every=0", "validation.prompts=[]", "validation.recon_images=0", "checkpoint_every=0",
                      f"log_every={CAL_STEPS // 3}", "lr_schedule.warmup_steps=0", "shapes.rows=4000"])  # fmt: skip
        cal[job] = (run, time.time(), subprocess.Popen(cmd, stdout=open(a.out / f"cal-{job}.log", "w"), stderr=subprocess.STDOUT))
    speeds = {}
    for job, (run, start, proc) in cal.items():
        if proc.wait() != 0:
            print(f"{job}: calibration failed, see {a.out / f'cal-{job}.log'}", flush=True)
            return 1
        import yaml

        batch = yaml.safe_load((run / "config.yaml").read_text())["batch_size"]
        speeds[job] = last_rate(run) / batch  # steps/s
    left = a.budget_s - (time.time() - t0) - a.margin_s
    print(f"calibrated in {time.time() - t0:.0f} s: " + ", ".join(f"{j} {s:.1f} steps/s" for j, s in speeds.items()), flush=True)

    # 2. the real runs, sized to the time left
    procs, cmds = {}, []
    for job in a.jobs:
        steps = int(left * speeds[job] * 0.9)
        steps = steps // 100 * 100 if steps >= 1000 else max(steps, 4)  # round numbers; a few steps in smoke runs
        name = f"{job}-vae" if a.stage == "vae" else job
        run = a.runs / name
        shutil.rmtree(run, ignore_errors=True)
        over = extra[job] + [f"max_steps={steps}", "resume=never", f"checkpoint_every={max(100, steps // 4)}",
                             f"validation.every={max(100, steps // 4)}"]  # fmt: skip
        if a.stage == "vae" and job != "shapes":
            over.append(f"vae_loss.disc_start={steps // 2}")
        cmd = command(job, a.stage, a.data, run, over)
        cmds.append(" ".join(cmd[1:]).replace(str(a.data), "../shared/data"))
        procs[job] = (run, subprocess.Popen(cmd, stdout=open(a.out / f"{name}.log", "w"), stderr=subprocess.STDOUT))
    (a.out / "commands.txt").write_text("\n".join("python " + c for c in cmds) + "\n")
    status = 0
    for job, (run, proc) in procs.items():
        rc = proc.wait()
        status |= rc
        name = run.name
        print(f"{name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        dest = a.out / name
        for sub in ("logs", "validation"):  # the models stay in runs/ (too large to bring back whole)
            if (run / sub).exists():
                shutil.copytree(run / sub, dest / sub, dirs_exist_ok=True)
        if (run / "config.yaml").exists():
            shutil.copy(run / "config.yaml", dest / "config.yaml")
    return status


if __name__ == "__main__":
    sys.exit(main())
