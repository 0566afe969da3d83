"""One SalUn erase of Stable Diffusion, top to bottom: data → saliency mask → masked unlearning → export.

Run folder layout (`output_dir`):
    manifest.json          resolved config, versions, git revision
    mask.safetensors       the saliency mask used (plus mask-<fraction>.safetensors for extra fractions)
    checkpoints/           resumable training state (train.checkpointing_steps)
    pipeline/              the erased model: StableDiffusionPipeline.from_pretrained("<output_dir>/pipeline")
"""

from __future__ import annotations

import shutil
from pathlib import Path

from accelerate import Accelerator

from salun_sd.config import to_dict
from salun_sd.errors import UserError
from salun_sd.manifest import manifest, write_manifest
from salun_sd.objectives import METHODS
from salun_sd.saliency import load_mask, make_masks, mask_path, mask_summary
from salun_sd.sd.adapter import sd_denoiser
from salun_sd.sd.config import EraseConfig
from salun_sd.sd.data import concept_data
from salun_sd.sd.export import export, model_card
from salun_sd.sd.loading import load_pipeline
from salun_sd.trainer import TRAINABLE_SCOPES, list_checkpoints, unlearn


def check_output_dir(cfg: EraseConfig, accelerator: Accelerator, steps: tuple[str, ...]) -> Path:
    """Refuse to clobber earlier results unless --overwrite; a resumed erase may reuse its mask and checkpoints."""
    out = Path(cfg.output_dir)
    resuming = bool(cfg.train.resume_from_checkpoint)
    blocking = []
    if "mask" in steps and not resuming:
        blocking.append(mask_path(out))
    if "erase" in steps:
        blocking.append(out / "pipeline")
        if not resuming:
            blocking += list_checkpoints(out / "checkpoints")[:1]
    existing = [p for p in blocking if p.exists()]
    if existing and not cfg.overwrite:
        hint = "; or --train.resume_from_checkpoint latest to continue the interrupted run" if "checkpoints" in existing[0].parts else ""
        raise UserError(f"{existing[0]} already exists: pass --overwrite to replace it{hint}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for p in existing:
            shutil.rmtree(p.parent if p.parent.name == "checkpoints" else p) if p.is_dir() else p.unlink()
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return out


def prepare(cfg: EraseConfig, accelerator: Accelerator):
    """Load the base pipeline and build D_f, D_r and the denoiser (the main process generates and caches first)."""
    if cfg.train.method not in METHODS:
        raise UserError(f"train.method must be one of {sorted(METHODS)}, got {cfg.train.method!r}")
    pipe = load_pipeline(cfg.model)
    if cfg.mask.scope not in ("global", "per_layer"):
        raise UserError(f"mask.scope must be 'global' or 'per_layer', got {cfg.mask.scope!r}")
    if cfg.train.trainable not in TRAINABLE_SCOPES:
        raise UserError(f"train.trainable must be one of {sorted(TRAINABLE_SCOPES)}, got {cfg.train.trainable!r}")
    data = cfg.data
    resolution = data.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompts = [g.prompt for g in data.forget + data.remain] + data.misaligned()
    with accelerator.main_process_first():
        pipe.to(accelerator.device)
        den = sd_denoiser(pipe, prompts)
        cond_of = {p: den.cond_id(p) for p in prompts}
        forget = concept_data(pipe, cfg.model, data.forget, cond_of, data, resolution, "forget")
        remain = concept_data(pipe, cfg.model, data.remain, cond_of, data, resolution, "remain")
    pipe.text_encoder.to("cpu")  # embeddings are cached: the step needs only the UNet
    pipe.vae.to("cpu")
    misaligned = [cond_of[p] for p in data.misaligned()]
    return pipe, den, forget, remain, misaligned


def erase(cfg: EraseConfig, accelerator: Accelerator, steps: tuple[str, ...] = ("mask", "erase")) -> Path:
    """Run the requested steps; returns the run folder."""
    out = check_output_dir(cfg, accelerator, steps)
    if accelerator.is_main_process:
        write_manifest(out / "manifest.json", manifest(to_dict(cfg), "+".join(steps), num_processes=accelerator.num_processes))
    pipe, den, forget, remain, misaligned = prepare(cfg, accelerator)
    accelerator.print(f"forget set: {len(forget)} examples, remain set: {len(remain)}, misaligned prompts: {cfg.data.misaligned()}")

    mask = None
    if cfg.mask.path:
        mask = load_mask(cfg.mask.path, den.model)
    elif "mask" in steps and not mask_path(out).exists():
        info = {"model": cfg.model, "trainable": cfg.train.trainable}
        mask = make_masks(den, forget, accelerator, cfg.mask, out, cfg.data.seed, TRAINABLE_SCOPES[cfg.train.trainable], info)
    elif METHODS[cfg.train.method].uses_mask:  # made by an earlier `salun-sd mask` (or before an interruption)
        mask = load_mask(mask_path(out), den.model)
    if "erase" not in steps:
        return out
    unet = unlearn(den, forget, remain, misaligned, cfg.train, accelerator, out, mask)

    if accelerator.is_main_process:
        unet.to("cpu")
        settings = {
            "method": cfg.train.method,
            "forget prompts": [g.prompt for g in cfg.data.forget],
            "remain prompts": [g.prompt for g in cfg.data.remain],
            "misaligned prompts": cfg.data.misaligned(),
            **{f"train.{k}": v for k, v in to_dict(cfg.train).items() if k not in ("resume_from_checkpoint",)},
            **({f"mask.{k}": v for k, v in to_dict(cfg.mask).items()} if mask is not None else {}),
            "num_processes": accelerator.num_processes,
        }
        kept = mask_summary(mask)["total"] if mask is not None else None
        card = model_card(cfg.model, cfg.concept or cfg.data.forget[0].prompt, settings, kept, cfg.export_unet_only)
        info = manifest(to_dict(cfg), "erase", mask_kept_fraction=kept, num_processes=accelerator.num_processes)
        export(pipe.to("cpu"), unet, out / "pipeline", card, info, cfg.export_unet_only)
        accelerator.print(f"erased model written to {out / 'pipeline'}")
    accelerator.wait_for_everyone()
    return out
