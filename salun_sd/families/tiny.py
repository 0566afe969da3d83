"""Offline Stable Diffusion pipelines (SD-1.x and SDXL shapes) small enough for tests and the CPU demo.

Every component is the real diffusers/transformers class, built from a config in memory with
random weights; the tokenizer is the real CLIP BPE tokenizer (the toy world's shipped tokenizer.json,
which is SD-1.x's), so prompts are tokenized exactly as for SD-1.x.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CLIP_MAX_LENGTH = 77
CLIP_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "pipeline" / "tokenizer"


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The real CLIP tokenizer (49408 tokens, 77 positions), read offline from the tokenizer.json shipped with the toy world."""
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
        block_out_channels=(16, 32, 32),
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


def tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 32) -> StableDiffusionXLPipeline:
    """A randomly initialised SDXL-shaped pipeline: two CLIP encoders (32 + 48 hidden, the second with a
    32-dim projection), a UNet with SDXL's added conditions (pooled embedding + 6 time ids), 32 px images.

    As in SDXL the encoders differ in width, and the second has 10 layers: diffusers tells an SDXL single
    file by these (it looks for the second encoder's block 9), so the layout round trip can be tested.
    """
    torch.manual_seed(seed)
    time_dim, pooled_dim, hidden = 8, 32, (32, 48)
    unet = tiny_unet(
        sample_size,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # SDXL has no attention at the highest resolution
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(hidden),  # the two encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,  # 6 time ids + the pooled embedding
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(sample_size, scaling_factor=0.13025),  # SDXL's VAE scaling
        text_encoder=CLIPTextModel(tiny_clip_config(hidden[0])),
        text_encoder_2=CLIPTextModelWithProjection(tiny_clip_config(hidden[1], layers=10, projection_dim=pooled_dim)),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),  # SDXL's second tokenizer pads with "!"
        unet=unet,
        scheduler=sd1_ddim_scheduler(),  # SDXL keeps SD-1.x's noise schedule
        add_watermarker=False,
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
