"""The SD-1.x architecture at full size (UNet, VAE, CLIP text tower), for benchmarks that build it with random weights.

Benchmark-only, so it lives with the scripts that use it (they import it as `reference_models`: a
script's own folder is first on sys.path), not in the installed package. The cost of a step does not
depend on the weight values, so speed and memory at real size can be measured without downloading a
checkpoint. Values are those of CompVis/stable-diffusion-v1-4's
unet/, vae/ and text_encoder/ configs (SD-1.5 has the same); the UNet has 859,520,964 parameters.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from salun_sd.sd.tiny import CLIP_MAX_LENGTH

SD14_UNET_CONFIG: dict[str, object] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# The SD-1.x VAE (vae/config.json), 84 M parameters.
SD14_VAE_CONFIG: dict[str, object] = dict(
    act_fn="silu",
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
)
# CLIP ViT-L/14 text tower (text_encoder/config.json), 123 M parameters.
SD14_TEXT_CONFIG: dict[str, object] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=CLIP_MAX_LENGTH,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)

# SD-1.x training noise schedule (scheduler/scheduler_config.json of the same repository).
SD14_SCHEDULER_CONFIG: dict[str, object] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


def sd14_unet(device: torch.device | str = "cpu", seed: int = 0, config: dict[str, object] | None = None) -> UNet2DConditionModel:
    """A randomly initialised UNet (SD-1.4's unless `config` is given), built directly on `device`.

    device="meta" gives the shapes without allocating (for FLOP counting and parameter lists).
    """
    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**(config or SD14_UNET_CONFIG))


def sd14_noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SD14_SCHEDULER_CONFIG)
