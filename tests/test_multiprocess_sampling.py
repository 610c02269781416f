"""Sampling on several processes: the job list, its split, file numbering, and a real 2-process accelerate run
whose files equal a single-process run's, file by file (pixels and metadata)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import PartialState
from PIL import Image

from inference.jobs import (Job, batches, first_free_index, from_main_process, image_name, make_jobs,
                            process_share)  # fmt: skip

ROOT = Path(__file__).parents[1]


class Rank:
    """Stands in for PartialState on process ``process_index`` of ``num_processes``: accelerate's own split."""

    split_between_processes = PartialState.split_between_processes

    def __init__(self, process_index: int, num_processes: int):
        self.process_index, self.num_processes = process_index, num_processes


def test_jobs_are_prompt_major_with_consecutive_seeds():
    jobs = make_jobs(["a", "b", "c"], n=2, seed=10)
    assert jobs == [Job(0, "a", 10), Job(1, "a", 11), Job(2, "b", 12), Job(3, "b", 13), Job(4, "c", 14),
                    Job(5, "c", 15)]  # fmt: skip
    assert make_jobs(["a"], n=1, seed=2**64 - 1) == [Job(0, "a", 2**64 - 1)]
    with pytest.raises(ValueError, match="seed must be in"):
        make_jobs(["a", "b"], n=1, seed=2**64 - 1)
    with pytest.raises(ValueError, match="no prompt"):
        make_jobs([], n=1, seed=0)


@pytest.mark.parametrize("n_jobs", [1, 2, 5, 7, 16])
@pytest.mark.parametrize("n_procs", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_shares_are_disjoint_and_together_the_whole_list(n_jobs, n_procs, batch):
    jobs = make_jobs([f"p{k}" for k in range(n_jobs)], n=1, seed=0)
    all_batches = list(batches(jobs, batch))
    shares = [process_share(all_batches, Rank(i, n_procs)) for i in range(n_procs)]
    assert [b for share in shares for b in share] == all_batches  # in order, each batch exactly once
    assert [len(b) for b in all_batches[:-1]] == [batch] * (len(all_batches) - 1)
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1  # balanced to within one batch
    names = {image_name(0, j) for share in shares for b in share for j in b}
    assert names == {image_name(0, j) for j in jobs}


def test_numbering_starts_after_the_highest_existing_number(tmp_path):
    assert first_free_index(tmp_path / "missing") == 0
    assert first_free_index(tmp_path) == 0
    for name in ("00003-1.png", "00012-77.png", "grid-00099.png", "notes.txt", "0007-x.png", "00020-1.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert first_free_index(tmp_path) == 13
    assert image_name(13, Job(2, "a", 9)) == "00015-9.png"


def test_one_process_needs_no_communication():
    assert from_main_process(41, Rank(0, 1)) == 41


# ------------------------------------------------------------------------------------------------ accelerate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(home: Path) -> dict:
    """No user accelerate / HF config is read; one thread per process (2 processes share the test machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "HF_", "XDG_"))}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return {**env, "HOME": str(home), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _launch(args: list[str], home: Path) -> subprocess.CompletedProcess:
    """``accelerate launch`` on 2 CPU processes (gloo); tried again once if the port was taken meanwhile."""
    for _ in range(2):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
                  "--cpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                  str(_free_port()), *args]  # fmt: skip
        proc = subprocess.run(launch, capture_output=True, text=True, timeout=180, cwd=ROOT, env=_clean_env(home))
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            break
    return proc


def _files(folder: Path) -> dict[str, tuple[np.ndarray, dict]]:
    out = {}
    for p in sorted(folder.glob("*.png")):
        with Image.open(p) as im:
            out[p.name] = (np.asarray(im.convert("RGB")), dict(im.text))
    return out


def test_two_processes_write_the_files_of_one(tmp_path):
    pytest.importorskip("inference.pipeline")
    from ldm.bundle import save_bundle
    from ldm.cli import main
    from tests.test_format_native import random_bundle

    model = tmp_path / "tiny"
    save_bundle(random_bundle("sd1", seed=5), model)
    (tmp_path / "prompts.txt").write_text("a fox\n\na cat, at night\nthree\n")
    common = ["--model", str(model), "--prompt-file", str(tmp_path / "prompts.txt"), "--n", "2", "--batch", "2",
              "--steps", "2", "--sampler", "euler_ancestral", "--width", "16", "--height", "16", "--grid",
              "-q"]  # fmt: skip
    proc = _launch(["-m", "inference.txt2img", *common, "--out", str(tmp_path / "multi")], tmp_path)
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]
    multi = _files(tmp_path / "multi")
    # no --seed: the main process drew one and every process used it (6 consecutive seeds)
    seeds = sorted(int(name.split("-")[1].removesuffix(".png")) for name in multi if not name.startswith("grid"))
    assert len(seeds) == 6 and seeds == list(range(seeds[0], seeds[0] + 6)), sorted(multi)
    printed = sorted(Path(line).name for line in proc.stdout.split() if line.endswith(".png"))
    assert printed == sorted(multi)  # each image (and the grid, once) printed by the process that wrote it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1): CPU kernels round by thread count
    try:
        assert main(["txt2img", *common, "--out", str(tmp_path / "single"), "--seed", str(seeds[0])]) == 0
    finally:
        torch.set_num_threads(threads)
    single = _files(tmp_path / "single")
    assert sorted(single) == sorted(multi) == [f"{k:05d}-{seeds[0] + k}.png" for k in range(6)] + ["grid-00000.png"]
    for name, (pix, text) in single.items():
        diff = np.abs(multi[name][0].astype(int) - pix.astype(int))
        assert diff.max() == 0, f"{name}: {(diff > 0).sum()} values differ, by up to {diff.max()}"
        assert multi[name][1] == text, name
