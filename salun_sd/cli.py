"""`salun-sd`: one command, one subcommand per job.

Each job's module owns its arguments (`register(subparsers)`) and its entry point. This file lists
the jobs with a one-line summary and imports only the module of the job being run, so `--help`
does not wait for torch and diffusers to load.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from salun_sd.config import Parser
from salun_sd.errors import UserError
from salun_sd.run.runtime import exit_with_launcher

# subcommand -> (module that registers it, summary for the top-level --help)
COMMANDS = {
    "run": ("salun_sd.families.commands", "the whole job: data -> mask -> erase -> export"),
    "mask": ("salun_sd.families.commands", "compute the saliency mask of the forget set"),
    "erase": ("salun_sd.families.commands", "masked unlearning with an existing mask, then export"),
    "demo": ("salun_sd.toyworld.commands", "erase 'circle' from the embedded toy Stable Diffusion on CPU (about 1.5 minutes on 2 cores)"),
    "compare": ("salun_sd.toyworld.commands", "every method on the toy world: erase a shape and a colour, table + grids"),
    "generate": ("salun_sd.evaluation.commands", "generate images from a prompt set (I2P, class prompts, a text list)"),
    "evaluate": ("salun_sd.evaluation.commands", "score image folders (NudeNet, CLIP score, FID, UA) and write a report"),
    "attack": ("salun_sd.attack.commands", "attack a pipeline with adversarial prompts (UnlearnDiffAtk) and embeddings: pre-ASR, ASR, report"),
    "relearn": ("salun_sd.relearn.commands", "relearning attack: fine-tune the erased model on a few images of the concept; how fast UA falls"),
    "ddpm": ("salun_sd.ddpm.commands", "class-conditional CFG DDPM: train, sample, mask, erase, retrain, evaluate"),
    "classify": ("salun_sd.classify.commands", "SalUn for image classification: train, retrain, mask, forget, evaluate (UA, RA, TA, MIA-efficacy)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with full arguments for `command`'s module and summaries for the rest."""
    parser = Parser(
        prog="salun-sd",
        description=(
            "Erase a concept from a diffusion model with SalUn (saliency unlearning, Fan et al., ICLR 2024): "
            "find the UNet weights most sensitive to the concept, then fine-tune only those."
        ),
        epilog="Typical flow: `salun-sd run configs/nudity.yaml`, or step by step `salun-sd mask ...` then `salun-sd erase ...`. "
        "`salun-sd COMMAND --help` shows what a command takes.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    loaded = COMMANDS[command][0] if command in COMMANDS else None
    if loaded:
        importlib.import_module(loaded).register(subparsers)
    for name, (module, summary) in COMMANDS.items():
        if module != loaded:
            subparsers.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> None:
    exit_with_launcher()  # first, so a worker whose launcher dies while it imports torch stops too
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        print(f"salun-sd {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
