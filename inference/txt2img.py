"""``python -m inference.txt2img ...``: ``ldm txt2img`` as a module, for launchers that run modules.

    accelerate launch --num_processes 2 -m inference.txt2img --model sd15 --prompt-file prompts.txt --n 8

The same parser and code as ``ldm txt2img`` (inference/generate_cli.py); each process samples its part of the job
list (inference/jobs.py). img2img and inpaint run the same way through the ``ldm`` module:
``accelerate launch -m ldm.cli img2img ...``.
"""
from __future__ import annotations

import argparse
import sys

from .generate_cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm")
    parser.error = lambda message: parser.exit(2, f"ldm txt2img: error: {message}\n")  # e.g. unknown arguments
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["txt2img", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ValueError as e:  # bad input: one line, exit code 2, as ldm/cli.py does
        print(f"ldm txt2img: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
