"""`salun-sd relearn`: its own command, not an `attack` mode, because it changes weights and its settings (images,
steps, learning rate) share nothing with the prompt searches'."""

from __future__ import annotations

import argparse

from salun_sd.config import add_config_arguments, config_from_args
from salun_sd.relearn.config import RelearnConfig

EPILOG = """examples:
  salun-sd relearn --model outputs/nudity/pipeline --prompts "a photo of a nude person" --judge nudenet --output_dir outputs/relearn-nudity
  salun-sd relearn configs/relearn/toyworld.yaml      (the toy world, offline, after `salun-sd demo`)

Writes OUTPUT_DIR/report.md (UA of the erased and of the base model after 0, 25, 50, ... fine-tuning steps, with
Wilson 95 % intervals), report.json, grid.png, and per target (model, base) curve.json, log.jsonl and samples/.
A rerun with the same settings reuses finished curves."""


def run_relearn(args: argparse.Namespace) -> None:
    from salun_sd.run.folder import open_folder

    cfg = config_from_args(args)
    cfg.check()
    with open_folder(cfg.output_dir, "relearn", cfg.overwrite):
        from salun_sd.relearn.run import relearn  # torch and diffusers load after a busy folder is refused

        print(f"wrote {relearn(cfg)}")


def register(subparsers: argparse._SubParsersAction) -> None:
    summary = "relearning attack: fine-tune the erased model and the base on a few images of the concept; UA after each stretch of steps"
    p = subparsers.add_parser("relearn", help=summary, description=summary, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, RelearnConfig)
    p.set_defaults(func=run_relearn)
