"""`salun-sd relearn` settings: a torch-free dataclass whose fields carry their `--help` text (salun_sd/config.py: setting)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from salun_sd.attack.config import BUILTIN_JUDGES, AttackConfig
from salun_sd.config import check_settings, setting
from salun_sd.core.config import MixedPrecision, Scope, TrainConfig
from salun_sd.errors import UserError
from salun_sd.evaluation.nudity import check_nudenet

TARGETS = ("model", "base")


@dataclass
class RelearnConfig:
    """Fine-tune an erased model and its base the same way on a few base-model images of the erased concept; UA after each stretch."""

    model: str = setting("", "the erased pipeline (OUTPUT_DIR/pipeline of an erase), fine-tuned under target `model`")
    base: str = setting("CompVis/stable-diffusion-v1-4", "the original model: it draws the fine-tuning images, and its own fine-tune (target `base`) is the concept's natural curve")
    prompts: list[str] = setting(factory=list, doc="the erased concept's prompts: the fine-tuning images are drawn from them and UA is measured on them")
    images: int = setting(8, "base-model images to fine-tune on, spread over the prompts in turn (image i: prompt i mod len(prompts))", at_least=1)
    steps: int = setting(300, "optimiser steps of each fine-tune", at_least=1)
    eval_at: list[int] = setting(factory=lambda: [0, 25, 50, 100, 200, 300], doc="steps after which UA is measured (0: before the fine-tune)", at_least=0)
    learning_rate: float = setting(1e-5, "Adam, as the erase (official SalUn SD: 1e-5; the toy world's erases: 5e-4)", above=0)
    batch_size: int = setting(8, "images per step (with the 8 default images, every step sees all of them, each with fresh noise and timestep)", at_least=1)
    max_grad_norm: float = setting(0.0, "0 disables clipping", at_least=0)
    trainable: Scope = setting("all", "weights the fine-tune may change: all | xattn | noxattn")
    mixed_precision: MixedPrecision = setting("no", "no | fp16 | bf16 (Accelerate autocast; weights stay fp32)")
    targets: list[Literal["model", "base"]] = setting(factory=lambda: list(TARGETS), doc="model (the erased one) and/or base (the same fine-tune from the original: the control)")
    generation_steps: int = setting(50, "sampler steps of every image, fine-tuning and UA images alike (each model folder's own scheduler)", at_least=1)
    guidance: float = setting(7.5, "guidance scale of every image", at_least=0)
    eval_images: int = setting(16, "images per prompt at each UA point", at_least=1)
    generation_batch_size: int = setting(8, "images per pipeline call", at_least=1)
    seed: int = setting(0, "fine-tuning image i of a prompt uses seed + i; also seeds the fine-tune's data order, noise and timesteps", at_least=0)
    eval_seed: int = setting(10_000, "UA image j of a prompt uses eval_seed + j: the same images' noise at every point and for both targets, and none of the fine-tuning images' seeds", at_least=0)
    judge: str = setting("nudenet", "nudenet | imagenet | toyworld | module:function (the judges of `salun-sd attack`): does an image show the concept?")
    concept: str = setting("", "imagenet: an ImageNet class name; toyworld: a shape or colour name")
    nudenet_threshold: float = setting(0.45, "nudenet: the concept shows if any exposed class scores above this (the attack's threshold)")
    nudenet_detector: str = setting("unlearndiffatk", "nudenet: how images reach NudeNet, as `salun-sd attack --nudenet_detector` (unlearndiffatk | rgb | pip_path)")
    checkpointing_steps: int = setting(0, "save the fine-tune's state every N steps so a killed run resumes there (0: a killed target restarts; SD-1.4 with Adam is ~10 GB a state)", at_least=0)
    output_dir: str = setting("outputs/relearn", "report.json, report.md, grid.png, and per target: curve.json, log.jsonl (every step's loss), checkpoints/")
    overwrite: bool = setting(False, "write into OUTPUT_DIR even when its manifest.json says another command's run is there (that manifest is replaced)")
    cache_dir: str = setting("", "where the base-model images and latents are cached (default: $SALUN_SD_CACHE or ~/.cache/salun_sd)")

    def judge_config(self) -> AttackConfig:
        """The judge settings as `salun-sd attack` reads them, so both commands judge with the same code."""
        return AttackConfig(judge=self.judge, concept=self.concept, nudenet_threshold=self.nudenet_threshold, nudenet_detector=self.nudenet_detector)

    def train_config(self, resume: str = "") -> TrainConfig:
        """The fine-tune as the core's loop runs it: the `ft` objective (diffusion loss on D_r, here the concept's images), no mask."""
        return TrainConfig(method="ft", learning_rate=self.learning_rate, batch_size=self.batch_size, max_steps=self.steps, max_grad_norm=self.max_grad_norm,
                           trainable=self.trainable, seed=self.seed, checkpointing_steps=self.checkpointing_steps, checkpoints_total_limit=1,
                           resume_from_checkpoint=resume)

    def points(self) -> list[int]:
        return sorted(set(self.eval_at))

    def check(self) -> None:
        """Bad settings fail here, before any model loads."""
        if not self.model and "model" in self.targets:
            raise UserError("relearn needs --model: the erased pipeline folder (e.g. outputs/nudity/pipeline)")
        if not self.prompts or not all(p.strip() for p in self.prompts):
            raise UserError("relearn needs --prompts: the erased concept's prompts (e.g. --prompts 'a photo of a nude person')")
        check_settings(self)
        if not self.targets:
            raise UserError(f"targets: none given; choose from {', '.join(TARGETS)}")
        if not self.eval_at or not all(s <= self.steps for s in self.eval_at):
            raise UserError(f"eval_at must list steps between 0 and steps={self.steps}, got {self.eval_at}")
        if self.judge not in BUILTIN_JUDGES and ":" not in self.judge:
            raise UserError(f"judge must be {', '.join(BUILTIN_JUDGES)} or module:function, got {self.judge!r}")
        check_nudenet(self.nudenet_threshold, self.nudenet_detector)
        if self.judge == "toyworld" and not self.concept:
            raise UserError("the toyworld judge needs --concept: the shape or colour that was erased (e.g. circle)")
