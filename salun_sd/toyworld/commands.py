"""`salun-sd compare` (every method on the toy world) and the toy-world demo, as CLI subcommands.

Registered like the other jobs' modules: cli.COMMANDS maps a subcommand to this module's register().
"""

from __future__ import annotations

import argparse


def run_compare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from salun_sd.toyworld.compare import Case, CompareConfig, compare

    cfg = CompareConfig(methods=args.methods, steps=args.steps, eval_per_prompt=args.eval_per_prompt, seeds=args.seeds, **({"base": args.base} if args.base else {}))
    cases = [Case("shape", args.shape), Case("colour", args.colour)]
    print(f"wrote {compare(cfg, Path(args.output_dir), cases)}")


def run_demo(args: argparse.Namespace) -> None:
    from salun_sd.toyworld.demo import demo

    demo(args.output_dir)


def register(subparsers: argparse._SubParsersAction) -> None:
    from salun_sd.toyworld.compare import METHOD_TRAIN, CompareConfig

    p = subparsers.add_parser("compare", help="erase a shape and a colour of the toy world with every method; table + grids",
                              description="Same base, data and seeds for every method; measures UA, remaining accuracy, "
                              "a Fréchet distance in the toy classifier's features, and wall time.")
    p.add_argument("--output_dir", default="outputs/compare")
    p.add_argument("--base", default="", help="toy pipeline folder (default: the shipped one)")
    p.add_argument("--methods", nargs="+", default=list(METHOD_TRAIN))
    p.add_argument("--shape", default="circle")
    p.add_argument("--colour", default="red")
    p.add_argument("--steps", type=int, default=CompareConfig.steps)
    p.add_argument("--eval_per_prompt", type=int, default=CompareConfig.eval_per_prompt)
    p.add_argument("--seeds", type=int, nargs="+", default=CompareConfig().seeds, help="every run is repeated per seed; the table shows mean ± std")
    p.set_defaults(func=run_compare)
    p = subparsers.add_parser(
        "demo",
        help="erase 'circle' from the shipped toy Stable Diffusion on CPU; UA before/after, reload check, grid",
        description="The whole main job (data -> mask -> erase -> export) on the toy Stable Diffusion that ships with the "
        "package: no download, CPU, about a minute. The shipped classifier scores the model's samples before and after; "
        "the export is reloaded with from_pretrained in a fresh process and scored again.",
    )
    p.add_argument("--output_dir", default="outputs/demo", help="where the demo writes (replaced on each run; default: outputs/demo)")
    p.set_defaults(func=run_demo)
