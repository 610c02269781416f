"""``ldm train CONFIG [KEY=VALUE ...]``: the command-line face of training/train.py.

Registered as a plugin of the ``ldm`` command (pyproject.toml, entry point group ``ldm.commands``). This module
stays light (argparse only) so ``ldm --help`` does not import torch's training stack; the trainer is imported
when the command runs. Multi-process runs go through Accelerate, with the same arguments:

    accelerate launch --config_file configs/accelerate/ddp.yaml -m training.train CONFIG [KEY=VALUE ...]
"""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Train or fine-tune a latent diffusion model on a local dataset (or the builtin 'shapes' dataset).

CONFIG is a YAML file of TrainConfig settings (see configs/train/tiny.yaml and docs/training.md); each
KEY=VALUE after it overrides one setting, with dotted keys:

  ldm train configs/train/tiny.yaml max_steps=200 optim.lr=3e-4 ema.decay=0.999
  ldm train my.yaml model.source=sd15.safetensors data.source=./photos lora.rank=8
  ldm train my.yaml resume=never output_dir=runs/again

With no CONFIG, `ldm train` trains the embedded default (a VAE, then a U-Net and text tower of the
builtin shapes world) at CPU scale into runs/default; configs/train/shapes-vae.yaml and shapes.yaml are its
full-size (GPU) configurations.

Every setting is checked before any model is loaded; an error names the key. The run writes to output_dir:
checkpoints/ (resumable step folders and a 'latest' pointer; with resume=auto a rerun continues from
there, mid-epoch), logs/ (metrics.jsonl, and TensorBoard events when tensorboard is installed),
validation/ (PNG grids) and, at the end, model/ (an ldm bundle), model-ema/ and lora.safetensors when
EMA / LoRA are on.

Several GPUs or machines: run the same command through Accelerate, e.g.
  accelerate launch --config_file configs/accelerate/ddp.yaml -m training.train CONFIG [KEY=VALUE ...]
batch_size is per process: an optimizer step sees batch_size * grad_accum * processes images."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", nargs="?", default=None,
                        help="YAML file with the TrainConfig settings; none: train the embedded default's two "
                             "stages at CPU scale into runs/default (training/recipe.py; 7-8.5 minutes on 2 cores, "
                             "a model that draws the asked colour and shape of one object ~7 times in 10)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override settings, e.g. optim.lr=3e-4")
    parser.add_argument("--resume", metavar="WHERE", default=None,
                        help="'latest' (the newest complete checkpoint in output_dir; an error if there is none), "
                             "'auto' (that one if any, the default), 'never', or a checkpoint folder; "
                             "the same as the override resume=WHERE")  # fmt: skip
    parser.add_argument("--print-config", action="store_true",
                        help="print the complete, validated configuration as YAML and exit")  # fmt: skip


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train or fine-tune a model (Accelerate; LoRA, EMA, resumable checkpoints)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .train import run_args

    return run_args(args)
