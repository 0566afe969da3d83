"""The toy Stable Diffusion of the toy world: real diffusers/transformers classes, small configs.

16x16 images, a 2x AutoencoderKL (8x8x4 latents), a small CLIPTextModel behind the real CLIP
tokenizer, and a UNet2DConditionModel whose only route for the prompt is cross-attention (at the 4x4
level and the mid block), as in SD-1.x, so cross-attention-only erasers (ESD-x, FMN) have something
to act on. (Also adding the prompt to the time embedding, diffusers' `addition_embed_type="text"`,
learned no faster here: 94 % vs 97 % shape accuracy after 1000 steps.) The trained pipeline ships under
`salun_sd/assets/toyworld/pipeline/` and loads with `StableDiffusionPipeline.from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from salun_sd.errors import UserError
from salun_sd.families.loading import read_json, shared_tokenizers
from salun_sd.families.tiny import CLIP_MAX_LENGTH, sd1_ddim_scheduler
from salun_sd.toyworld import ASSETS

PIPELINE_DIR = ASSETS / "pipeline"
# DDIM steps the toy model samples with (data, evaluation, attack images): the shipped model's samples are read as the
# asked shape and colour on 512 of 512 at 10 steps as at 25 (32 per prompt, 2026-12-02), at 40 % of the cost.
SAMPLE_STEPS = 10


@dataclass
class ToySDConfig:
    """Sizes of the toy pipeline's components (defaults: the shipped model)."""

    image_size: int = 16
    vae_channels: list[int] = field(default_factory=lambda: [32, 64])  # one level per entry; each after the first halves the size
    latent_channels: int = 4
    text_hidden: int = 16  # small on purpose: the token table (49408 x hidden) dominates the shipped size
    text_layers: int = 2
    text_heads: int = 2
    unet_channels: list[int] = field(default_factory=lambda: [32, 64])
    unet_layers_per_block: int = 1
    attention_head_dim: int = 8
    attention_levels: list[bool] = field(default_factory=lambda: [False, True])  # cross-attention per UNet level (top first); the top level is the costly one
    text_time_embedding: bool = False  # addition_embed_type="text": also add the pooled prompt to the time embedding
    prediction_type: str = "epsilon"

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def build_vae(cfg: ToySDConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=8,
        sample_size=cfg.image_size,
    )


def build_text_encoder(cfg: ToySDConfig) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=cfg.text_hidden,
            intermediate_size=2 * cfg.text_hidden,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def build_unet(cfg: ToySDConfig) -> UNet2DConditionModel:
    attn = cfg.attention_levels
    if len(attn) != len(cfg.unet_channels):
        raise UserError(f"attention_levels {attn} needs one entry per unet_channels level {cfg.unet_channels}")
    extra = {"addition_embed_type": "text", "addition_embed_type_num_heads": cfg.text_heads} if cfg.text_time_embedding else {}
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        layers_per_block=cfg.unet_layers_per_block,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=8,
        **extra,
    )


def build_scheduler(cfg: ToySDConfig) -> DDIMScheduler:
    return sd1_ddim_scheduler(cfg.prediction_type)


def load_toy_pipeline(folder: str | Path | None = None, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The trained toy pipeline in `folder` (default: the one shipped with the package)."""
    folder = Path(folder) if folder is not None else PIPELINE_DIR
    if not (folder / "model_index.json").is_file():
        raise UserError(f"no toy pipeline in {folder} (train one with scripts/train_toy_world.py)")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=dtype, safety_checker=None, requires_safety_checker=False,
                                                   **shared_tokenizers(folder, read_json(folder / "model_index.json")))
    pipe.set_progress_bar_config(disable=True)
    return pipe
