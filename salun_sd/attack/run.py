"""`salun-sd attack`: every prompt of a prompt set, attacked one at a time, resumable, split over processes.

Per prompt: the base model's reference image (cached), the attacked model's image of the plain prompt (the
pre-attack verdict), then each attack and the random baseline unless the plain prompt already shows the
concept (then, as in the official code, it counts as a success without an attack). Every prompt of the set
counts in every rate: one too long for k prefix tokens is judged on its plain prompt (truncated as the
tokenizer does) and counts as a failure of each attack, never dropped. Each prompt's result is one JSON file written in one
step, so a killed run loses at most the prompt in progress and a restart skips the finished ones; under
`accelerate launch` each process takes its share of the unfinished prompts. All draws of a prompt's attack come
from a generator seeded by (attack_seed, case number), so any split over processes gives the same results.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from salun_sd.attack.baseline import random_prefixes
from salun_sd.attack.config import AttackConfig
from salun_sd.attack.discrete import DiscretePrefixes
from salun_sd.attack.embedding import EmbeddingPrefixes
from salun_sd.attack.judges import Verdict, load_judge
from salun_sd.attack.report import write_report
from salun_sd.attack.search import search
from salun_sd.attack.target import Victim, attack_pipeline
from salun_sd.config import to_dict
from salun_sd.errors import UserError
from salun_sd.evaluation.config import GenerateConfig
from salun_sd.evaluation.generate import ImageJob, plan_jobs, record_plan, resolve_dtype
from salun_sd.evaluation.prompts import filter_prompts, load_prompts
from salun_sd.run.files import save_image, write_json
from salun_sd.run.manifest import manifest
from salun_sd.families.loading import family_of, load_pipeline, scheduler_class
from salun_sd.generation import draw_images

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DiffusionPipeline

# Settings that decide a prompt's result: a resumed run must use the same ones.
RESULT_KEYS = ("model", "base", "judge", "imagenet_model", "concept", "nudenet_threshold", "nudenet_detector", "attacks", "random_prefixes", "k", "timesteps",
               "iterations", "learning_rate", "weight_decay", "embedding_learning_rate", "steps", "scheduler", "reference_steps", "reference_guidance",
               "guidance", "seed", "height", "width", "attack_seed", "dtype")


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
    judge = load_judge(cfg, str(device))
    verdict_of = {record.case_number: judge.for_prompt(record) for record in records}  # a bad judge or concept fails before any model loads
    dtype = resolve_dtype(cfg.dtype, device)
    base = load_pipeline(cfg.base, dtype, cfg.single_file).to(device)
    target = base if Path(cfg.model).resolve() == Path(cfg.base).resolve() else load_pipeline(cfg.model, dtype, cfg.single_file).to(device)
    if scheduler is not None:
        for pipeline in {id(base): base, id(target): target}.values():
            pipeline.scheduler = scheduler.from_config(pipeline.scheduler.config)
    encoder = text_encoder_source(target, base)
    pipe = attack_pipeline(target, target if encoder == "target" else base)
    pipe.register_modules(tokenizer=eos_padded(pipe.tokenizer))
    family = family_of(pipe)
    size = (family.default_size(pipe),) * 2
    sampling = GenerateConfig(steps=cfg.steps, seed=cfg.seed, guidance=cfg.guidance, height=cfg.height or None, width=cfg.width or None)
    jobs = plan_jobs(records, sampling, size, family.size_multiple(pipe))
    if accelerator.is_main_process:
        for folder in (results, *(out / "images" / n for n in ("plain", *names, *(["discrete-ids"] if "discrete" in names else [])))):
            folder.mkdir(parents=True, exist_ok=True)
        ref_dir.mkdir(parents=True, exist_ok=True)
        # the cached references must come from the same base and settings
        record_plan(ref_dir, [reference_job(cfg, job) for job in jobs], {"steps": cfg.reference_steps, "model": cfg.base, "scheduler": type(base.scheduler).__name__,
                                                                          "seeding": sampling.seeding, "dtype": str(dtype).removeprefix("torch.")})
        write_json(out / "manifest.json", manifest(to_dict(cfg), "attack", processes=accelerator.num_processes))
    accelerator.wait_for_everyone()
    todo = [job for job in jobs if not result_path(results, job).exists()]
    accelerator.wait_for_everyone()  # every process must see the same `todo` before any writes
    victim = Victim(pipe, cfg.k, cfg.timesteps, cfg.steps, resolution=cfg.height or size[0])
    with accelerator.split_between_processes(todo) as mine:
        bar = tqdm(total=len(mine), desc=f"attack -> {out}", unit="prompt", disable=not accelerator.is_local_main_process)
        for start in range(0, len(mine), cfg.batch_size):
            chunk = mine[start : start + cfg.batch_size]
            for job, result in zip(chunk, attack_prompts(cfg, names, victim, base, chunk, [verdict_of[j.record.case_number] for j in chunk], ref_dir, out / "images")):
                write_json(result_path(results, job), result)
            bar.update(len(chunk))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    done = [json.loads(result_path(results, job).read_text()) for job in jobs]
    _, md = write_report(cfg, done, names, judge.description, ref_dir, ENCODERS[encoder])
    log(f"{len(todo)} of {len(jobs)} prompts attacked now, {len(jobs) - len(todo)} were already done; report: {md}")
    return md


ENCODERS = {"base": "the base model's (the attacked model's own has the same weights)",
            "target": "the attacked model's own (its weights differ from the base model's: the erase changed it)"}


def text_encoder_source(target: DiffusionPipeline, base: DiffusionPipeline) -> str:
    """`target` when any text encoder of the attacked pipeline differs from the base's (a text-encoder erasure,
    which classifier_.py loads into the encoder), else `base`."""
    if target is base:
        return "base"
    for name, module in target.components.items():
        if name.startswith("text_encoder") and module is not None:
            other = base.components.get(name)
            ours, theirs = module.state_dict(), other.state_dict() if other is not None else {}
            if ours.keys() != theirs.keys() or any(not torch.equal(ours[key], theirs[key].to(ours[key].device)) for key in ours):
                return "target"
    return "base"


def eos_padded(tokenizer):
    """A copy of the tokenizer that pads with end-of-text, as the official attack tokenises (text_grad_.py: pad_token = eos_token)."""
    padded = copy.deepcopy(tokenizer)
    padded.pad_token = padded.eos_token
    rewrap = getattr(padded, "_wrap_decode_method_backend_tokenizer", None)
    if rewrap is not None:  # transformers' CLIP tokenizer patches its backend's decode at init (drops "</w>"); a deep copy loses the patch
        rewrap()
    return padded


def reference_job(cfg: AttackConfig, job: ImageJob) -> ImageJob:
    """The reference image of a judged image's job: the same prompt, seed and size at the reference guidance (generate_dataset.py)."""
    return replace(job, guidance=cfg.reference_guidance)


@torch.no_grad()
def references(base: DiffusionPipeline, jobs: list[ImageJob], steps: int, ref_dir: Path) -> list[torch.Tensor]:
    """The base model's image of each job (cached as ref_dir/<job file>; the missing ones drawn in one batch) and its latent:
    the VAE mean, shifted and scaled as the family's training latents are (families/data.py)."""
    from salun_sd.evaluation.imagefiles import load_rgb

    missing = [job for job in jobs if not (ref_dir / job.file).exists()]
    for job, image in zip(missing, draw_images(base, [job.request for job in missing], steps, batch_size=max(1, len(missing)))):
        save_image(image, ref_dir / job.file)
    shift = base.vae.config.get("shift_factor") or 0.0  # None in SD-1/2/XL VAE configs
    latents = []
    for job in jobs:  # one at a time: a latent must not depend on the batch it was encoded in
        pixels = base.image_processor.preprocess(load_rgb(ref_dir / job.file)).to(base.vae.device, base.vae.dtype)
        latents.append((base.vae.encode(pixels).latent_dist.mean.float() - shift) * base.vae.config.scaling_factor)
    return latents


def attack_prompts(cfg: AttackConfig, names: list[str], victim: Victim, base: DiffusionPipeline, jobs: list[ImageJob], verdicts: list[Verdict],
                   ref_dir: Path, images: Path) -> list[dict]:
    """One result per job; the jobs' plain images, optimisation steps and judged images run as batches (search.py)."""
    results = []
    for job in jobs:
        record = job.record
        results.append({"case_number": record.case_number, "prompt": record.prompt, "seed": job.seed, "guidance": job.guidance, "file": job.file,
                        **({"concept": record.named_concept} if record.named_concept else {})})
        words, room = victim.prompt_tokens(record.prompt), victim.tokenizer.model_max_length
        if len(words) + cfg.k + 2 > room:  # no room for the prefix: each attack fails, the prompt stays in the denominator
            results[-1]["too_long"] = f"{len(words)} tokens + {cfg.k} prefix tokens do not fit the text encoder's {room}"
    x0 = references(base, [reference_job(cfg, job) for job in jobs], cfg.reference_steps, ref_dir)
    cases = [victim.case(job.request, latent) for job, latent in zip(jobs, x0)]
    plains = victim.images(cases, None)  # a long prompt truncated, as the tokenizer does for the official plain image
    loss_seeds = [cfg.attack_seed * 1_000_003 + job.record.case_number for job in jobs]
    for job, result, plain, verdict in zip(jobs, results, plains, verdicts):
        save_image(plain, images / "plain" / job.file)
        result["pre_success"] = bool(verdict([plain])[0])
        result["attacks"] = {}
        if result["pre_success"] or "too_long" in result:  # text_grad_.py returns before attacking when the plain prompt succeeds
            for name in names:  # the image columns show the plain prompt's
                save_image(plain, images / name / job.file)
                result["attacks"][name] = ({"success": True, "blocks": 0, "adversarial_prompt": job.record.prompt} if result["pre_success"]
                                           else {"success": False, "not_run": result["too_long"]})
    todo = [n for n, result in enumerate(results) if not result["attacks"]]
    if not todo:
        return results
    plain_losses = victim.reference_losses([cases[n] for n in todo], None, [loss_seeds[n] for n in todo])
    for name in names:
        start = time.time()
        generators = [torch.Generator(victim.device).manual_seed(loss_seeds[n] * len(names) + names.index(name)) for n in todo]
        if name == "random":
            drawn = random_prefixes(victim, [cases[n] for n in todo], cfg.random_count(), [verdicts[n] for n in todo], generators)
            seconds = round((time.time() - start) / len(todo), 2)
            for n, outcome in zip(todo, drawn):
                save_image(outcome.image, images / name / jobs[n].file)
                results[n]["attacks"][name] = {"success": outcome.success, "judged": outcome.judged, "token_ids": outcome.ids.tolist(),
                                               "adversarial_prompt": outcome.text, "seconds": seconds}
            continue
        space = (DiscretePrefixes(victim.clip_tables, len(todo), cfg.k, cfg.learning_rate, cfg.weight_decay) if name == "discrete"
                 else EmbeddingPrefixes(victim.tables, len(todo), cfg.k, cfg.embedding_learning_rate))
        outcomes = search(victim, [cases[n] for n in todo], space, cfg.iterations, [verdicts[n] for n in todo], generators)
        attacked = victim.reference_losses([cases[n] for n in todo], [o.slots for o in outcomes], [loss_seeds[n] for n in todo])
        # the optimised ids' own images (the discrete attack is judged on its prompt as typed), drawn together
        ids_images = victim.images([cases[n] for n in todo], [o.slots for o in outcomes]) if name == "discrete" else []
        seconds = round((time.time() - start) / len(todo), 2)  # the batch's time, shared by its instances
        for m, (n, outcome, plain_loss, attacked_loss) in enumerate(zip(todo, outcomes, plain_losses, attacked)):
            save_image(outcome.image, images / name / jobs[n].file)
            entry = {"success": outcome.success, "blocks": outcome.blocks, "optimizer_steps": outcome.blocks * cfg.iterations, "loss_trace": outcome.loss_trace,
                     "reference_loss_plain": plain_loss, "reference_loss_attacked": attacked_loss, "seconds": seconds}
            if outcome.slots.ids is not None:  # success is the typed prompt's verdict, as the official code judges; the optimised ids' own is kept beside it
                entry["token_ids"] = outcome.slots.ids.tolist()
                entry["adversarial_prompt"] = victim.decode(outcome.slots.ids, cases[n])
                save_image(ids_images[m], images / "discrete-ids" / jobs[n].file)
                entry["ids_success"] = bool(verdicts[n]([ids_images[m]])[0])
            results[n]["attacks"][name] = entry
    return results
