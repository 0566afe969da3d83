"""`salun-sd compare` (every method on the toy world) and the toy-world demo, as CLI subcommands.

Registered like the other jobs' modules: cli.COMMANDS maps a subcommand to this module's register().
"""

from __future__ import annotations

import argparse

from salun_sd.config import add_config_arguments, config_from_args

COMPARE_EPILOG = """examples:
  salun-sd compare                                   # all seven methods, seeds 0 1 2, with both attacks
  salun-sd compare --methods salun esd_x --seeds 0 --attack false --output_dir outputs/compare-quick
  salun-sd compare my_compare.yaml --attack_timesteps 10

Writes OUTPUT_DIR/RESULTS.md (tables, mean ± std over seeds), results.json (per-seed numbers), grids, manifest.json,
and runs/seed*/ with every erased model and its attack report."""


def run_compare(args: argparse.Namespace) -> None:
    from salun_sd.toyworld.compare import compare

    cfg = config_from_args(args)
    print(f"wrote {compare(cfg)}")


def run_demo(args: argparse.Namespace) -> None:
    from salun_sd.toyworld.demo import demo

    demo(args.output_dir)


def register(subparsers: argparse._SubParsersAction) -> None:
    from salun_sd.toyworld.compare import CompareConfig

    p = subparsers.add_parser("compare", help="erase a shape and a colour of the toy world with every method; table + grids",
                              description="Same base, data and seeds for every method; measures UA, remaining accuracy, "
                              "a Fréchet distance in the toy classifier's features, wall time, and the success of both attacks of "
                              "`salun-sd attack` (pre-ASR, ASR).", epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, CompareConfig)
    p.set_defaults(func=run_compare)
    p = subparsers.add_parser(
        "demo",
        help="erase 'circle' from the shipped toy Stable Diffusion on CPU; UA before/after, reload check, grid",
        description="The whole main job (data -> mask -> erase -> export) on the toy Stable Diffusion that ships with the "
        "package: no download, CPU, a few minutes at most. The shipped classifier scores the model's samples before and after; "
        "the export is reloaded with from_pretrained in a fresh process and scored again.",
    )
    p.add_argument("--output_dir", default="outputs/demo", help="where the demo writes (replaced on each run; default: outputs/demo)")
    p.set_defaults(func=run_demo)
