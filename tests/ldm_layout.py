"""Test helper: a diffusers SD-1.x or SDXL pipeline written in the original (LDM / CompVis / SGM) single-file layout.

The package reads and writes single files through diffusers' own conversion; the tests need a tiny file
in the original layout to start from, and no such file can be downloaded here. Only the names the tiny
pipelines use are mapped. diffusers' from_single_file is the judge that the layout is right.
"""

from __future__ import annotations

import re

import torch
from diffusers import DiffusionPipeline
from torch import nn

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2", "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
OPEN_CLIP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight", "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}


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


def open_clip_weights(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection under OpenCLIP's names (SDXL's second encoder): q, k, v in one in_proj, projection transposed."""
    state = text_encoder.state_dict()
    out = {old: state[new].clone() for new, old in OPEN_CLIP.items()}
    out["text_projection"] = state["text_projection.weight"].T.contiguous()
    for i in range(text_encoder.config.num_hidden_layers):
        layer, block = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{block}attn.in_proj_{kind}"] = torch.cat([state[f"{layer}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for new, old in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{block}{old}.{kind}"] = state[f"{layer}{new}.{kind}"].clone()
    return out


def ldm_checkpoint(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """UNet, VAE and text encoder(s) under the keys of an original checkpoint (sd-v1-4.ckpt, sd_xl_base_1.0.safetensors)."""
    unet, levels = pipe.unet, len(pipe.vae.config.block_out_channels)
    up_with_attention = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    out = {f"model.diffusion_model.{unet_key(n, unet.config.layers_per_block, up_with_attention)}": p.clone() for n, p in unet.state_dict().items()}
    for n, p in pipe.vae.state_dict().items():
        is_attention = ".attentions.0.to_" in n and n.endswith("weight")
        out[f"first_stage_model.{vae_key(n, levels)}"] = p[:, :, None, None].clone() if is_attention else p.clone()  # LDM: 1x1 convolutions
    sdxl = hasattr(pipe, "text_encoder_2")
    clip = "conditioner.embedders.0.transformer.text_model." if sdxl else "cond_stage_model.transformer.text_model."
    out.update({f"{clip}{n.removeprefix('text_model.')}": p.clone() for n, p in pipe.text_encoder.state_dict().items()})
    if sdxl:
        out.update({f"conditioner.embedders.1.model.{k}": v for k, v in open_clip_weights(pipe.text_encoder_2).items()})
    return out


def with_ema(checkpoint: dict[str, torch.Tensor], shift: float) -> dict[str, torch.Tensor]:
    """Add an EMA copy of the UNet under LDM's flattened `model_ema.*` names, `shift` away from the raw weights."""
    ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): v + shift for k, v in checkpoint.items() if k.startswith("model.diffusion_model.")}
    return {**checkpoint, **ema}
