"""Erase one class from a trained DDPM with the core: saliency mask → masked unlearning → model folder.

D_f is the forgotten class's training images, D_r every other class's, and the misaligned condition
c' of a forget example is another class drawn uniformly, as in the official SalUn DDPM code.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from salun_sd.config import to_dict
from salun_sd.ddpm.config import DDPMConfig, claim_output
from salun_sd.ddpm.data import load_split, split_by_class
from salun_sd.ddpm.model import load_denoiser, save_model
from salun_sd.denoiser import ConceptData
from salun_sd.errors import UserError
from salun_sd.manifest import manifest, write_manifest
from salun_sd.objectives import get_method
from salun_sd.saliency import load_mask, make_masks, mask_path
from salun_sd.trainer import TRAINABLE_SCOPES, unlearn


def forget_data(cfg: DDPMConfig) -> tuple[ConceptData, ConceptData, list[int]]:
    """(D_f, D_r, misaligned class ids) from the training split."""
    if not 0 <= cfg.forget_class < cfg.model.num_classes:
        raise UserError(f"forget_class must be in 0..{cfg.model.num_classes - 1}, got {cfg.forget_class}")
    forget, remain = split_by_class(load_split(cfg.data, "train"), cfg.forget_class)
    return forget, remain, [c for c in range(cfg.model.num_classes) if c != cfg.forget_class]


def erase(cfg: DDPMConfig, accelerator: Accelerator, model_dir: Path, out: Path, steps: tuple[str, ...]) -> Path:
    """`steps`: (mask,) writes the mask only; (erase,) reuses out/mask.safetensors (or mask.path), computing it when missing."""
    method = get_method(cfg.unlearn.method)
    training = "erase" in steps
    products = [out / "unet"] if training else [mask_path(out)]
    claim_output(out, products, cfg.overwrite, bool(cfg.unlearn.resume_from_checkpoint) or not training, accelerator)
    den = load_denoiser(model_dir)
    forget, remain, misaligned = forget_data(cfg)
    accelerator.print(f"forget class {cfg.forget_class}: {len(forget)} images; remain: {len(remain)} images")
    mask = None
    if cfg.mask.path:
        mask = load_mask(cfg.mask.path, den.model)
    elif "mask" in steps or (method.uses_mask and not mask_path(out).exists()):
        info = {"model": str(model_dir), "forget_class": cfg.forget_class}
        mask = make_masks(den, forget, accelerator, cfg.mask, out, cfg.unlearn.seed, TRAINABLE_SCOPES[cfg.unlearn.trainable], info)
    elif method.uses_mask:
        mask = load_mask(mask_path(out), den.model)
    if not training:
        return out
    if accelerator.is_main_process:
        write_manifest(out / "manifest.json", manifest(to_dict(cfg), "ddpm erase", base_model=str(model_dir), num_processes=accelerator.num_processes))
    unet = unlearn(den, forget, remain, misaligned, cfg.unlearn, accelerator, out, mask)
    if accelerator.is_main_process:
        save_model(unet.to("cpu").eval(), den.noise_scheduler, out)
        accelerator.print(f"erased model written to {out}")
    accelerator.wait_for_everyone()
    return out
