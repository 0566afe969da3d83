"""Batched, resumable, multi-process image generation from a prompt set.

Each image is one job with its own seed and a file name `{case_number:05d}_{seed}_{k}.png`, so the
base and the erased model's image of the same prompt and seed share a name and can be compared.
The plan (every image's prompt and settings) is written to metadata.jsonl before generating; a
restarted run skips the images already on disk, and under `accelerate launch` each process takes
its share of what is left.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch
from accelerate import PartialState
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from salun_sd.errors import UserError
from salun_sd.evaluation.imagefiles import read_metadata, write_metadata
from salun_sd.evaluation.prompts import PromptRecord

DEFAULT_SEED = 0
DEFAULT_GUIDANCE = 7.5
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Settings that must agree between a run and the images already in its output folder.
RUN_KEYS = ("prompt", "guidance", "height", "width", "steps", "model")


@dataclass(frozen=True)
class GenerationSettings:
    """What each prompt becomes; `seed`, `guidance`, `height`, `width` override the prompt set's own values when set."""

    images_per_prompt: int = 1
    seed: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None


@dataclass(frozen=True)
class ImageJob:
    """One image to generate: a prompt, the k-th image of it, with its own seed."""

    record: PromptRecord
    k: int
    seed: int
    guidance: float
    height: int
    width: int

    @property
    def file(self) -> str:
        return f"{self.record.case_number:05d}_{self.seed}_{self.k}.png"

    def metadata(self, steps: int, model: str) -> dict:
        r = self.record
        return {
            "file": self.file,
            "case_number": r.case_number,
            "prompt": r.prompt,
            "seed": self.seed,
            "k": self.k,
            "guidance": self.guidance,
            "height": self.height,
            "width": self.width,
            "steps": steps,
            "model": model,
            "categories": list(r.categories),
            "nudity_percentage": r.nudity_percentage,
            "class": r.class_name,
        }


@dataclass
class GenerationSummary:
    planned: int
    already_done: int
    generated_here: int


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` means half precision on a GPU (what published evaluations use) and fp32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def plan_jobs(records: Sequence[PromptRecord], settings: GenerationSettings, default_size: tuple[int, int], multiple_of: int = 8) -> list[ImageJob]:
    """Every image of the run: image k of a prompt uses seed + k, so image 0 matches a plain one-image call."""
    if settings.images_per_prompt < 1:
        raise UserError(f"--images-per-prompt must be at least 1, got {settings.images_per_prompt}.")
    jobs = []
    for r in records:
        seed = _first(settings.seed, r.seed, DEFAULT_SEED)
        height = _first(settings.height, r.height, default_size[0])
        width = _first(settings.width, r.width, default_size[1])
        if height % multiple_of or width % multiple_of:
            raise UserError(f"case {r.case_number}: image size {width}x{height} is not a multiple of {multiple_of}, which the VAE needs; pass --height/--width.")
        guidance = float(_first(settings.guidance, r.guidance, DEFAULT_GUIDANCE))
        jobs.extend(ImageJob(r, k, seed + k, guidance, height, width) for k in range(settings.images_per_prompt))
    return jobs


def _first(*values):
    return next(v for v in values if v is not None)


def record_plan(out: Path, jobs: Sequence[ImageJob], steps: int, model: str) -> None:
    """Merge this run's plan into metadata.jsonl; refuse to mix runs whose settings differ under one name."""
    entries = read_metadata(out)
    for job in jobs:
        new = job.metadata(steps, model)
        old = entries.get(job.file)
        if old is not None:
            changed = [key for key in RUN_KEYS if old.get(key) != new[key]]
            if changed:
                key = changed[0]
                raise UserError(
                    f"{out} already holds {job.file} made with {key}={old.get(key)!r}, but this run uses {key}={new[key]!r}. "
                    "Resuming must use the same settings; pass a new --out for a different run."
                )
        entries[job.file] = new
    write_metadata(out, entries.values())


def batches(jobs: Sequence[ImageJob], batch_size: int) -> Iterator[list[ImageJob]]:
    """Batches of jobs that can share one pipeline call (same guidance and size)."""
    for _, group in groupby(sorted(jobs, key=_call_settings), key=_call_settings):
        group = list(group)
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def _call_settings(job: ImageJob) -> tuple[float, int, int]:
    return job.guidance, job.height, job.width


def save_png(image, path: Path) -> None:
    """Write through a temporary name so a killed run leaves no truncated PNG that a restart would skip."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


@torch.inference_mode()
def generate_images(
    pipe: StableDiffusionPipeline,
    jobs: Sequence[ImageJob],
    out: str | Path,
    steps: int,
    model: str,
    batch_size: int = 4,
    state: PartialState | None = None,
) -> GenerationSummary:
    """Generate the jobs whose files are missing in `out`, split across the processes of `state`."""
    state = state or PartialState()
    out = Path(out)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        record_plan(out, jobs, steps, model)
    state.wait_for_everyone()
    todo = [job for job in jobs if not (out / job.file).exists()]
    state.wait_for_everyone()  # every process must see the same `todo` before any writes a file
    pipe = pipe.to(state.device)
    pipe.set_progress_bar_config(disable=True)
    generated = 0
    with state.split_between_processes(todo) as mine:
        where = f" (process 0 of {state.num_processes})" if state.num_processes > 1 else ""
        progress = tqdm(total=len(mine), desc=f"generate -> {out}{where}", unit="img", disable=not state.is_local_main_process)
        for batch in batches(mine, batch_size):
            first = batch[0]
            images = pipe(
                prompt=[job.record.prompt for job in batch],
                num_inference_steps=steps,
                guidance_scale=first.guidance,
                height=first.height,
                width=first.width,
                # CPU generators: the same seed gives the same image on any device.
                generator=[torch.Generator("cpu").manual_seed(job.seed) for job in batch],
            ).images
            for job, image in zip(batch, images):
                save_png(image, out / job.file)
            generated += len(batch)
            progress.update(len(batch))
        progress.close()
    state.wait_for_everyone()
    return GenerationSummary(planned=len(jobs), already_done=len(jobs) - len(todo), generated_here=generated)
