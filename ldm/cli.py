"""The ``ldm`` command line: one entry point, one subcommand per job.

Subcommands are plugins: each package that provides commands declares a ``register(subparsers)`` function
under the ``ldm.commands`` entry-point group in pyproject.toml (``txt2img = "inference.cli:register"`` ...).
This module discovers them, so the core names no package above it, and ``training`` and ``inference`` never
import each other. A ``register`` adds its parser with ``set_defaults(func=run)``; ``run(args) -> int``.

Built in here: ``ldm config`` (show and check a preset with overrides) and ``ldm samplers``.
"""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

EPILOG = "Run 'ldm COMMAND --help' for the options of a command."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm",
        description="Latent diffusion in the Stable Diffusion style: sample, train, convert, evaluate.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    _register_builtin(sub)
    for ep in sorted(entry_points(group="ldm.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except Exception as e:  # a broken plugin must not take `ldm --help` down with it
            print(f"ldm: warning: command {ep.name!r} ({ep.value}) failed to load: {e}", file=sys.stderr)
            continue
        register(sub)
    return parser


def _register_builtin(sub) -> None:
    p = sub.add_parser(
        "config",
        help="print a preset merged with overrides, after validation",
        description="Load a preset (a name from configs/ or a YAML path), apply key=value overrides, validate "
        "every key and print the result as YAML. Errors name the key, its type and the allowed values.",
    )
    p.add_argument("preset", nargs="?", default=None, help="preset name (see --list) or YAML file; default: built-in defaults")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. sampler.steps=30 sampler.name=euler")
    p.add_argument("--list", action="store_true", help="list the shipped presets and exit")
    p.set_defaults(func=_run_config)

    p = sub.add_parser("samplers", help="list the samplers", description="List the registered samplers.")
    p.set_defaults(func=_run_samplers)


def _run_config(args) -> int:
    from .config import list_presets, load_config, to_yaml
    from .run_config import RunConfig

    if args.list:
        print("\n".join(list_presets()))
        return 0
    print(to_yaml(load_config(RunConfig, args.preset, args.overrides)), end="")
    return 0


def _run_samplers(args) -> int:
    from .samplers import SAMPLERS, STOCHASTIC

    for name, fn in sorted(SAMPLERS.items()):
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        print(f"{name:<16} {'stochastic' if name in STOCHASTIC else 'deterministic':<13} {doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as e:  # bad input: one line, exit code 2, no traceback
        print(f"ldm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
