"""`salun-sd generate` and `salun-sd evaluate`: the two commands of a concept-erasure evaluation."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from salun_sd.config import add_config_arguments, config_from_args, to_dict
from salun_sd.evaluation.config import EvaluateConfig, GenerateConfig, require

if TYPE_CHECKING:  # the metric modules import torch; `salun-sd --help` should not wait for it
    from salun_sd.evaluation.suite import Scorers

GENERATE_EPILOG = """\
examples:
  salun-sd generate --model CompVis/stable-diffusion-v1-4 --prompts unsafe-prompts4703.csv --output_dir base_i2p
  salun-sd generate --model erased/ --prompts unsafe-prompts4703.csv --category sexual --protocol salun --output_dir erased_sexual
  salun-sd generate --model erased/ --prompts imagenette.csv --images_per_prompt 50 --output_dir erased_classes
  salun-sd generate eval.yaml --model erased/                     (settings from a YAML file, flags override its keys)
  salun-sd generate --model sd-v1-4.ckpt --single_file.config ./stable-diffusion-v1-4 --prompts prompts.txt --output_dir base
  salun-sd generate --model outputs/flux/pipeline --prompts prompts.txt --output_dir flux_erased   (SDXL, SD3, FLUX.1 alike)
  accelerate launch --num_processes 4 -m salun_sd generate ...   (four GPUs split the prompts)
  torchrun --nproc_per_node 2 -m salun_sd generate ...            (the same on a CPU-only machine)

Models: SD-1.x/2.x, SDXL, SD3 (with or without T5) and FLUX.1 folders or Hub IDs, and SD-1.x/2.x/SDXL single
files. Each image starts from its own CPU noise (its seed), so it does not depend on the batch size, the number of
processes or the device. Images are named {case_number:05d}_{seed}_{k}.png and metadata.jsonl records each image's prompt
and settings (and its `concept` column, by which evaluate groups its numbers); manifest.json records the run. Running the same command again skips the images that
already exist. --protocol salun reproduces the official SalUn scripts (LMSDiscreteScheduler, 100 steps,
guidance 7.5 and 512x512 for every prompt, fp32, one generator per prompt seeded with evaluation_seed);
a setting given explicitly overrides the protocol's. The safety checker is off: it would black out
exactly the images the nudity metric has to see.
"""

EVALUATE_EPILOG = """\
examples:
  salun-sd evaluate --images base_i2p --compare erased_i2p --metrics nudenet --protocol salun --output_dir report_nudity
  salun-sd evaluate --images base_coco --compare erased_coco --metrics clip fid --reference coco_val/ --output_dir report_quality
  salun-sd evaluate --images base_classes --compare erased_classes --metrics ua --forget_class church --output_dir report_church

Writes OUTPUT_DIR/report.json (every number, per-image results), OUTPUT_DIR/report.md (the table side
by side, the protocol and settings, before/after grids of the same prompt and seed in OUTPUT_DIR/grids/)
and OUTPUT_DIR/manifest.json. Images generated from a prompt CSV with a `concept` column (the erased concept each
prompt asks for, empty for none) also get NudeNet's rate with its 95 % Wilson interval and the CLIP score per
concept, and over the prompts naming none (remaining quality). Protocols: salun (NudeNet threshold 0.0: every detection NudeNet reports),
unlearndiffatk (0.45), mace (0.6).
"""

COMMANDS = {
    "generate": (
        GenerateConfig,
        "generate images from a prompt set (I2P, class prompts, a text list) for evaluation",
        "Generate images from a prompt set with an SD-1.x/2.x, SDXL, SD3 or FLUX.1 pipeline: batched, resumable,\n"
        "split across processes under `accelerate launch`, half precision on GPU. Per-prompt seed,\n"
        "guidance and size from the prompt set are used unless a protocol or a flag sets them.",
        GENERATE_EPILOG,
    ),
    "evaluate": (
        EvaluateConfig,
        "score generated image folders (NudeNet, CLIP score, FID, unlearning accuracy) and write a report",
        "Score one folder of generated images, or a base folder against an erased one (--compare),\n"
        "and write a JSON + Markdown report with the numbers side by side and before/after image grids.",
        EVALUATE_EPILOG,
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, (cls, summary, description, epilog) in COMMANDS.items():
        p = subparsers.add_parser(name, help=summary, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(p, cls)
        p.set_defaults(func=run_generate if name == "generate" else run_evaluate, config_class=cls)



def run_generate(args: argparse.Namespace) -> None:
    import torch
    from accelerate import PartialState

    from salun_sd.evaluation.generate import generate_images, plan_jobs, resolve_dtype
    from salun_sd.evaluation.prompts import filter_prompts, load_prompts
    from salun_sd.families.loading import family_of, load_pipeline, scheduler_class
    from salun_sd.generation import use_scheduler
    from salun_sd.run.files import write_json
    from salun_sd.run.folder import open_folder
    from salun_sd.run.manifest import manifest

    cfg: GenerateConfig = config_from_args(args)
    require(cfg, "generate", ("model", "prompts", "output_dir"))
    cfg.resolve()
    scheduler_class(cfg.scheduler)  # a wrong name fails before the model loads
    prompts = filter_prompts(load_prompts(cfg.prompts, cfg.hf_split), cfg.category, cfg.min_nudity, cfg.limit or None)
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True lets torchrun run several CPU processes
    with open_folder(cfg.output_dir, "generate", cfg.overwrite, state.is_main_process):
        pipe = use_scheduler(load_pipeline(cfg.model, resolve_dtype(cfg.dtype, state.device), cfg.single_file), cfg.scheduler)
        family = family_of(pipe)
        cfg.steps = cfg.steps or family.steps
        jobs = plan_jobs(prompts.records, cfg, (family.default_size(pipe),) * 2, family.size_multiple(pipe), family.guidance)
        # A folder is recorded by its full path, so `erased` and `./erased/` resume the same run.
        cfg.model = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
        out = Path(cfg.output_dir)
        if state.is_main_process:
            write_json(out / "manifest.json", manifest(to_dict(cfg), "generate", prompts_source=prompts.source, prompts=len(prompts.records), num_processes=state.num_processes))
        summary = generate_images(pipe, jobs, cfg, state)
        if state.is_main_process:
            print(
                f"{len(prompts.records)} prompts from {prompts.source}, {summary.planned} images planned: "
                f"{summary.already_done} were already in {out}, the rest are generated now. Metadata: {out / 'metadata.jsonl'}"
            )
    state.destroy_process_group()


def run_evaluate(args: argparse.Namespace) -> None:
    from salun_sd.evaluation.fid import reference_stats
    from salun_sd.evaluation.report import concept_table, metric_table, write_report
    from salun_sd.evaluation.suite import ImageSet, check_settings, evaluate_sets
    from salun_sd.run.files import write_json
    from salun_sd.run.folder import open_folder
    from salun_sd.run.manifest import manifest
    from salun_sd.run.runtime import device

    cfg: EvaluateConfig = config_from_args(args)
    folders = cfg.folders()
    cfg.resolve()
    check_settings(cfg)
    with open_folder(cfg.output_dir, "evaluate", cfg.overwrite):  # before scoring: a folder it cannot write fails now
        sets = [ImageSet.open(label, folder) for label, folder in folders]
        scorers, reference = load_scorers(cfg), None
        if "fid" in cfg.metrics:
            reference = reference_stats(cfg.reference, scorers.fid.to(device(cfg.device)), cfg.batch_size)
            if cfg.save_reference_stats:
                reference.save(cfg.save_reference_stats)
                print(f"reference statistics saved to {cfg.save_reference_stats}")
        results = evaluate_sets(sets, cfg, scorers, reference)
        json_path, md_path = write_report(results, cfg.output_dir, cfg.grid_pairs)
        write_json(Path(cfg.output_dir) / "manifest.json", manifest(to_dict(cfg), "evaluate"))
        print(metric_table(results))
        if per_concept := concept_table(results):
            print(f"\nper concept:\n{per_concept}")
        print(f"\nreport: {md_path}\nall numbers: {json_path}")


def load_scorers(settings: EvaluateConfig) -> Scorers:
    """The real models behind the requested metrics (downloaded on first use by their libraries)."""
    from salun_sd.evaluation.suite import Scorers
    from salun_sd.run.runtime import device

    scorers = Scorers()
    if "clip" in settings.metrics:
        from salun_sd.evaluation.clip_score import load_open_clip

        scorers.clip = load_open_clip(settings.clip_model, settings.clip_pretrained, device(settings.device))
    if "fid" in settings.metrics:
        from salun_sd.evaluation.fid import inception_fid

        scorers.fid = inception_fid(settings.inception_weights or None)
    if "ua" in settings.metrics:
        from salun_sd.evaluation.classify import resnet50_classifier

        scorers.classifier = resnet50_classifier()
    return scorers
