"""The masked unlearning loop on Accelerate: one screen from data to updated weights.

Frozen weights stay bitwise equal to the original: gradients are multiplied by the 0/1 mask before
clipping and the optimizer step, the optimizer is Adam without built-in weight decay (Adam moves
nothing whose gradient has always been zero), and optional weight decay is applied only where the
mask is 1.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from salun_sd.denoiser import ConceptData, Denoiser
from salun_sd.draws import draw_batch
from salun_sd.errors import UserError
from salun_sd.objectives import METHODS
from salun_sd.saliency import Mask

TRAINABLE_SCOPES = {
    "all": lambda name: True,
    "xattn": lambda name: ".attn2." in name,  # cross-attention of diffusers' transformer blocks
}


@dataclass
class TrainConfig:
    """Masked unlearning. Defaults are the official SalUn SD nudity run (Adam 1e-5, batch 8, α 0.1, 1 epoch of 800 images)."""

    method: str = "salun"  # salun | rl | ga | ft (see salun_sd.objectives.METHODS)
    alpha: float = 0.1  # weight of the remain-set loss
    learning_rate: float = 1e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0  # decoupled, applied only to masked-in weights
    batch_size: int = 8  # forget examples per process per micro-step (and as many remain examples)
    gradient_accumulation_steps: int = 1
    epochs: float = 1.0  # passes over the forget set; used when max_steps is 0
    max_steps: int = 0
    max_grad_norm: float = 0.0  # 0 disables clipping
    trainable: str = "all"  # all | xattn
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 0  # 0: no intermediate checkpoints
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: str = ""  # "" | latest | path to a checkpoint folder
    seed: int = 0

    def total_steps(self, num_forget: int, num_processes: int) -> int:
        if self.max_steps > 0:
            return self.max_steps
        per_step = self.batch_size * num_processes * self.gradient_accumulation_steps
        return max(1, math.ceil(self.epochs * num_forget / per_step))


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good state was saved."""


def select_trainable(model: nn.Module, scope: str, mask: Mask | None) -> dict[str, nn.Parameter]:
    """Set requires_grad on the weights that may change: in scope and (with a mask) masked in somewhere."""
    if scope not in TRAINABLE_SCOPES:
        raise UserError(f"trainable must be one of {sorted(TRAINABLE_SCOPES)}, got {scope!r}")
    chosen = {}
    for name, p in model.named_parameters():
        keep = TRAINABLE_SCOPES[scope](name) and (mask is None or (name in mask and bool(mask[name].any())))
        p.requires_grad_(keep)
        if keep:
            chosen[name] = p
    if not chosen:
        raise UserError(f"no weight is trainable with trainable={scope!r} and this mask")
    return chosen


def unlearn(
    den: Denoiser,
    forget: ConceptData,
    remain: ConceptData,
    misaligned: list[int],
    cfg: TrainConfig,
    accelerator: Accelerator,
    run_dir: Path,
    mask: Mask | None = None,
) -> nn.Module:
    """Fine-tune den.model with cfg.method; returns the unwrapped model. Checkpoints go to run_dir/checkpoints."""
    method = METHODS[cfg.method]
    if method.uses_mask and mask is None:
        raise UserError(f"method {cfg.method!r} needs a saliency mask: run `salun-sd mask` first or pass mask.path")
    mask = mask if method.uses_mask else None
    model = den.model
    params = select_trainable(model, cfg.trainable, mask)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    optimizer = torch.optim.Adam(params.values(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    model, optimizer = accelerator.prepare(model, optimizer)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    den.to(device)
    forget, remain = forget.to(device), remain.to(device)
    masks = [mask[n].to(device, p.dtype) for n, p in params.items()] if mask is not None else None
    candidates = torch.tensor(misaligned, dtype=torch.long)
    ckpt_root = run_dir / "checkpoints"
    step = resume(accelerator, ckpt_root, cfg.resume_from_checkpoint)
    total, accum = cfg.total_steps(len(forget), world), cfg.gradient_accumulation_steps
    global_batch = cfg.batch_size * world

    bar = tqdm(total=total, initial=step, desc=f"erase ({cfg.method})", disable=not accelerator.is_local_main_process)
    while step < total:
        logs = []
        for micro in range(accum):
            key = step * accum + micro
            f = draw_batch(forget, den, cfg.seed, "forget", key, global_batch, rank, cfg.batch_size, candidates)
            r = draw_batch(remain, den, cfg.seed, "remain", key, global_batch, rank, cfg.batch_size)
            with accelerator.no_sync(model) if micro < accum - 1 else nullcontext(), accelerator.autocast():
                loss, terms = method.loss(den, model, f, r, cfg.alpha)
                accelerator.backward(loss / accum)
            logs.append(torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())]))
        values = accelerator.reduce(torch.stack(logs).mean(0), reduction="mean").tolist()
        if not all(math.isfinite(v) for v in values):
            save_checkpoint(accelerator, ckpt_root, step, cfg.checkpoints_total_limit + 1)
            raise TrainingDiverged(
                f"the loss became {values[0]} at step {step + 1}; the weights before that step are saved in "
                f"{ckpt_root / checkpoint_name(step)}. Lower train.learning_rate, or use bf16 rather than fp16, "
                "and resume with train.resume_from_checkpoint=latest"
            )
        grads = [p.grad for p in params.values()]
        if masks is not None:
            torch._foreach_mul_(grads, masks)
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        if cfg.weight_decay > 0:
            decay = cfg.learning_rate * cfg.weight_decay
            factors = [1 - decay * m for m in masks] if masks is not None else [1 - decay] * len(params)
            with torch.no_grad():  # a factor of exactly 1.0 where the mask is 0
                torch._foreach_mul_(list(params.values()), factors)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in zip(["loss", *terms], values)})
        if cfg.checkpointing_steps and (step % cfg.checkpointing_steps == 0 or step == total):
            save_checkpoint(accelerator, ckpt_root, step, cfg.checkpoints_total_limit)
    bar.close()
    model.requires_grad_(False)
    return accelerator.unwrap_model(model)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is only renamed to its final name once written)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if re.fullmatch(r"checkpoint-\d{8}", p.name) and (p / "trainer_state.json").is_file())


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, total_limit: int) -> Path:
    """Accelerate's full state (model, optimizer, RNG) written to a temporary folder, then renamed into place."""
    final, tmp = root / checkpoint_name(step), root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        for old in list_checkpoints(root)[:-total_limit] if total_limit > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator: Accelerator, root: Path, which: str) -> int:
    """Load the chosen checkpoint into the prepared objects; return the number of steps already done."""
    if not which:
        return 0
    if which == "latest":
        found = list_checkpoints(root)
        if not found:
            accelerator.print(f"no checkpoint in {root}; starting from step 0")
            return 0
        path = found[-1]
    else:
        path = Path(which)
        if not (path / "trainer_state.json").is_file():
            raise UserError(f"{path} is not a complete checkpoint folder (it has no trainer_state.json)")
    accelerator.load_state(str(path))
    step = json.loads((path / "trainer_state.json").read_text())["step"]
    accelerator.print(f"resumed from {path} at step {step}")
    return step
