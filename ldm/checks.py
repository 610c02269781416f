"""Checks of one integer or number with an error that names it: ``NAME: must be an integer >= LOW, got VALUE``.
Configs (``__post_init__``), the pipeline's call arguments (inference/call_args.py) and the library's functions use
the same two, so every such error reads alike. bool is refused where an integer or a number is asked for."""
from __future__ import annotations

import math


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """``value`` is an int (not a bool) in [low, high] (high None: no upper bound); else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: must be an integer {allowed}, got {value!r}")


def check_number(name: str, value, low: float, high: float | None = None) -> None:
    """``value`` is a finite int or float (not a bool) in [low, high]; else ValueError naming ``name``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: must be a number {allowed}, got {value!r}")
