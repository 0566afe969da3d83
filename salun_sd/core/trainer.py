"""The masked unlearning loop on Accelerate: one screen from data to updated weights.

Frozen weights stay bitwise equal to the original (salun_sd.core.masked_step): gradients are multiplied
by the 0/1 mask before the optimizer step (and before clipping, unless clip_before_mask as in the official
DDPM code), the optimizer is Adam without built-in weight decay (Adam moves nothing whose gradient has
always been zero; 8-bit Adam does unless its moments are reset, see zero_frozen_8bit_moments), and
optional weight decay is applied only where the mask is 1.

Under FSDP (`accelerate launch --use_fsdp --fsdp_version 2`) Accelerate's prepare swaps in sharded
parameters: the loop takes them from the prepared model, shards each mask like its parameter (each
process holds its shard's bits) and multiplies the local shards; clipping uses the full norm.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from salun_sd.core.config import TrainConfig
from salun_sd.core.denoiser import ConceptData, Denoiser
from salun_sd.core.draws import draw_batch
from salun_sd.errors import UserError
from salun_sd.core.masked_step import mask_gradients_, masked_weight_decay
from salun_sd.core.objectives import Method, get_method
from salun_sd.run.files import nbytes, publish, remove, space_for, staging
from salun_sd.run.runtime import pause_if_asked
from salun_sd.core.saliency import Mask
from salun_sd.core.sharding import local, shard_for_fsdp, shard_like
from salun_sd.run.log import StepLog

class TrainingDiverged(UserError):
    """The loss (or the weights) became NaN or infinite; the checkpoints of weights that gave it are removed (stop_diverged)."""

    resumable = True  # the run folder keeps this run's files for the resume (salun_sd.run.folder.claim)


def trainable_scope(cfg: TrainConfig) -> str:
    """The scope the method fixes (ESD-x: cross-attention, ESD-u: the rest), else unlearn.trainable."""
    fixed = get_method(cfg.method).scope
    if fixed and cfg.trainable not in ("all", fixed):
        raise UserError(f"method {cfg.method} trains {fixed!r} weights by definition; remove unlearn.trainable={cfg.trainable!r}")
    return fixed or cfg.trainable


def check_train_config(cfg: TrainConfig, section: str = "unlearn") -> Method:
    """Every check of the training settings that needs no model, so a bad value fails before loading; returns the method.

    `section` is where the settings live in the command's config (train, unlearn), for the messages."""
    cfg.check(section)
    method = get_method(cfg.method)
    trainable_scope(cfg)
    return method


def select_trainable(den: Denoiser, scope: str, mask: Mask | None) -> dict[str, nn.Parameter]:
    """Set requires_grad on the weights that may change: in scope and (with a mask) masked in somewhere."""
    in_scope = den.scope(scope)
    chosen = {}
    for name, p in den.model.named_parameters():
        keep = in_scope(name) and (mask is None or (name in mask and bool(mask[name].any())))
        p.requires_grad_(keep)
        if keep:
            chosen[name] = p
    if not chosen:
        raise UserError(f"no weight of {den.family} is in scope {scope!r}{' and this mask' if mask is not None else ''}")
    return chosen


def reached_by_loss(den: Denoiser, method: Method, params: dict[str, nn.Parameter], batches: tuple, cfg: TrainConfig,
                    frozen: nn.Module | None, accelerator: Accelerator) -> dict[str, nn.Parameter]:
    """The trainable weights that the method's loss sends a gradient to, found by one backward pass; the others stay frozen.

    FMN's loss reads attention maps, so the weights after the last cross-attention never get a gradient:
    DDP fails on a trained weight without one, and AdamW (FMN's optimizer) leaves such weights untouched.
    """
    with accelerator.autocast():
        loss, _ = method.loss(den, den.model, *batches, cfg, frozen)
    loss.backward()
    reached = {name: p for name, p in params.items() if p.grad is not None}
    for name, p in params.items():
        p.grad = None
        p.requires_grad_(name in reached)
    if not reached:
        raise UserError(f"the {cfg.method} loss sends no gradient to any trainable weight of {den.family}")
    return reached


def named_like(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """The parameters of `model` with the names of `params`: FSDP's sharding (and Accelerate's FSDP prepare)
    replaces the parameter objects."""
    current = dict(model.named_parameters())
    return {name: current[name] for name in params}


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam without weight decay in one of three implementations (weight decay is applied by the loop, masked)."""
    kwargs = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if cfg.optimizer == "adam8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UserError("unlearn.optimizer=adam8bit needs bitsandbytes: pip install 'salun-sd[bnb]'") from None
        return bitsandbytes.optim.Adam8bit(params, **kwargs)
    return torch.optim.Adam(params, fused=cfg.optimizer == "adam_fused" or None, **kwargs)  # adam | adam_fused (TrainConfig.check)


def zero_frozen_8bit_moments(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], masks: list[torch.Tensor]) -> None:
    """Reset the 8-bit Adam moments of frozen weights to the code of exactly 0.

    bitsandbytes quantizes a zero moment to a small non-zero code, so without this the next step
    would move weights whose gradient is masked to 0 (by m / (sqrt(v) + eps) with v = 0: a lot).
    Tensors below bitsandbytes' min_8bit_size keep fp32 moments, which stay exactly 0.
    """
    for p, m in zip(params, masks):
        state = optimizer.state[p]
        for moment, qmap in (("state1", "qmap1"), ("state2", "qmap2")):
            if state[moment].dtype == torch.uint8:
                state[moment].masked_fill_(~m, int((state[qmap] == 0).nonzero()[0]))


def unlearn(
    den: Denoiser,
    forget: ConceptData,
    remain: ConceptData | None,
    misaligned: list[list[int]],
    cfg: TrainConfig,
    accelerator: Accelerator,
    run_dir: Path,
    mask: Mask | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> nn.Module:
    """Fine-tune den.model with cfg.method; returns the unwrapped model. Checkpoints go to run_dir/checkpoints.

    misaligned[k]: the c' condition ids of concept k (forget.concept says each example's; one list for one concept).

    on_step(step, logged values) is called after each optimizer step (the benchmark times steps with it).
    """
    method = check_train_config(cfg)
    if method.uses_mask and mask is None:
        raise UserError(f"method {cfg.method!r} needs a saliency mask: run `salun-sd mask` first or pass mask.path")
    mask = mask if method.uses_mask else None
    model = den.model
    # Clipping before the mask takes the norm over every in-scope weight, wholly frozen tensors included (official DDPM).
    params = select_trainable(den, trainable_scope(cfg), None if cfg.clip_before_mask else mask)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    den.set_attention(cfg.attention)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    frozen = copy.deepcopy(model).requires_grad_(False).eval().to(accelerator.device) if method.needs_frozen else None  # the original, for ESD's target
    shard_for_fsdp(accelerator, model)  # before the device and the first backward pass (reached_by_loss)
    params = named_like(model, params)
    model.train().to(accelerator.device)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    den.to(device)
    forget, remain = forget.to(device), remain.to(device) if remain is not None else None
    candidates = [torch.tensor(ids, dtype=torch.long) for ids in misaligned] if method.uses_misaligned else None
    global_batch = cfg.batch_size * world
    first = (draw_batch(forget, den, cfg.seed, "forget", 0, global_batch, rank, cfg.batch_size, candidates),
             draw_batch(remain, den, cfg.seed, "remain", 0, global_batch, rank, cfg.batch_size) if method.uses_remain else None)
    params = reached_by_loss(den, method, params, first, cfg, frozen, accelerator)
    adam = make_optimizer(list(params.values()), cfg)
    model, optimizer = accelerator.prepare(model, adam)
    params = named_like(accelerator.unwrap_model(model), params)
    masks = [shard_like(mask[n], p) if n in mask else local(torch.zeros_like(p, dtype=torch.bool)) for n, p in params.items()] if mask is not None else None  # 1 byte per (local) weight
    if cfg.weight_decay > 0:
        adam.register_step_pre_hook(masked_weight_decay(list(params.values()), masks, cfg.learning_rate * cfg.weight_decay))
    net = torch.compile(model, mode=cfg.compile_mode, dynamic=False) if cfg.compile else model  # static shapes: one graph per batch shape
    ckpt_root = run_dir / "checkpoints"
    step = resume(accelerator, ckpt_root, cfg.resume_from_checkpoint)
    keep_configured_rates(optimizer, cfg)
    log = StepLog(accelerator, run_dir, step, cfg)
    total, accum = cfg.total_steps(len(forget), world), cfg.gradient_accumulation_steps
    losses: dict[int, float] = {}  # step s -> the loss of the weights after s steps (log.jsonl lists it as step s + 1)

    bar = tqdm(total=total, initial=step, desc=f"erase ({cfg.method})", disable=not accelerator.is_local_main_process)
    while step < total:
        logs = []
        for micro in range(accum):
            key = step * accum + micro
            f = draw_batch(forget, den, cfg.seed, "forget", key, global_batch, rank, cfg.batch_size, candidates, cfg.cond_drop_prob)
            r = draw_batch(remain, den, cfg.seed, "remain", key, global_batch, rank, cfg.batch_size, cond_drop_prob=cfg.cond_drop_prob) if method.uses_remain else None
            with accelerator.no_sync(model) if micro < accum - 1 else nullcontext(), accelerator.autocast():
                loss, terms = method.loss(den, net, f, r, cfg, frozen)
                accelerator.backward(loss / accum)
            logs.append(torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())]))
        values = accelerator.reduce(torch.stack(logs).mean(0), reduction="mean").tolist()
        if not all(math.isfinite(v) for v in values):
            bar.close()
            stop_diverged(accelerator, ckpt_root, step, f"the loss became {values[0]} at step {step + 1}", losses, "unlearn")
        losses[step] = values[0]
        grads = [local(p.grad) for p in params.values()]
        if cfg.max_grad_norm > 0 and cfg.clip_before_mask:
            accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        if masks is not None:
            mask_gradients_(grads, masks)
        if cfg.max_grad_norm > 0 and not cfg.clip_before_mask:
            accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        optimizer.step()  # weight decay included (masked_weight_decay)
        if cfg.optimizer == "adam8bit" and masks is not None:
            zero_frozen_8bit_moments(optimizer, list(params.values()), masks)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        logged = dict(zip(["loss", *terms], values))
        bar.set_postfix({k: f"{v:.4g}" for k, v in logged.items()})
        log(step, logged)
        if on_step is not None:
            on_step(step, logged)
        if (cfg.checkpointing_steps and (step % cfg.checkpointing_steps == 0)) or step == total:
            if not finite(params.values(), accelerator):  # before a checkpoint or the export holds them
                bar.close()
                stop_diverged(accelerator, ckpt_root, step, f"the weights became NaN or infinite at step {step}", losses, "unlearn")
            if cfg.checkpointing_steps:
                save_checkpoint(accelerator, ckpt_root, step, cfg.checkpoints_total_limit)
        pause_if_asked(step)
    bar.close()
    model.requires_grad_(False)
    return accelerator.unwrap_model(model)


def finite(params: Iterable[torch.Tensor], accelerator: Accelerator) -> bool:
    """Every weight finite, on every process (each checks its local shard under FSDP)."""
    bad = torch.stack([~torch.isfinite(local(p.detach())).all() for p in params]).sum().float()
    return accelerator.reduce(bad.to(accelerator.device), reduction="sum").item() == 0


def stop_diverged(accelerator: Accelerator, root: Path, bad: int, what: str, losses: dict[int, float], section: str) -> NoReturn:
    """Stop a run whose weights after `bad` steps gave a non-finite loss or are non-finite, naming the checkpoint to resume from.

    A checkpoint is good when its weights gave a finite loss at the next step, so those from `bad` on are removed and
    `latest` is the last good one. Its loss is in the message beside the run's first: a loss that had already grown
    by orders of magnitude means the weights were exploding before they overflowed, and a fresh start is better."""
    if accelerator.is_main_process:
        for checkpoint in list_checkpoints(root):
            if checkpoint_step(checkpoint) >= bad:
                shutil.rmtree(checkpoint)
    accelerator.wait_for_everyone()
    kept = list_checkpoints(root)
    advice = f"lower {section}.learning_rate (or use bf16 rather than fp16)"
    if not kept:
        raise TrainingDiverged(f"{what}; no checkpoint holds weights from before it: {advice} and start again")
    last = checkpoint_step(kept[-1])
    first = f" (step {min(losses) + 1}: {losses[min(losses)]:.4g})" if last != min(losses, default=last) else ""
    loss = f", whose weights gave loss {losses[last]:.4g}{first}" if last in losses else ""
    raise TrainingDiverged(f"{what}; the last checkpoint whose weights gave a finite loss is {kept[-1]} (step {last}{loss}), and later ones are removed: "
                           f"{advice} and resume with {section}.resume_from_checkpoint=latest, or start again if its loss had already grown")


def keep_configured_rates(optimizer: torch.optim.Optimizer, cfg: Any, **extra: float) -> None:
    """Set the config's Adam settings (`extra`: more param-group keys) after a resume: torch's load_state_dict restores a
    checkpoint's param groups, so a run resumed at a lower learning rate would otherwise go on at the old one."""
    for group in optimizer.param_groups:
        group.update(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, **extra)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is only renamed to its final name once written)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if re.fullmatch(r"checkpoint-\d{8}", p.name) and (p / "trainer_state.json").is_file())


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, total_limit: int) -> Path:
    """Accelerate's full state (model, optimizer, RNG) written to a temporary folder, then renamed into place."""
    final = root / checkpoint_name(step)
    tmp = staging(final, shared=True)  # every process writes its part into it
    if accelerator.is_main_process:
        remove(tmp)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:  # Accelerate keeps what it saves in private lists; their tensors are about what a checkpoint takes
        with space_for(final, lambda: nbytes(*accelerator._models, *accelerator._optimizers), tmp):
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
                publish(tmp, final)
    except BaseException:
        if accelerator.is_main_process:
            remove(tmp)
        raise
    if accelerator.is_main_process:
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
