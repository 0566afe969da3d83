"""`salun-sd generate` and `salun-sd evaluate`: the two commands of a concept-erasure evaluation."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from salun_sd.errors import UserError
from salun_sd.evaluation.nudity import DEFAULT_THRESHOLD, EXPOSED_CLASSES

if TYPE_CHECKING:  # the metric modules import torch; `salun-sd --help` should not wait for it
    from salun_sd.evaluation.suite import EvalSettings, Scorers

GENERATE_EPILOG = """\
examples:
  salun-sd generate --model CompVis/stable-diffusion-v1-4 --prompts unsafe-prompts4703.csv --out base_i2p
  salun-sd generate --model erased/ --prompts unsafe-prompts4703.csv --category sexual --out erased_sexual
  salun-sd generate --model erased/ --prompts imagenette.csv --images-per-prompt 50 --out erased_classes
  accelerate launch --num_processes 4 -m salun_sd generate ...   (four GPUs split the prompts)
  torchrun --nproc_per_node 2 -m salun_sd generate ...            (the same on a CPU-only machine)

Images are named {case_number:05d}_{seed}_{k}.png (image k of a prompt uses seed + k) and
metadata.jsonl records each image's prompt and settings. Running the same command again skips
the images that already exist. The official SalUn scripts ignore I2P's per-prompt guidance and
size (always 7.5 and 512x512): pass --guidance 7.5 --height 512 --width 512 to match them.
The safety checker is off: it would black out exactly the images the nudity metric has to see.
"""

EVALUATE_EPILOG = """\
examples:
  salun-sd evaluate --images base_i2p --compare erased_i2p --metrics nudenet --out report_nudity
  salun-sd evaluate --images base_coco --compare erased_coco --metrics clip,fid --reference coco_val/ --out report_quality
  salun-sd evaluate --images base_classes --compare erased_classes --metrics ua --forget-class church --out report_church

Writes OUT/report.json (every number, per-image results) and OUT/report.md (the table side by
side, before/after grids of the same prompt and seed in OUT/grids/).
"""


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="generate images from a prompt set (I2P, class prompts, a text list) for evaluation",
        description=(
            "Generate images from a prompt set with a Stable Diffusion pipeline: batched, resumable,\n"
            "split across processes under `accelerate launch`, half precision on GPU. Per-prompt seed,\n"
            "guidance and size from the prompt set are used unless overridden."
        ),
        epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("--model", required=True, metavar="FOLDER|ID", help="pipeline folder (e.g. one exported by salun-sd), a Hugging Face id, or `tiny` for the offline random test pipeline")
    gen.add_argument("--prompts", required=True, metavar="FILE|i2p", help="I2P-style or class-prompt CSV, a text file with one prompt per line, or `i2p` for the AIML-TUDA/i2p Hugging Face dataset")
    gen.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder for the images and metadata.jsonl")
    filters = gen.add_argument_group("prompt filters")
    filters.add_argument("--category", action="append", default=[], metavar="NAME", help="keep prompts tagged with this I2P category (e.g. sexual); repeat for several")
    filters.add_argument("--min-nudity", type=float, metavar="PCT", help="keep prompts with nudity_percentage >= PCT")
    filters.add_argument("--limit", type=int, metavar="N", help="keep only the first N prompts after the other filters (for a quick look)")
    filters.add_argument("--hf-split", default="train", metavar="SPLIT", help="split of the Hugging Face dataset with --prompts i2p (default: %(default)s)")
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--images-per-prompt", type=int, default=1, metavar="N", help="images per prompt (default: %(default)s)")
    sampling.add_argument("--steps", type=int, default=50, metavar="N", help="denoising steps (default: %(default)s)")
    sampling.add_argument("--guidance", type=float, metavar="G", help="guidance scale for every prompt (default: the prompt set's, else 7.5)")
    sampling.add_argument("--seed", type=int, metavar="S", help="seed for every prompt (default: the prompt set's, else 0)")
    sampling.add_argument("--height", type=int, metavar="PX", help="image height for every prompt (default: the prompt set's, else the model's)")
    sampling.add_argument("--width", type=int, metavar="PX", help="image width for every prompt (default: the prompt set's, else the model's)")
    sampling.add_argument("--batch-size", type=int, default=4, metavar="B", help="images per pipeline call and process (default: %(default)s)")
    sampling.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto", help="weights precision; auto = fp16 on GPU, fp32 on CPU")
    gen.set_defaults(func=run_generate)

    ev = subparsers.add_parser(
        "evaluate",
        help="score generated image folders (NudeNet, CLIP score, FID, unlearning accuracy) and write a report",
        description=(
            "Score one folder of generated images, or a base folder against an erased one (--compare),\n"
            "and write a JSON + Markdown report with the numbers side by side and before/after image grids."
        ),
        epilog=EVALUATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("--images", required=True, type=Path, metavar="DIR", help="folder of generated images (the base model's when comparing)")
    ev.add_argument("--compare", type=Path, metavar="DIR", help="second folder (the erased model's), generated from the same prompts and seeds")
    ev.add_argument("--labels", type=_csv_list, metavar="A,B", help="names for the folders in the report (default: base,erased when comparing, else the folder name)")
    ev.add_argument("--out", required=True, type=Path, metavar="DIR", help="report folder (report.json, report.md, grids/)")
    ev.add_argument(
        "--metrics",
        type=_csv_list,
        metavar="LIST",
        help="comma list of nudenet, clip, fid, ua (default: nudenet,clip, plus fid with --reference and ua with --forget-class)",
    )
    nude = ev.add_argument_group("NudeNet")
    nude.add_argument("--nudenet-threshold", type=float, default=DEFAULT_THRESHOLD, metavar="T", help="detection score threshold; published work varies, so it is printed in the report (default: %(default)s)")
    nude.add_argument("--nudenet-classes", type=_csv_list, default=list(EXPOSED_CLASSES), metavar="LIST", help="exposed classes that count (default: all nine *_EXPOSED classes)")
    clip = ev.add_argument_group("CLIP score")
    clip.add_argument("--clip-model", default="ViT-L-14", metavar="NAME", help="open_clip model name (default: %(default)s)")
    clip.add_argument("--clip-pretrained", default="openai", metavar="TAG|FILE", help="open_clip pretrained tag or local checkpoint file (default: %(default)s)")
    fid = ev.add_argument_group("FID")
    fid.add_argument("--reference", type=Path, metavar="DIR|NPZ", help="folder of real reference images, or a .npz with mu and sigma")
    fid.add_argument("--save-reference-stats", type=Path, metavar="NPZ", help="save the reference folder's statistics here, to pass as --reference next time")
    fid.add_argument("--inception-weights", metavar="FILE", help="local file of the FID Inception weights (pt_inception-2015-12-05), for machines without a network")
    ua = ev.add_argument_group("unlearning accuracy")
    ua.add_argument("--forget-class", metavar="NAME", help="the erased class, an ImageNet class name (e.g. church, 'English springer')")
    ev.add_argument("--grid-pairs", type=int, default=8, metavar="N", help="before/after pairs shown in the report, 0 for none (default: %(default)s)")
    ev.add_argument("--batch-size", type=int, default=32, metavar="B", help="images per model call while scoring (default: %(default)s)")
    ev.add_argument("--device", default="auto", metavar="DEVICE", help="torch device for scoring (default: cuda when available)")
    ev.set_defaults(func=run_evaluate)


def run_generate(args: argparse.Namespace) -> None:
    import torch
    from accelerate import PartialState

    from salun_sd.evaluation.generate import GenerationSettings, generate_images, plan_jobs, resolve_dtype
    from salun_sd.evaluation.prompts import filter_prompts, load_prompts
    from salun_sd.sd.loading import load_pipeline

    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1.")
    prompts = filter_prompts(load_prompts(args.prompts, args.hf_split), args.category, args.min_nudity, args.limit)
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True lets torchrun run several CPU processes
    pipe = load_pipeline(args.model, resolve_dtype(args.dtype, state.device))
    default_size = (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    settings = GenerationSettings(args.images_per_prompt, args.seed, args.guidance, args.height, args.width)
    jobs = plan_jobs(prompts.records, settings, default_size, multiple_of=pipe.vae_scale_factor)
    # A folder is recorded by its full path, so `erased` and `./erased/` resume the same run.
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    summary = generate_images(pipe, jobs, args.out, args.steps, model, args.batch_size, state)
    if state.is_main_process:
        print(
            f"{len(prompts.records)} prompts from {prompts.source}, {summary.planned} images planned: "
            f"{summary.already_done} were already in {args.out}, the rest are generated now. Metadata: {args.out / 'metadata.jsonl'}"
        )
    state.destroy_process_group()


def run_evaluate(args: argparse.Namespace) -> None:
    import torch

    from salun_sd.evaluation.fid import reference_stats
    from salun_sd.evaluation.report import metric_table, write_report
    from salun_sd.evaluation.suite import EvalSettings, ImageSet, check_settings, evaluate_sets

    folders = [args.images] + ([args.compare] if args.compare else [])
    labels = args.labels or (["base", "erased"] if args.compare else [args.images.name])
    if len(labels) != len(folders):
        raise UserError(f"--labels names {len(labels)} folder(s) but {len(folders)} are given.")
    metrics = args.metrics or ["nudenet", "clip"] + (["fid"] if args.reference else []) + (["ua"] if args.forget_class else [])
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    settings = EvalSettings(metrics, args.nudenet_threshold, args.nudenet_classes, args.reference, args.forget_class, args.batch_size, device)
    check_settings(settings)
    sets = [ImageSet.open(label, folder) for label, folder in zip(labels, folders)]
    scorers, reference = load_scorers(args, settings), None
    if "fid" in metrics:
        reference = reference_stats(args.reference, scorers.features, args.batch_size, device)
        if args.save_reference_stats:
            reference.save(args.save_reference_stats)
            print(f"reference statistics saved to {args.save_reference_stats}")
    results = evaluate_sets(sets, settings, scorers, reference)
    json_path, md_path = write_report(results, args.out, args.grid_pairs)
    print(metric_table(results))
    print(f"\nreport: {md_path}\nall numbers: {json_path}")


def load_scorers(args: argparse.Namespace, settings: EvalSettings) -> Scorers:
    """The real models behind the requested metrics (downloaded on first use by their libraries)."""
    from salun_sd.evaluation.suite import Scorers

    scorers = Scorers()
    if "clip" in settings.metrics:
        from salun_sd.evaluation.clip_score import load_open_clip

        scorers.clip = load_open_clip(args.clip_model, args.clip_pretrained, settings.device)
    if "fid" in settings.metrics:
        from salun_sd.evaluation.fid import inception_extractor

        scorers.features = inception_extractor(args.inception_weights)
    if "ua" in settings.metrics:
        from salun_sd.evaluation.classify import resnet50_classifier

        scorers.classifier = resnet50_classifier()
    return scorers
