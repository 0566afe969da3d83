"""Test helper: a diffusers SD-1.x pipeline written in the original (LDM / CompVis) single-file layout.

The package reads and writes single files through diffusers' own conversion; the tests need a tiny file
in the original layout to start from, and no such file can be downloaded here. Only the names the tiny
pipelines use are mapped. diffusers' from_single_file is the judge that the layout is right.
"""

from __future__ import annotations

import re

import torch
from diffusers import StableDiffusionPipeline

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET[head]}.{tail}"


def unet_key(name: str, layers: int, up_with_attention: set[int]) -> str:
    """LDM name of a diffusers UNet2DConditionModel weight (input_blocks / middle_block / output_blocks)."""
    stem, _, param = name.rpartition(".")
    if stem in UNET_FIXED:
        return f"{UNET_FIXED[stem]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        i = 1 + int(m[1]) * (layers + 1) + int(m[3])
        return f"input_blocks.{i}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"input_blocks.{i}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.*)", name):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        i = int(m[1]) * (layers + 1) + int(m[3])
        return f"output_blocks.{i}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"output_blocks.{i}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
        block = int(m[1])
        return f"output_blocks.{block * (layers + 1) + layers}.{2 if block in up_with_attention else 1}.conv.{m[2]}"
    raise KeyError(name)


def vae_key(name: str, levels: int) -> str:
    """LDM name of a diffusers AutoencoderKL weight (encoder.down.i.block.j, decoder.up reversed, mid.attn_1)."""
    name = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
    name = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", name)
    name = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", name)
    name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
    name = name.replace("mid_block.attentions.0.", "mid.attn_1.")
    for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        name = name.replace(f"attn_1.{new}.", f"attn_1.{old}.")
    return name


def ldm_checkpoint(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """UNet, VAE and CLIP text encoder under the keys of an original SD-1.x checkpoint (e.g. sd-v1-4.ckpt)."""
    unet, levels = pipe.unet, len(pipe.vae.config.block_out_channels)
    up_with_attention = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    out = {f"model.diffusion_model.{unet_key(n, unet.config.layers_per_block, up_with_attention)}": p.clone() for n, p in unet.state_dict().items()}
    for n, p in pipe.vae.state_dict().items():
        is_attention = ".attentions.0.to_" in n and n.endswith("weight")
        out[f"first_stage_model.{vae_key(n, levels)}"] = p[:, :, None, None].clone() if is_attention else p.clone()  # LDM: 1x1 convolutions
    out.update({f"cond_stage_model.transformer.text_model.{n.removeprefix('text_model.')}": p.clone() for n, p in pipe.text_encoder.state_dict().items()})
    return out


def with_ema(checkpoint: dict[str, torch.Tensor], shift: float) -> dict[str, torch.Tensor]:
    """Add an EMA copy of the UNet under LDM's flattened `model_ema.*` names, `shift` away from the raw weights."""
    ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): v + shift for k, v in checkpoint.items() if k.startswith("model.diffusion_model.")}
    return {**checkpoint, **ema}
