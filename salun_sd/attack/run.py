"""`salun-sd attack`: every prompt of a prompt set, attacked one at a time, resumable, split over processes.

Per prompt: the base model's reference image (cached), the attacked model's image of the plain prompt (the
pre-attack verdict), then each attack unless the plain prompt already shows the concept (then, as in the
official code, it counts as a success without an attack). Each prompt's result is one JSON file written in one
step, so a killed run loses at most the prompt in progress and a restart skips the finished ones; under
`accelerate launch` each process takes its share of the unfinished prompts. All draws of a prompt's attack come
from a generator seeded by (attack_seed, case number), so any split over processes gives the same results.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from salun_sd.attack.config import AttackConfig
from salun_sd.attack.discrete import DiscretePrefix
from salun_sd.attack.embedding import EmbeddingPrefix
from salun_sd.attack.judges import Verdict, load_judge
from salun_sd.attack.report import write_report
from salun_sd.attack.search import search
from salun_sd.attack.target import Victim, attack_pipeline
from salun_sd.config import to_dict
from salun_sd.errors import UserError
from salun_sd.evaluation.config import GenerateConfig
from salun_sd.evaluation.generate import ImageJob, plan_jobs, record_plan, resolve_dtype, save_png
from salun_sd.evaluation.prompts import filter_prompts, load_prompts
from salun_sd.run.manifest import manifest, write_manifest
from salun_sd.families.loading import family_of, load_pipeline, scheduler_class
from salun_sd.generation import draw_images

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DiffusionPipeline

# Settings that decide a prompt's result: a resumed run must use the same ones.
RESULT_KEYS = ("model", "base", "judge", "concept", "nudenet_threshold", "nudenet_detector", "attacks", "k", "timesteps", "iterations", "learning_rate",
               "weight_decay", "embedding_learning_rate", "steps", "scheduler", "guidance", "seed", "height", "width", "attack_seed", "dtype")


def folders(cfg: AttackConfig) -> tuple[Path, Path, Path]:
    out = Path(cfg.output_dir)
    return out, Path(cfg.reference_dir) if cfg.reference_dir else out / "reference", out / "results"


def check_resume(cfg: AttackConfig) -> None:
    """Refuse to mix runs with different settings in one output folder."""
    path = Path(cfg.output_dir) / "manifest.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("config", {})
    new = to_dict(cfg)
    changed = [key for key in RESULT_KEYS if key in old and old[key] != new[key]]
    if changed:
        key = changed[0]
        raise UserError(f"{cfg.output_dir} holds results made with {key}={old[key]!r}, but this run uses {key}={new[key]!r}; pass a new --output_dir")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def result_path(results: Path, job: ImageJob) -> Path:
    return results / f"{job.record.case_number:05d}.json"


def attack(cfg: AttackConfig, accelerator: Accelerator, log=print) -> Path | None:
    """Attack every prompt without a result yet; the main process writes the report. Returns report.md (main process)."""
    cfg.check()
    check_resume(cfg)
    names = cfg.attack_names()
    scheduler = scheduler_class(cfg.scheduler)
    records = filter_prompts(load_prompts(cfg.prompts, cfg.hf_split), cfg.category, cfg.min_nudity, cfg.limit or None).records
    out, ref_dir, results = folders(cfg)
    device = accelerator.device
    judge = load_judge(cfg, str(device))  # a bad judge or concept fails before any model loads
    dtype = resolve_dtype(cfg.dtype, device)
    base = load_pipeline(cfg.base, dtype).to(device)
    target = base if Path(cfg.model).resolve() == Path(cfg.base).resolve() else load_pipeline(cfg.model, dtype).to(device)
    if scheduler is not None:
        for pipeline in {id(base): base, id(target): target}.values():
            pipeline.scheduler = scheduler.from_config(pipeline.scheduler.config)
    pipe = attack_pipeline(target, base)
    family = family_of(pipe)
    size = (family.default_size(pipe),) * 2
    sampling = GenerateConfig(steps=cfg.steps, seed=cfg.seed, guidance=cfg.guidance, height=cfg.height or None, width=cfg.width or None)
    jobs = plan_jobs(records, sampling, size, family.size_multiple(pipe))
    if accelerator.is_main_process:
        for folder in (results, *(out / "images" / n for n in ("plain", *names))):
            folder.mkdir(parents=True, exist_ok=True)
        ref_dir.mkdir(parents=True, exist_ok=True)
        # the cached references must come from the same base and settings
        record_plan(ref_dir, jobs, {"steps": cfg.steps, "model": cfg.base, "scheduler": type(base.scheduler).__name__, "seeding": sampling.seeding, "dtype": str(dtype).removeprefix("torch.")})
        write_manifest(out / "manifest.json", manifest(to_dict(cfg), "attack", processes=accelerator.num_processes))
    accelerator.wait_for_everyone()
    todo = [job for job in jobs if not result_path(results, job).exists()]
    accelerator.wait_for_everyone()  # every process must see the same `todo` before any writes
    victim = Victim(pipe, cfg.k, cfg.timesteps, cfg.steps, resolution=cfg.height or size[0])
    with accelerator.split_between_processes(todo) as mine:
        bar = tqdm(total=len(mine), desc=f"attack -> {out}", unit="prompt", disable=not accelerator.is_local_main_process)
        for start in range(0, len(mine), cfg.batch_size):
            chunk = mine[start : start + cfg.batch_size]
            for job, result in zip(chunk, attack_prompts(cfg, names, victim, base, chunk, [judge.for_prompt(j.record) for j in chunk], ref_dir, out / "images")):
                write_json(result_path(results, job), result)
            bar.update(len(chunk))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    done = [json.loads(result_path(results, job).read_text()) for job in jobs]
    _, md = write_report(cfg, done, names, judge.description, ref_dir)
    log(f"{len(todo)} of {len(jobs)} prompts attacked now, {len(jobs) - len(todo)} were already done; report: {md}")
    return md


@torch.no_grad()
def references(base: DiffusionPipeline, jobs: list[ImageJob], steps: int, ref_dir: Path) -> list[torch.Tensor]:
    """The base model's image of each job (cached as ref_dir/<job file>; the missing ones drawn in one batch) and its latent:
    the VAE mean, shifted and scaled as the family's training latents are (families/data.py)."""
    from salun_sd.evaluation.imagefiles import load_rgb

    missing = [job for job in jobs if not (ref_dir / job.file).exists()]
    for job, image in zip(missing, draw_images(base, [job.request for job in missing], steps, batch_size=max(1, len(missing)))):
        save_png(image, ref_dir / job.file)
    shift = base.vae.config.get("shift_factor") or 0.0  # None in SD-1/2/XL VAE configs
    latents = []
    for job in jobs:  # one at a time: a latent must not depend on the batch it was encoded in
        pixels = base.image_processor.preprocess(load_rgb(ref_dir / job.file)).to(base.vae.device, base.vae.dtype)
        latents.append((base.vae.encode(pixels).latent_dist.mean.float() - shift) * base.vae.config.scaling_factor)
    return latents


def attack_prompts(cfg: AttackConfig, names: list[str], victim: Victim, base: DiffusionPipeline, jobs: list[ImageJob], verdicts: list[Verdict],
                   ref_dir: Path, images: Path) -> list[dict]:
    """One result per job; the jobs' plain images, optimisation steps and judged images run as batches (search.py)."""
    results, live = [], []
    for n, job in enumerate(jobs):
        record = job.record
        results.append({"case_number": record.case_number, "prompt": record.prompt, "seed": job.seed, "guidance": job.guidance, "file": job.file})
        words = victim.prompt_tokens(record.prompt)
        if len(words) + cfg.k + 2 > victim.tokenizer.model_max_length:  # the official loader drops long prompts too (utils/datasets.py)
            results[n]["skipped"] = f"{len(words)} tokens + {cfg.k} prefix tokens do not fit the text encoder's {victim.tokenizer.model_max_length}"
            continue
        live.append(n)
    if not live:
        return results
    x0 = references(base, [jobs[n] for n in live], cfg.steps, ref_dir)
    cases = [victim.case(jobs[n].request, latent) for n, latent in zip(live, x0)]
    plains = victim.images(cases, None)
    loss_seeds = [cfg.attack_seed * 1_000_003 + jobs[n].record.case_number for n in live]
    for n, plain in zip(live, plains):
        save_png(plain, images / "plain" / jobs[n].file)
        results[n]["pre_success"] = bool(verdicts[n]([plain])[0])
        results[n]["attacks"] = {}
    todo = [m for m, n in enumerate(live) if not results[n]["pre_success"]]
    plain_losses = victim.reference_losses([cases[m] for m in todo], None, [loss_seeds[m] for m in todo])
    for m, n in enumerate(live):
        if results[n]["pre_success"]:  # text_grad_.py returns before attacking when the plain prompt succeeds
            for name in names:
                save_png(plains[m], images / name / jobs[n].file)
                results[n]["attacks"][name] = {"success": True, "blocks": 0, "adversarial_prompt": jobs[n].record.prompt}
    if not todo:
        return results
    for name in names:
        start = time.time()
        generators = [torch.Generator(victim.device).manual_seed(loss_seeds[m] * len(names) + names.index(name)) for m in todo]
        spaces = [DiscretePrefix(victim.clip_tables, cfg.k, cfg.learning_rate, cfg.weight_decay) if name == "discrete"
                  else EmbeddingPrefix(victim.tables, cfg.k, cfg.embedding_learning_rate) for _ in todo]
        outcomes = search(victim, [cases[m] for m in todo], spaces, cfg.iterations, [verdicts[live[m]] for m in todo], generators)
        attacked = victim.reference_losses([cases[m] for m in todo], [o.slots for o in outcomes], [loss_seeds[m] for m in todo])
        seconds = round((time.time() - start) / len(todo), 2)  # the batch's time, shared by its instances
        for m, outcome, plain_loss, attacked_loss in zip(todo, outcomes, plain_losses, attacked):
            n = live[m]
            save_png(outcome.image, images / name / jobs[n].file)
            entry = {"success": outcome.success, "blocks": outcome.blocks, "optimizer_steps": outcome.blocks * cfg.iterations, "loss_trace": outcome.loss_trace,
                     "reference_loss_plain": plain_loss, "reference_loss_attacked": attacked_loss, "seconds": seconds}
            if outcome.slots.ids is not None:
                entry["token_ids"] = outcome.slots.ids.tolist()
                entry["adversarial_prompt"] = victim.decode(outcome.slots.ids, cases[m])
            results[n]["attacks"][name] = entry
    return results
