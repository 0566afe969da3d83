"""Base training of the class-conditional DDPM, and Retrain (the same without the forgotten class).

Batches, noise, timesteps, condition dropout and flips all come from salun_sd.core.draws keyed by
(seed, step), so a resumed run continues exactly and N processes match one; the checkpoints
(model, optimizer, LR schedule, EMA, RNG) use the core trainer's atomic save and resume.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from salun_sd.ddpm.adapter import ClassConditionedDenoiser
from salun_sd.ddpm.config import BaseTrainConfig, ModelConfig
from salun_sd.ddpm.model import build_scheduler, build_unet, save_model
from salun_sd.core.denoiser import ConceptData
from salun_sd.core.draws import draw_batch, generator
from salun_sd.errors import UserError
from salun_sd.core.objectives import Batch, diffusion_loss
from salun_sd.core.trainer import keep_configured_rates, resume, save_checkpoint, stop_diverged
from salun_sd.run.log import StepLog


def augment(batch: Batch, null_cond: int, cfg: BaseTrainConfig, flip: bool, step: int, rank: int, world: int) -> Batch:
    """Condition dropout (and horizontal flips) for this process's share of global batch `step`.

    Drawn for the whole global batch from (seed, step) like the data, so resume is exact and N processes match one.
    """
    gen = generator(cfg.seed, "augment", step)
    mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    drop = (torch.rand(cfg.batch_size * world, generator=gen) < cfg.cond_drop_prob)[mine].to(batch.cond.device)
    flips = (torch.rand(cfg.batch_size * world, generator=gen) < 0.5)[mine].to(batch.x0.device)
    batch.cond = torch.where(drop, torch.full_like(batch.cond, null_cond), batch.cond)
    if flip:
        batch.x0 = torch.where(flips[:, None, None, None], batch.x0.flip(-1), batch.x0)
    return batch


def train_base(
    model_cfg: ModelConfig,
    data: ConceptData,
    cfg: BaseTrainConfig,
    accelerator: Accelerator,
    out: Path,
    flip: bool,
) -> ClassConditionedDenoiser:
    """Train from scratch on `data`; writes `out/unet` (raw weights), `out/unet_ema` (when EMA is on) and `out/scheduler`."""
    if data.cond.max() >= model_cfg.num_classes:
        raise UserError(f"the data has class {int(data.cond.max())} but model.num_classes is {model_cfg.num_classes}")
    if tuple(data.x0.shape[1:]) != (model_cfg.channels, model_cfg.sample_size, model_cfg.sample_size):
        raise UserError(f"images have shape {tuple(data.x0.shape[1:])} but the model expects {model_cfg.channels}x{model_cfg.sample_size}x{model_cfg.sample_size}; set data.image_size / model.channels")
    torch.manual_seed(cfg.seed)  # the initial weights
    unet, scheduler = build_unet(model_cfg), build_scheduler(model_cfg)
    den = ClassConditionedDenoiser(unet, scheduler)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    model, optimizer = accelerator.prepare(unet, optimizer)
    # Not prepared: Accelerate would step it once per process per step, so warm-up would depend on the process count.
    accelerator.register_for_checkpointing(lr_schedule)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    model.train()
    data = data.to(accelerator.device)
    ckpt_root = out / "checkpoints"
    step = resume(accelerator, ckpt_root, cfg.resume_from_checkpoint)
    keep_configured_rates(optimizer, cfg, weight_decay=cfg.weight_decay)
    lr_schedule.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)  # the warm-up scales the config's rate, not the checkpoint's
    for group, scale in zip(optimizer.param_groups, lr_schedule.lr_lambdas):
        group["lr"] = cfg.learning_rate * scale(lr_schedule.last_epoch)
    log = StepLog(accelerator, out, step, cfg)
    losses: dict[int, float] = {}
    rank, world = accelerator.process_index, accelerator.num_processes

    bar = tqdm(total=cfg.max_steps, initial=step, desc="ddpm train", disable=not accelerator.is_local_main_process)
    while step < cfg.max_steps:
        batch = draw_batch(data, den, cfg.seed, "train", step, cfg.batch_size * world, rank, cfg.batch_size)
        batch = augment(batch, den.null_cond, cfg, flip, step, rank, world)
        with accelerator.autocast():
            loss = diffusion_loss(den, model, batch).mean()
        accelerator.backward(loss)
        value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
        if not math.isfinite(value):
            bar.close()
            stop_diverged(accelerator, ckpt_root, step, f"the loss became {value} at step {step + 1}", losses, "train")
        losses[step] = value
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(accelerator.unwrap_model(model).parameters())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4g}")
        log(step, {"loss": value})
        if cfg.checkpointing_steps and (step % cfg.checkpointing_steps == 0 or step == cfg.max_steps):
            save_checkpoint(accelerator, ckpt_root, step, cfg.checkpoints_total_limit)
    bar.close()

    unet = accelerator.unwrap_model(model).eval().requires_grad_(False)
    if accelerator.is_main_process:
        ema_unet = None
        if ema is not None:
            ema_unet = build_unet(model_cfg)
            ema.copy_to(ema_unet.parameters())
        save_model(unet.to("cpu"), scheduler, out, ema_unet)
    accelerator.wait_for_everyone()
    return den
