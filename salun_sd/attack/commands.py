"""`salun-sd attack`: UnlearnDiffAtk and an embedding-space attack on a pipeline, with a report."""

from __future__ import annotations

import argparse

from salun_sd.attack.config import AttackConfig
from salun_sd.config import add_config_arguments, config_from_args

EPILOG = """examples:
  salun-sd attack --model outputs/nudity/pipeline --prompts nudity.csv --judge nudenet --output_dir outputs/attack-nudity
  salun-sd attack --model outputs/church/pipeline --prompts church.csv --judge imagenet --concept church
  salun-sd attack configs/attack/toyworld.yaml           (the toy world, offline, after `salun-sd demo`)
  accelerate launch --num_processes 4 -m salun_sd attack ...      (four GPUs split the prompts)
  salun-sd attack configs/attack/nudity.yaml --prompts nudity.csv     (the published nudity settings, each with its source line)

Families: SD-1.x/2.x, SDXL, SD3 (with or without T5) and FLUX.1, folders or single files (--single_file.config).
The loss is the family's own training loss on the erase's denoiser. discrete searches CLIP's vocabulary: one
relaxed one-hot per prefix slot feeds every CLIP encoder (SDXL / SD3: both); T5 (SD3, FLUX) is not searched, it
reads the drawn prefix tokens as text before the prompt (no gradient), so the reported adversarial prompt, typed,
gives T5 what the search saw (CLIP sees it re-tokenised). embedding: free prefix embeddings in every text encoder,
T5's included (no prompt reproduces them). --batch_size N runs N instances per forward/backward: the same optimisation each, up to float rounding.

Writes OUTPUT_DIR/results/<case>.json per prompt (a rerun skips finished prompts), images/, report.json and
report.md (pre-ASR; the ASR of the discrete attack, typed and as optimised ids, of the embedding attack and of
the random baseline, the chance floor; every rate over every prompt of the set, with counts and 95 % Wilson
intervals, and per concept when the prompt CSV has a concept (or class) column; adversarial prompts; base /
plain / attacked images side by side). The toyworld judge without --concept judges each prompt on its own
concept column."""


def run_attack(args: argparse.Namespace) -> None:
    from salun_sd.run.folder import open_folder
    from salun_sd.run.runtime import finish, make_accelerator

    cfg = config_from_args(args)
    cfg.check()
    accelerator = make_accelerator("no")
    with open_folder(cfg.output_dir, "attack", cfg.overwrite, accelerator.is_main_process):
        from salun_sd.attack.run import attack  # diffusers loads after a busy folder is refused

        attack(cfg, accelerator)
    finish(accelerator)


def register(subparsers: argparse._SubParsersAction) -> None:
    summary = "attack a pipeline with adversarial prompts (UnlearnDiffAtk), prefix embeddings and a random baseline; pre-ASR, ASR, report"
    p = subparsers.add_parser("attack", help=summary, description=summary, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, AttackConfig)
    p.set_defaults(func=run_attack)
