"""The class-conditional UNet and its noise schedule, built from a config.

The official SalUn CIFAR-10 model (the DDIM codebase's "simple" UNet: ch 128, multipliers 1,2,2,2,
2 res blocks, attention at 16x16, dropout 0.1) maps onto diffusers' `UNet2DModel`; the class
embedding has one extra row, the "null" class, which stands for "no condition" in guidance.

Where ours differs: the official network maps the class through an embedding and a 2-layer MLP and
concatenates it with the time embedding before each ResBlock's projection; `UNet2DModel` looks up a
class vector of the time embedding's width and adds it. Both can give any vector per class, but the
ResBlocks see act(t_emb + c_emb) instead of [act(t_emb), act(c_emb)], and the class MLP (0.33 M weights)
and the class half of each ResBlock's projection are not there for the saliency mask to pick. `UNet2DModel`
has no option to concatenate; `UNet2DConditionModel`'s `class_embeddings_concat` would bring another model
class and folder format to every DDPM command, for a difference we state instead (docs/RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import DDPMScheduler, UNet2DModel

from salun_sd.ddpm.adapter import ClassConditionedDenoiser
from salun_sd.ddpm.config import ModelConfig
from salun_sd.errors import UserError
from salun_sd.run.files import atomic, nbytes


def build_unet(cfg: ModelConfig) -> UNet2DModel:
    """A freshly initialised UNet2DModel; down/up blocks get attention where the feature map is in attention_resolutions."""
    sizes = [cfg.sample_size // 2**i for i in range(len(cfg.block_out_channels))]
    if sizes[-1] < 1:
        raise UserError(f"model.sample_size {cfg.sample_size} is too small for {len(cfg.block_out_channels)} resolution levels")
    attn = [s in cfg.attention_resolutions for s in sizes]
    return UNet2DModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        add_attention=cfg.mid_attention,
        attention_head_dim=None,  # one head over all channels, as in the official model
        dropout=cfg.dropout,
        norm_num_groups=cfg.norm_num_groups,
        num_class_embeds=cfg.num_classes + 1,
    )


def build_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    """Linear betas; clip_sample off: the guided x0 estimate leaves [-1, 1] on its way, and clipping it there breaks guided sampling."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="linear",
        clip_sample=False,
        prediction_type="epsilon",
    )


def save_model(unet: UNet2DModel, scheduler: DDPMScheduler, folder: Path, ema_unet: UNet2DModel | None = None) -> None:
    """`folder/unet` (raw weights), `folder/unet_ema` (EMA weights, if any) and `folder/scheduler` in diffusers' format,
    each folder whole or not at all; `unet`, which marks a model as there (load_denoiser), comes last."""
    parts = [("scheduler", scheduler), *([("unet_ema", ema_unet)] if ema_unet is not None else []), ("unet", unet)]
    for name, part in parts:
        with atomic(folder / name, lambda: nbytes(part)) as tmp:
            part.save_pretrained(tmp)


def load_denoiser(folder: str | Path, weights: str = "raw") -> ClassConditionedDenoiser:
    """The trained (or erased) model in `folder`, as written by save_model: raw weights, or EMA ones where saved."""
    folder = Path(folder)
    if weights not in ("raw", "ema"):
        raise UserError(f"weights must be raw or ema, got {weights!r}")
    if not (folder / "unet" / "config.json").is_file():
        raise UserError(f"{folder} holds no DDPM model (expected {folder / 'unet'}); train one with `salun-sd ddpm train`")
    unet = UNet2DModel.from_pretrained(folder / ("unet_ema" if weights == "ema" and (folder / "unet_ema").is_dir() else "unet"))
    unet.requires_grad_(False)
    return ClassConditionedDenoiser(unet.eval(), DDPMScheduler.from_pretrained(folder / "scheduler"))
