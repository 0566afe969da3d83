"""Full-size architectures (SD-1.x UNet, VAE, CLIP text tower; SDXL, SD3.5 and FLUX.1 denoisers), for benchmarks that build them with random weights.

Benchmark-only, so it lives with the scripts that use it (they import it as `reference_models`: a
script's own folder is first on sys.path), not in the installed package. The cost of a step does not
depend on the weight values, so speed and memory at real size can be measured without downloading a
checkpoint. Values are those of CompVis/stable-diffusion-v1-4's
unet/, vae/ and text_encoder/ configs (SD-1.5 has the same); the UNet has 859,520,964 parameters.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from salun_sd.families.tiny import CLIP_MAX_LENGTH

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


# The denoisers of the later families, as published in each repository's unet/ or transformer/config.json
# (values the config files state; diffusers defaults fill the rest). Parameter counts from these configs.
# stabilityai/stable-diffusion-xl-base-1.0 unet/: 2,567,463,684 parameters.
SDXL_UNET_CONFIG: dict[str, object] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
# stabilityai/stable-diffusion-3.5-medium transformer/ (MMDiT-X: blocks 0-12 add a second image self-attention): 2,243,171,520 parameters.
SD35_MEDIUM_CONFIG: dict[str, object] = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
# stabilityai/stable-diffusion-3.5-large transformer/: 8,056,627,520 parameters.
SD35_LARGE_CONFIG: dict[str, object] = {
    **SD35_MEDIUM_CONFIG,
    "caption_projection_dim": 2432,
    "dual_attention_layers": [],
    "num_attention_heads": 38,
    "num_layers": 38,
    "pos_embed_max_size": 192,
}
# SD3's scheduler/scheduler_config.json (SD3.5 the same).
SD3_SCHEDULER_CONFIG: dict[str, object] = {"num_train_timesteps": 1000, "shift": 3.0}
# black-forest-labs/FLUX.1-dev transformer/: 11,901,408,320 parameters.
FLUX_DEV_CONFIG: dict[str, object] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
# FLUX.1-dev's scheduler/scheduler_config.json.
FLUX_SCHEDULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096,
}

