"""The offline SD-1.x-shaped pipeline (`--model tiny`, configs/tiny.yaml) and the parts the toy world builds from.

Every component is the real diffusers/transformers class, built from a config in memory with
random weights; the tokenizer is the real CLIP BPE tokenizer (the toy world's shipped tokenizer.json,
which is SD-1.x's), so prompts are tokenized exactly as for SD-1.x. The tests' tiny SDXL, SD3 and FLUX
pipelines are built from these parts in tests/tiny_families.py.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CLIP_MAX_LENGTH = 77
CLIP_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "pipeline" / "tokenizer"
TINY_VAE_CHANNELS = (16, 32, 32)  # 3 levels: latents a quarter of the image side


@cache
def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The real CLIP tokenizer (49408 tokens, 77 positions), read offline from the tokenizer.json shipped with the toy world.

    Read once per process and shared by every pipeline built here: transformers parses the 3.6 MB file four
    times a load (0.1-0.5 s of CPU). Nothing changes a pipeline's tokenizer; code that needs a changed one
    changes a copy (attack.run.eos_padded)."""
    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), pad_token=pad_token)


def tiny_pipeline(seed: int = 0, sample_size: int = 32) -> StableDiffusionPipeline:
    """A randomly initialised SD-1.x-shaped pipeline: 32 px images, 8x8x4 latents, ~1 M parameters."""
    torch.manual_seed(seed)
    unet = tiny_unet(
        sample_size,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    return assemble(tiny_vae(sample_size), CLIPTextModel(tiny_clip_config()), unet, sd1_ddim_scheduler())


def tiny_unet(sample_size: int, **layout) -> UNet2DConditionModel:
    """Two levels of 32 and 64 channels, one layer each, on latents a quarter of sample_size; `layout` sets the rest."""
    return UNet2DConditionModel(
        sample_size=sample_size // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8, **layout
    )


def tiny_vae(sample_size: int, scaling_factor: float = 0.18215, **extra) -> AutoencoderKL:
    """A 3-level VAE: images of sample_size px to 4-channel latents a quarter the size (`extra`: e.g. SD3/FLUX's shift_factor)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=TINY_VAE_CHANNELS,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        **extra,
    )


def tiny_clip_config(hidden_size: int = 32, layers: int = 2, **extra) -> CLIPTextConfig:
    """A small CLIP text encoder over the real 49408-token vocabulary."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **extra,
    )


def sd1_ddim_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """SD-1.x's noise schedule; clip_sample off, as in SD-1.x's own scheduler config: latents are not bounded to [-1, 1]."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def assemble(vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel, scheduler: DDIMScheduler) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from components, with the real CLIP tokenizer and no safety checker."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
