"""`salun-sd`: one command, one subcommand per job.

Each job's module owns its arguments (`register(subparsers)`) and its entry point, so this file
only lists them; `salun-sd JOB --help` shows what a job takes.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from salun_sd.errors import UserError

# module path -> the subcommands it registers (listed here so `--help` stays fast).
COMMAND_MODULES = [
    "salun_sd.sd.commands",
    "salun_sd.ddpm.commands",
    "salun_sd.evaluation.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="salun-sd",
        description=(
            "Erase a concept from a diffusion model with SalUn (saliency unlearning, Fan et al., ICLR 2024): "
            "find the UNet weights most sensitive to the concept, then fine-tune only those."
        ),
        epilog="Typical flow: `salun-sd run configs/nudity.yaml`, or step by step `salun-sd mask ...` then `salun-sd erase ...`.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        print(f"salun-sd {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
