"""`salun-sd relearn`: the relearning attack. Does the concept come back when the erased model is fine-tuned on a few images of it?

A concept that an erase only hid (behind a few weights the fine-tune undoes) returns within a handful of steps;
one whose weights were changed returns about as slowly as the base model learns any new concept. So the erased
model and the base model are fine-tuned alike — the `ft` objective of the core (the diffusion loss on D_r) with
D_r = `images` base-model images of the concept's prompts, Adam at the erase's learning rate, through the core's
masked loop (`core.trainer.unlearn`, here without a mask) — and UA (share of images of the prompts in which the
judge does not see the concept) is measured at each step of `eval_at` on the same seeds. The base model's curve
is the control: it starts at UA ≈ 0 and a fine-tune on its own images keeps it there.

Output: OUTPUT_DIR/<target>/curve.json (the UA points, written after each one), log.jsonl (every step's loss),
samples/ (the first image of each prompt at each point); OUTPUT_DIR/report.json, report.md, grid.png. A rerun with
the same settings reuses a finished target's curve; with checkpointing_steps, an unfinished one resumes from its
last checkpoint.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.utils import make_image_grid
from PIL import Image

from salun_sd.attack.judges import Verdict, load_judge
from salun_sd.config import to_dict
from salun_sd.core.objectives import get_method
from salun_sd.core.trainer import list_checkpoints, unlearn
from salun_sd.errors import UserError
from salun_sd.evaluation.prompts import PromptRecord
from salun_sd.evaluation.stats import wilson
from salun_sd.families.config import DataConfig, EraseConfig, ImageGroup
from salun_sd.families.data import generated_images
from salun_sd.families.erase import SDErase
from salun_sd.families.validation import drawing_mid_training
from salun_sd.generation import ImageRequest, draw_images
from salun_sd.relearn.config import RelearnConfig
from salun_sd.run.files import save_image, write_json, write_text
from salun_sd.run.folder import claim
from salun_sd.run.log import LOG_NAME
from salun_sd.run.manifest import manifest
from salun_sd.run.runtime import make_accelerator

# Settings a curve does not depend on: a rerun that changes only these reuses it.
NOT_IN_CURVE = ("targets", "output_dir", "checkpointing_steps", "cache_dir", "eval_at")


def per_prompt_counts(cfg: RelearnConfig) -> list[int]:
    """How many of the `images` fall to each prompt: image i to prompt i mod len(prompts)."""
    return [len(range(i, cfg.images, len(cfg.prompts))) for i in range(len(cfg.prompts))]


def data_config(cfg: RelearnConfig, groups: list[ImageGroup]) -> DataConfig:
    """The concept's images as both sets: `ft` trains on D_r, and the loop also draws (unused) D_f batches."""
    return DataConfig(forget=groups, remain=groups,
                      generation_steps=cfg.generation_steps, generation_guidance=cfg.guidance,
                      generation_batch_size=cfg.generation_batch_size, seed=cfg.seed, cache_dir=cfg.cache_dir,
                      keep_erased=False)  # the fine-tune sees the concept's base images only, never prompts an earlier erase kept


def target_job(cfg: RelearnConfig, model: str, groups: list[ImageGroup], run_dir: Path, resume: bool) -> SDErase:
    train = cfg.train_config("latest" if resume else "")
    return SDErase(EraseConfig(model=model, output_dir=str(run_dir), mixed_precision=cfg.mixed_precision, validation_grid=False,
                               data=data_config(cfg, groups), unlearn=train))


def load_job(job: SDErase, accelerator: Accelerator):
    """The family's checks, then its model and data, as the erase flow runs them."""
    method = get_method("ft")
    job.check(method)
    return job.load(accelerator, method)


def curve_settings(cfg: RelearnConfig, target: str) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_CURVE and not (target == "base" and k == "model")}


def read_curve(path: Path, settings: dict) -> list[dict] | None:
    """The points measured by an earlier run with the same settings, or None."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["points"] if saved["settings"] == settings else None


@torch.no_grad()
def measure(pipe, cfg: RelearnConfig, verdicts: list[Verdict], resolution: int, step: int, samples: Path) -> dict:
    """UA over `eval_images` images per prompt from the network as it is now (in eval mode)."""
    requests = [ImageRequest(p, cfg.eval_seed + j, resolution, resolution, cfg.guidance) for p in cfg.prompts for j in range(cfg.eval_images)]
    with drawing_mid_training(pipe):
        images = draw_images(pipe, requests, cfg.generation_steps, cfg.generation_batch_size)
    per_prompt = []
    for number, verdict in enumerate(verdicts):
        mine = images[number * cfg.eval_images : (number + 1) * cfg.eval_images]
        save_image(mine[0], samples / f"{step:06d}_{number:03d}.png")
        per_prompt.append(sum(verdict(mine)))
    shown = sum(per_prompt)
    n = cfg.eval_images * len(cfg.prompts)
    low, high = wilson(n - shown, n)
    return {"step": step, "concept_shown": shown, "images": n, "UA": (n - shown) / n, "UA_wilson95": [low, high], "shown_per_prompt": per_prompt}


TARGET_FILES = ["curve.json", LOG_NAME, "checkpoints", "samples"]  # what one target's fine-tune writes in OUTPUT_DIR/<target>


def relearn_target(cfg: RelearnConfig, target: str, job: SDErase, verdicts: list[Verdict], accelerator: Accelerator, log=print) -> list[dict]:
    """Fine-tune one loaded target and measure UA at every point of eval_at; returns the points."""
    resuming = bool(job.train.resume_from_checkpoint)
    with claim(job.out, [] if resuming else TARGET_FILES, list, True, resuming, accelerator, "relearn", "relearn"):
        return fine_tune(cfg, target, job, verdicts, accelerator, log)


def fine_tune(cfg: RelearnConfig, target: str, job: SDErase, verdicts: list[Verdict], accelerator: Accelerator, log=print) -> list[dict]:
    run_dir = job.out
    curve, samples = run_dir / "curve.json", run_dir / "samples"
    settings = curve_settings(cfg, target)
    resumed = job.train.resume_from_checkpoint and list_checkpoints(run_dir / "checkpoints")
    start = json.loads((resumed[-1] / "trainer_state.json").read_text())["step"] if resumed else 0
    points = [p for p in read_curve(curve, settings) or [] if p["step"] <= start] if resumed else []
    samples.mkdir(parents=True, exist_ok=True)
    wanted = set(cfg.points())
    loaded = load_job(job, accelerator)
    pipe = job.pipe

    def at(step: int, logged: dict | None = None) -> None:
        if step in wanted and all(p["step"] != step for p in points):
            points.append(measure(pipe, cfg, verdicts, job.resolution, step, samples))
            write_json(curve, {"settings": settings, "points": points})
            log(f"relearn {target}: step {step}: UA {points[-1]['UA']:.3f} ({points[-1]['concept_shown']}/{points[-1]['images']} images show the concept)")

    at(start)
    unlearn(loaded.den, loaded.forget, loaded.remain, [], job.train, accelerator, run_dir, None, on_step=at)
    write_json(curve, {"settings": settings, "points": points, "complete": True})
    return points


def fine_tune_groups(cfg: RelearnConfig, base_job: SDErase) -> list[ImageGroup]:
    """The base model's images of the concept (drawn by base_job.load), as folder groups every target trains on."""
    groups = []
    for group in base_job.config.data.forget:
        paths = generated_images(base_job.pipe, base_job.identity, group, base_job.config.data, base_job.resolution)  # on disk: nothing is drawn again
        groups.append(ImageGroup(prompt=group.prompt, folder=str(paths[0].parent), limit=group.generate))
    return groups


def finished(cfg: RelearnConfig, target: str) -> list[dict] | None:
    """The points of a finished earlier run of `target` with the same settings and every step of eval_at, or None."""
    path = Path(cfg.output_dir) / target / "curve.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("complete") and saved["settings"] == curve_settings(cfg, target) and set(cfg.points()) <= {p["step"] for p in saved["points"]}:
        return [p for p in saved["points"] if p["step"] in cfg.points()]
    return None


def prepare(cfg: RelearnConfig, target: str) -> tuple[Path, bool]:
    """The target's folder, and whether its fine-tune resumes (same settings, a checkpoint on disk); otherwise its
    earlier files are replaced (relearn_target claims them: back if the fine-tune fails)."""
    run_dir = Path(cfg.output_dir) / target
    resume = bool(cfg.checkpointing_steps) and read_curve(run_dir / "curve.json", curve_settings(cfg, target)) is not None and bool(list_checkpoints(run_dir / "checkpoints"))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, resume


def single_process(cfg: RelearnConfig) -> Accelerator:
    """A fresh accelerator per fine-tune, so that a checkpoint holds exactly its own model and optimizer."""
    accelerator = make_accelerator(cfg.mixed_precision)
    if accelerator.num_processes > 1:
        raise UserError("relearn runs in one process (its fine-tunes see a few images); run it without accelerate launch")
    return accelerator


def relearn(cfg: RelearnConfig, log=print) -> Path:
    """The curves of the targets asked for, and the report; returns report.md. The base loads first: it draws the images."""
    cfg.check()
    out = Path(cfg.output_dir)
    judge = load_judge(cfg.judge_config())  # a bad judge fails before any model loads
    verdicts = [judge.for_prompt(PromptRecord(case_number=i, prompt=p)) for i, p in enumerate(cfg.prompts)]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "manifest.json", manifest(to_dict(cfg), "relearn"))
    generate = [ImageGroup(prompt=p, generate=n) for p, n in zip(cfg.prompts, per_prompt_counts(cfg)) if n]
    curves: dict[str, list[dict]] = {}
    for target in cfg.targets:
        if (points := finished(cfg, target)) is not None:
            log(f"relearn {target}: reusing {out / target / 'curve.json'}")
            curves[target] = points
    accelerator = single_process(cfg)
    if "base" in cfg.targets and "base" not in curves:
        run_dir, resume = prepare(cfg, "base")
        base = target_job(cfg, cfg.base, generate, run_dir, resume)
        curves["base"] = relearn_target(cfg, "base", base, verdicts, accelerator, log)
    else:
        base = target_job(cfg, cfg.base, generate, out / "base", False)
        load_job(base, accelerator)  # draws the fine-tuning images, or finds them cached
    groups = fine_tune_groups(cfg, base)
    del base
    gc.collect()
    if "model" in cfg.targets and "model" not in curves:
        run_dir, resume = prepare(cfg, "model")
        curves["model"] = relearn_target(cfg, "model", target_job(cfg, cfg.model, groups, run_dir, resume), verdicts, single_process(cfg), log)
    return write_report(cfg, curves, judge.description, groups)


def steps_to(points: list[dict], ua: float) -> int | None:
    """The first measured step at which UA is at most `ua` (None: never within the fine-tune)."""
    return next((p["step"] for p in sorted(points, key=lambda p: p["step"]) if p["UA"] <= ua), None)


def write_report(cfg: RelearnConfig, curves: dict[str, list[dict]], judge: str, groups: list[ImageGroup]) -> Path:
    out = Path(cfg.output_dir)
    steps = cfg.points()
    by_step = {t: {p["step"]: p for p in points} for t, points in curves.items()}
    summary = {t: {"UA_start": by_step[t][steps[0]]["UA"], "UA_end": by_step[t][steps[-1]]["UA"], "steps_to_UA_0.5": steps_to(curves[t], 0.5)} for t in curves}
    write_json(out / "report.json", {"config": to_dict(cfg), "judge": judge, "fine_tune_images": [to_dict(g) for g in groups], "summary": summary, "curves": curves})
    names = {"model": f"erased model `{cfg.model}`", "base": f"base model `{cfg.base}` (control)"}
    order = [t for t in ("model", "base") if t in curves]
    lines = [f"# Relearning attack on `{cfg.model or cfg.base}`", "",
             f"Each model fine-tuned on {cfg.images} base-model image(s) of {', '.join(repr(p) for p in cfg.prompts)} (image i: prompt i mod "
             f"{len(cfg.prompts)}, seed {cfg.seed} + i): the diffusion loss (`ft`), Adam lr {cfg.learning_rate:g}, batch {cfg.batch_size}, "
             f"{cfg.steps} steps, weights: {cfg.trainable}. UA at each step: share of {cfg.eval_images} image(s) per prompt (seeds {cfg.eval_seed}…"
             f"{cfg.eval_seed + cfg.eval_images - 1}, {cfg.generation_steps} steps, guidance {cfg.guidance}) in which the judge does not see the concept; "
             f"[low, high] is the Wilson 95 % interval. Judge: {judge}.", "",
             "| step | " + " | ".join(f"UA, {names[t]}" for t in order) + " |", "|---" * (len(order) + 1) + "|"]
    for s in steps:
        cells = [f"{p['UA']:.3f} [{p['UA_wilson95'][0]:.2f}, {p['UA_wilson95'][1]:.2f}] ({p['concept_shown']}/{p['images']} show it)" for p in (by_step[t][s] for t in order)]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- {names[t]}: UA {summary[t]['UA_start']:.3f} at step {steps[0]}, {summary[t]['UA_end']:.3f} at step {steps[-1]}; "
                     + (f"UA first at or below 0.5 at step {summary[t]['steps_to_UA_0.5']}." if summary[t]["steps_to_UA_0.5"] is not None else "UA stays above 0.5 at every measured step.")
                     for t in order]
    grid = write_grid(cfg, order, out)
    lines += ["", f"![samples]({grid.name})", "",
              f"Rows: {', '.join(f'{t} at steps {steps}' for t in order)}; columns: the prompts (first UA image of each, same seed down a column).",
              "", "Every point (with per-prompt counts) is in report.json; every step's loss in <target>/log.jsonl."]
    return write_text(out / "report.md", "\n".join(lines) + "\n")


def write_grid(cfg: RelearnConfig, targets: list[str], out: Path) -> Path:
    cells = [Image.open(out / t / "samples" / f"{s:06d}_{i:03d}.png").convert("RGB") for t in targets for s in cfg.points() for i in range(len(cfg.prompts))]
    return save_image(make_image_grid(cells, rows=len(targets) * len(cfg.points()), cols=len(cfg.prompts)), out / "grid.png")
