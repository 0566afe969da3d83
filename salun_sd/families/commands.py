"""`salun-sd mask | erase | run | demo` for Stable Diffusion."""

from __future__ import annotations

import argparse
from functools import partial

from salun_sd.config import add_config_arguments, config_from_args
from salun_sd.run.folder import open_folder
from salun_sd.run.runtime import finish, make_accelerator
from salun_sd.families.config import EraseConfig

STEPS = {
    "mask": (("mask",), "compute the saliency mask of the forget set (writes OUTPUT_DIR/mask.safetensors)"),
    "erase": (("erase",), "masked unlearning with an existing mask, then export (writes OUTPUT_DIR/pipeline)"),
    "run": (("mask", "erase"), "the whole job: data -> mask -> erase -> export"),
}

EPILOG = """examples:
  salun-sd run configs/nudity.yaml
  salun-sd run configs/nudity.yaml --model ./stable-diffusion-v1-4 --output_dir outputs/nudity
  salun-sd erase configs/methods/esd_u.yaml                # a baseline (configs/methods/: esd_x, esd_u, fmn, ga, rl, ft, uce)
  accelerate launch --num_processes 4 -m salun_sd run configs/nudity.yaml --unlearn.batch_size 2
  salun-sd erase configs/nudity.yaml --unlearn.resume_from_checkpoint latest   # continue an interrupted run

The erased model loads with StableDiffusionPipeline.from_pretrained("OUTPUT_DIR/pipeline")."""



def run_steps(args: argparse.Namespace, steps: tuple[str, ...]) -> None:
    cfg = config_from_args(args)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.unlearn.report_to, cfg.output_dir)
    with open_folder(cfg.output_dir, "+".join(steps), cfg.overwrite, accelerator.is_main_process):
        from salun_sd.families.erase import erase  # diffusers loads only when a job runs, and after a busy folder is refused

        erase(cfg, accelerator, steps)
    finish(accelerator)


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, (steps, summary) in STEPS.items():
        p = subparsers.add_parser(name, help=summary, description=summary, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(p, EraseConfig)
        p.add_argument("--method", dest="cfg:unlearn.method", metavar="STR", default=None, help="the erasing method: shorthand for --unlearn.method (listed there)")
        p.set_defaults(func=partial(run_steps, steps=steps))
