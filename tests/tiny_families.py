"""Tiny SDXL-, SD3- and FLUX-shaped pipelines for the tests (and, for their layouts, scripts/bench_erase.py --cpu-smoke).

Every component is the real diffusers/transformers class built from a config with random weights,
shaped like the real model where it matters: SDXL's two text encoders and added conditions, SD3.5's
dual attention and RMS q/k norms, the SD3/FLUX VAE's shift_factor and no quant convs, FLUX-dev's
guidance embedding and 2x2 latent packing. CLIP tokenizers are the real BPE one
(salun_sd/families/tiny.py); FLUX's T5 tokenizer is a character-level unigram vocabulary, since T5's
SentencePiece model cannot be downloaded here. SD3 runs without T5, as diffusers allows
(text_encoder_3=None: the pipeline puts zeros in T5's place).
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKL, FluxPipeline, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionXLPipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from salun_sd.families.tiny import clip_tokenizer, sd1_ddim_scheduler, tiny_clip_config, tiny_unet, tiny_vae


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
