"""Batched, resumable, multi-process image generation from a prompt set.

Each image is one job with its own seed and a file name `{case_number:05d}_{seed}_{k}.png`, so the
base and the erased model's image of the same prompt and seed share a name and can be compared.
Images are drawn by salun_sd.generation (keyed CPU noise: the same seed gives the same image whatever the batch,
process or device): image k of a prompt is draw 0 of seed + k (`per_image`), or draw k of the prompt's seed
(`per_prompt`, the official SalUn scripts' one generator per prompt).
The plan (every image's prompt and settings) is written to metadata.jsonl before generating; a
restarted run skips the images already on disk, and under `accelerate launch` each process takes
its share of what is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from salun_sd.errors import UserError
from salun_sd.evaluation.config import GenerateConfig
from salun_sd.evaluation.imagefiles import read_metadata, write_metadata
from salun_sd.evaluation.prompts import PromptRecord
from salun_sd.families.loading import family_of
from salun_sd.generation import ImageRequest, draw_batches
from salun_sd.run.files import save_image

DEFAULT_SEED = 0
DEFAULT_GUIDANCE = 7.5
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Settings that must agree between a run and the images already in its output folder.
RUN_KEYS = ("prompt", "guidance", "height", "width", "steps", "model", "scheduler", "seeding")


@dataclass(frozen=True)
class ImageJob:
    """One image to generate: a prompt, the k-th image of it, and where its starting noise comes from."""

    record: PromptRecord
    k: int
    seed: int
    guidance: float
    height: int
    width: int
    draw: int = 0  # which draw of the generator seeded with `seed` is this image's noise

    @property
    def request(self) -> ImageRequest:
        return ImageRequest(self.record.prompt, self.seed, self.height, self.width, self.guidance, self.draw)

    @property
    def file(self) -> str:
        return f"{self.record.case_number:05d}_{self.seed}_{self.k}.png"

    def metadata(self, run: dict) -> dict:
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
            **run,
            "categories": list(r.categories),
            "nudity_percentage": r.nudity_percentage,
            "class": r.class_name,
            "concept": r.concept,  # evaluate groups its numbers by it
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


def plan_jobs(records: Sequence[PromptRecord], settings: GenerateConfig, default_size: tuple[int, int], multiple_of: int = 8,
              default_guidance: float = DEFAULT_GUIDANCE) -> list[ImageJob]:
    """Every image of the run; image 0 of a prompt matches a plain one-image call with a generator seeded with its seed.
    `default_size`, `multiple_of` and `default_guidance` are the family's (Family.default_size, size_multiple, guidance)."""
    settings.resolve()
    jobs = []
    for r in records:
        seed = _first(settings.seed, r.seed, DEFAULT_SEED)
        height = _first(settings.height, r.height, default_size[0])
        width = _first(settings.width, r.width, default_size[1])
        if height % multiple_of or width % multiple_of:
            raise UserError(f"case {r.case_number}: image size {width}x{height} is not a multiple of {multiple_of}, which the model needs; pass --height and --width.")
        guidance = float(_first(settings.guidance, r.guidance, default_guidance))
        per_prompt = settings.seeding == "per_prompt"
        jobs.extend(ImageJob(r, k, seed if per_prompt else seed + k, guidance, height, width, k if per_prompt else 0) for k in range(settings.images_per_prompt))
    return jobs


def _first(*values):
    return next(v for v in values if v is not None)


def record_plan(out: Path, jobs: Sequence[ImageJob], run: dict) -> None:
    """Merge this run's plan into metadata.jsonl; refuse to mix runs whose settings differ under one name."""
    entries = read_metadata(out)
    for job in jobs:
        new = job.metadata(run)
        old = entries.get(job.file)
        if old is not None:
            changed = [key for key in RUN_KEYS if old.get(key) != new[key]]
            if changed:
                key = changed[0]
                raise UserError(
                    f"{out} already holds {job.file} made with {key}={old.get(key)!r}, but this run uses {key}={new[key]!r}. "
                    "Resuming must use the same settings; pass a new --output_dir for a different run."
                )
        entries[job.file] = new
    write_metadata(out, entries.values())


@torch.inference_mode()
def generate_images(pipe: DiffusionPipeline, jobs: Sequence[ImageJob], cfg: GenerateConfig, state: PartialState | None = None) -> GenerationSummary:
    """Generate the jobs whose files are missing in `cfg.output_dir`, split across the processes of `state`.

    `cfg.model` is recorded as given, so pass a folder by its full path to resume it under any spelling.
    """
    state = state or PartialState()
    out = Path(cfg.output_dir)
    run = {"steps": cfg.steps, "model": cfg.model, "scheduler": type(pipe.scheduler).__name__, "seeding": cfg.seeding, "protocol": cfg.protocol, "dtype": str(family_of(pipe).network_of(pipe).dtype).removeprefix("torch.")}
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        record_plan(out, jobs, run)
    state.wait_for_everyone()
    todo = [job for job in jobs if not (out / job.file).exists()]
    state.wait_for_everyone()  # every process must see the same `todo` before any writes a file
    pipe = pipe.to(state.device)
    pipe.set_progress_bar_config(disable=True)
    generated = 0
    with state.split_between_processes(todo) as mine:
        where = f" (process 0 of {state.num_processes})" if state.num_processes > 1 else ""
        progress = tqdm(total=len(mine), desc=f"generate -> {out}{where}", unit="img", disable=not state.is_local_main_process)
        for positions, images in draw_batches(pipe, [job.request for job in mine], cfg.steps, cfg.batch_size):
            for i, image in zip(positions, images):
                save_image(image, out / mine[i].file)
            generated += len(positions)
            progress.update(len(positions))
        progress.close()
    state.wait_for_everyone()
    return GenerationSummary(planned=len(jobs), already_done=len(jobs) - len(todo), generated_here=generated)
