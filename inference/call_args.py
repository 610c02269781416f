"""Checks of the pipeline's call arguments (inference/pipeline.py ``Pipeline.request``): each names the argument and
what it must be, before any work."""
from __future__ import annotations

from typing import Sequence

from ldm.checks import check_int, check_number  # noqa: F401 (re-exported: inference/pipeline.py)

MAX_SEED = 2**64  # torch.Generator.manual_seed takes [0, 2**64)


def str_list(name: str, value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name}: must be a str or a sequence of str, got {type(value).__name__}")


def seed_list(seed, total: int) -> list[int] | None:
    """None (random, drawn at run time), an int s (s, s + 1, ...) or one int per image."""
    if seed is None:
        return None
    if isinstance(seed, int) and not isinstance(seed, bool):
        if not 0 <= seed <= MAX_SEED - total:
            raise ValueError(f"seed: must be in [0, 2**64 - {total}] so that all {total} image seeds fit, got {seed}")
        return [seed + k for k in range(total)]
    if isinstance(seed, Sequence) and not isinstance(seed, str):
        seeds = list(seed)
        if len(seeds) != total:
            raise ValueError(f"seed: a list needs one seed per image ({total} = prompts x n), got {len(seeds)}")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < MAX_SEED:
                raise ValueError(f"seed: every seed must be an integer in [0, 2**64), got {s!r}")
        return seeds
    raise ValueError(f"seed: must be None, an int or a list of ints, got {type(seed).__name__}")


def per_prompt(name: str, value, n_prompts: int) -> list | None:
    """None, one item for every prompt, or a list/tuple with one item per prompt."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != n_prompts:
            raise ValueError(f"{name}: a list needs one item per prompt ({n_prompts}), got {len(value)}")
        return list(value)
    return [value] * n_prompts
