"""Offline SD3-shaped and FLUX-shaped pipelines small enough for CPU tests.

Every component is the real diffusers/transformers class built from a config with random weights,
shaped like the real model where it matters: SD3.5's dual attention and RMS q/k norms, the VAE's
shift_factor and no quant convs, FLUX-dev's guidance embedding and 2x2 latent packing. CLIP
tokenizers are the real BPE one (tiny.py); FLUX's T5 tokenizer is a character-level unigram
vocabulary, since T5's SentencePiece model cannot be downloaded here. SD3 runs without T5, as
diffusers allows (text_encoder_3=None: the pipeline puts zeros in T5's place).
"""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from salun_sd.families.tiny import clip_tokenizer, tiny_clip_config, tiny_vae

# SD3.5's layout (dual attention in block 0, RMS q/k norm) at toy width; joint_attention_dim > the two CLIPs' 64, as T5's 4096 > 2048.
TINY_SD3_TRANSFORMER: dict[str, object] = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
    joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
)
# FLUX.1-dev's layout (double- then single-stream blocks, guidance embedding) at toy width; in_channels = 4 latent channels x 2x2 packing.
TINY_FLUX_TRANSFORMER: dict[str, object] = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
)


def _vae(sample_size: int, shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    """The tiny VAE with the SD3/FLUX VAE's normalisation (latents = (z − shift) · scale) and no quant convs."""
    return tiny_vae(sample_size, scaling_factor, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def t5_tokenizer() -> T5Tokenizer:
    """A T5 (unigram) tokenizer over single characters: every ASCII prompt tokenizes without <unk>."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_sd3_pipeline(seed: int = 0, sample_size: int = 32) -> StableDiffusion3Pipeline:
    """An SD3.5-shaped pipeline without T5: 32 px images, 8x8x4 latents, 2x2 patches."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**{**TINY_SD3_TRANSFORMER, "sample_size": sample_size // 4})
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's scheduler_config.json
        vae=_vae(sample_size, shift_factor=0.0609, scaling_factor=1.5305),  # SD3's vae/config.json values
        text_encoder=CLIPTextModelWithProjection(tiny_clip_config(32, projection_dim=32)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(tiny_clip_config(32, projection_dim=32)),
        tokenizer_2=clip_tokenizer(pad_token="!"),  # CLIP-G's tokenizer pads with "!", as in SDXL
        text_encoder_3=None,
        tokenizer_3=None,
    )


def tiny_flux_pipeline(seed: int = 0, sample_size: int = 32, guidance_embeds: bool = True) -> FluxPipeline:
    """A FLUX.1-dev-shaped pipeline (guidance_embeds=False: schnell-shaped): 32 px images, 8x8x4 latents packed to 16 tokens of 16."""
    torch.manual_seed(seed)
    tokenizer_2 = t5_tokenizer()
    transformer = FluxTransformer2DModel(**{**TINY_FLUX_TRANSFORMER, "guidance_embeds": guidance_embeds})
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0)).eval()  # no dropout, as loaded
    return FluxPipeline(
        transformer=transformer,
        # FLUX.1-dev's scheduler_config.json: the shift depends on the image size at sampling, none in training
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=_vae(sample_size, shift_factor=0.1159, scaling_factor=0.3611),  # FLUX's vae/config.json values
        text_encoder=CLIPTextModel(tiny_clip_config(32)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
    )
