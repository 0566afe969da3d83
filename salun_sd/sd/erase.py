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
from salun_sd.objectives import Method, get_method
from salun_sd.saliency import load_mask, make_masks, mask_path, mask_summary
from salun_sd.sd.adapter import sd_denoiser
from salun_sd.sd.config import EraseConfig
from salun_sd.sd.data import concept_data
from salun_sd.sd.export import export, model_card
from salun_sd.sd.loading import load_pipeline
from salun_sd.trainer import TRAINABLE_SCOPES, list_checkpoints, trainable_scope, unlearn


def uses_mask(cfg: EraseConfig, steps: tuple[str, ...]) -> bool:
    """`salun-sd mask` always makes one; an erase only for a method that trains under a mask (SalUn)."""
    return "erase" not in steps or get_method(cfg.train.method).uses_mask


def check_output_dir(cfg: EraseConfig, accelerator: Accelerator, steps: tuple[str, ...]) -> Path:
    """Refuse to clobber earlier results unless --overwrite; a resumed erase may reuse its mask and checkpoints."""
    out = Path(cfg.output_dir)
    resuming = bool(cfg.train.resume_from_checkpoint)
    blocking = []
    if "mask" in steps and not resuming and uses_mask(cfg, steps):
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


def check_config(cfg: EraseConfig) -> Method:
    """Every check that needs no model, so a bad config fails before minutes of loading; returns the method."""
    method = get_method(cfg.train.method)
    if cfg.mask.scope not in ("global", "per_layer"):
        raise UserError(f"mask.scope must be 'global' or 'per_layer', got {cfg.mask.scope!r}")
    if cfg.train.trainable not in TRAINABLE_SCOPES:
        raise UserError(f"train.trainable must be one of {', '.join(TRAINABLE_SCOPES)}, got {cfg.train.trainable!r}")
    trainable_scope(cfg.train)
    data = cfg.data
    if not data.forget:
        raise UserError("the forget set is empty: give data.forget at least one group with a prompt and images")
    for group in data.forget + data.remain:
        group.source()
    if method.uses_remain and not data.remain:
        raise UserError(f"method {cfg.train.method} trains on a remain set: give data.remain at least one group")
    if method.uses_misaligned and not data.misaligned():
        raise UserError(f"method {cfg.train.method} needs misaligned prompts c': give data.misaligned_prompts or data.remain groups")
    if method.uses_concept_tokens and not data.concept_words and not data.remain:
        raise UserError(f"method {cfg.train.method} needs to know which words name the concept: give data.concept_words (e.g. [nude])")
    return method


def prepare(cfg: EraseConfig, accelerator: Accelerator):
    """Load the base pipeline and build D_f, D_r (None if the method has no use for it) and the denoiser.

    The main process generates and caches images first; the other processes then read the cache.
    """
    method = check_config(cfg)
    data = cfg.data
    misaligned_prompts = data.misaligned() if method.uses_misaligned else []
    concept_words = data.concept() if method.uses_concept_tokens else []
    pipe = load_pipeline(cfg.model)
    resolution = data.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    remain_groups = data.remain if method.uses_remain else []
    prompts = [g.prompt for g in data.forget + remain_groups] + misaligned_prompts
    with accelerator.main_process_first():
        pipe.to(accelerator.device)
        den = sd_denoiser(pipe, prompts, concept_words)
        cond_of = {p: den.cond_id(p) for p in prompts}
        forget = concept_data(pipe, cfg.model, data.forget, cond_of, data, resolution, "forget")
        remain = concept_data(pipe, cfg.model, data.remain, cond_of, data, resolution, "remain") if method.uses_remain else None
    if method.uses_concept_tokens:
        missing = [g.prompt for g in data.forget if not den.concept_tokens[cond_of[g.prompt]].any()]
        if missing:
            raise UserError(f"forget prompt {missing[0]!r} contains none of the concept words {concept_words}: set data.concept_words")
    pipe.text_encoder.to("cpu")  # embeddings are cached: the step needs only the UNet
    pipe.vae.to("cpu")
    misaligned = [cond_of[p] for p in misaligned_prompts]
    return pipe, den, forget, remain, misaligned


def erase(cfg: EraseConfig, accelerator: Accelerator, steps: tuple[str, ...] = ("mask", "erase")) -> Path:
    """Run the requested steps; returns the run folder."""
    method = check_config(cfg)
    out = check_output_dir(cfg, accelerator, steps)
    if accelerator.is_main_process:
        write_manifest(out / "manifest.json", manifest(to_dict(cfg), "+".join(steps), num_processes=accelerator.num_processes))
    pipe, den, forget, remain, misaligned = prepare(cfg, accelerator)
    accelerator.print(f"forget set: {len(forget)} examples, remain set: {len(remain) if remain is not None else 'not used'}, method: {cfg.train.method}")

    mask = None  # the baselines train without a saliency mask
    if uses_mask(cfg, steps):
        if cfg.mask.path:
            mask = load_mask(cfg.mask.path, den.model)
        elif "mask" in steps and not mask_path(out).exists():
            info = {"model": cfg.model, "trainable": cfg.train.trainable}
            mask = make_masks(den, forget, accelerator, cfg.mask, out, cfg.data.seed, TRAINABLE_SCOPES[cfg.train.trainable], info)
        else:  # made by an earlier `salun-sd mask` (or before an interruption)
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
            **({"misaligned prompts": cfg.data.misaligned()} if method.uses_misaligned else {}),
            **({"concept words": cfg.data.concept()} if method.uses_concept_tokens else {}),
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
