"""The images a command makes, as a job list that any number of processes can share.

    jobs = make_jobs(["a fox", "a cat"], n=2, seed=10)
    # [Job(0, "a fox", 10), Job(1, "a fox", 11), Job(2, "a cat", 12), Job(3, "a cat", 13)]
    mine = process_share(list(batches(jobs, 4)), state)   # this process's batches (accelerate PartialState)
    name = image_name(start, job)                  # "00002-12.png" for start = 0

The list is prompt-major, n images per prompt, and image k gets seed ``seed + k``: the order and the seeds a single
``Pipeline(prompts, n=n, seed=seed)`` call uses. Since an image depends only on its prompt and seed (never on the
batch it is sampled in), any contiguous part of the list can be sampled on its own and gives the same pixels.

Several processes (``accelerate launch --num_processes N``) each take a disjoint contiguous part of the list of
network batches (``PartialState.split_between_processes``). Splitting whole batches rather than images means every
image is sampled in exactly the batch a single process would use, so the pixels match even where a batch could
matter (GPU kernels chosen by batch size; prompts longer than 75 tokens padded to the longest of their batch,
inference/conditioning.py). Files are named by the global job index, counted from the first free
number in the output folder (agreed on by all processes before any writes), so the set of files is the same as
that of a single-process run. What must be the same everywhere (a random seed, that first free number) is chosen
by the main process and broadcast.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, TypeVar

from .call_args import MAX_SEED

RANDOM_SEEDS = 2**32  # a random seed is drawn from [0, 2**32), as the web UIs do
_NUMBERED = re.compile(r"^(\d{5,})-.*\.png$")

T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    index: int  # position in the whole job list (prompt-major), the same in every process
    prompt: str
    seed: int


def make_jobs(prompts: Sequence[str], n: int, seed: int) -> list[Job]:
    """len(prompts) * n jobs, prompt-major; job k has seed ``seed + k``."""
    if not prompts:
        raise ValueError("no prompt: give at least one")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seed < 0 or seed + len(prompts) * n > MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**64 - {len(prompts) * n}] for {len(prompts) * n} images, got {seed}")
    return [Job(k, p, seed + k) for k, p in enumerate(p for p in prompts for _ in range(n))]


def batches(items: Sequence[T], size: int) -> Iterator[list[T]]:
    """Contiguous chunks of at most ``size`` items, in order."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def process_share(items: Sequence[T], state) -> list[T]:
    """This process's contiguous part of ``items`` (all of them with one process); the parts of all processes are
    disjoint and, in process order, together are ``items``. ``state`` is an ``accelerate.PartialState``."""
    with state.split_between_processes(list(items)) as mine:
        return list(mine)


def from_main_process(value: T, state) -> T:
    """The main process's ``value``, in every process (a broadcast; no communication with one process)."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list  # noqa: PLC0415 - only needed with several processes

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def shared_seed(seed: int | None, state) -> int:
    """``seed``, or a random one (the same in every process) when it is None."""
    return from_main_process(secrets.randbelow(RANDOM_SEEDS) if seed is None else seed, state)


def first_free_index(out_dir: str | Path) -> int:
    """1 + the largest number that starts a ``NNNNN-*.png`` file name in ``out_dir`` (0 if there is none), so a
    new run never overwrites the images of an earlier one."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in out_dir.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def shared_start_index(out_dir: str | Path, state) -> int:
    """``first_free_index`` as the main process sees it, before any process has written an image."""
    return from_main_process(first_free_index(out_dir), state)  # the main process looks before it writes


def image_name(start: int, job: Job) -> str:
    """The file name of ``job``'s image: ``{start + index:05d}-{seed}.png``."""
    return f"{start + job.index:05d}-{job.seed}.png"


def grid_name(start: int) -> str:
    return f"grid-{start:05d}.png"
