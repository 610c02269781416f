"""``--inductor KEY=VALUE``: set torch._inductor.config.KEY (a JSON value; dotted keys such as
``triton.multi_kernel`` reach the sub-configs) for every compilation of a bench run; ``set_config`` sets such keys
(and ``ldm.MODULE.NAME`` constants) for a while and returns the old values (bench/ab_unet.py's variants)."""
from __future__ import annotations

import argparse
import json


def add_inductor_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set torch._inductor.config.KEY (JSON value) for every compilation of the run, e.g. "
                         "coordinate_descent_tuning=true or triton.multi_kernel=1 (repeatable)")  # fmt: skip


def apply_inductor_flags(ap: argparse.ArgumentParser, items: list[str]) -> None:
    """Set each KEY=VALUE; a bad key or a value that is not JSON is an argparse error naming it."""
    import torch._inductor.config as inductor_config

    for kv in items:
        key, _, value = kv.partition("=")
        if not hasattr(inductor_config, key):
            ap.error(f"--inductor: torch._inductor.config has no {key!r}")
        try:
            set_config({key: json.loads(value)})
        except json.JSONDecodeError:
            ap.error(f"--inductor {kv!r}: the value must be JSON (true, 3, \"name\"), got {value!r}")


def set_config(values: dict) -> dict:
    """Set torch._inductor.config keys (dotted for sub-configs) and ``ldm.MODULE.NAME`` constants; returns the old
    values, which the same call restores."""
    import importlib

    import torch._inductor.config as cfg

    old = {}
    for key, value in values.items():
        obj, _, leaf = key.rpartition(".")
        target = cfg
        if key.startswith("ldm."):
            target, obj = importlib.import_module(obj), ""
        for part in filter(None, obj.split(".")):
            target = getattr(target, part)
        old[key] = getattr(target, leaf)
        setattr(target, leaf, value)
    return old
