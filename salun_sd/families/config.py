"""What one Stable Diffusion erase needs to know: data groups, mask, training, output.

Plain dataclasses (no torch or diffusers imports), loaded from YAML and `--key` flags by salun_sd.config.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

from salun_sd.core.config import MaskConfig, TrainConfig
from salun_sd.errors import UserError


@dataclass
class ImageGroup:
    """One prompt and where its images come from (set exactly one of generate, folder, hf_dataset)."""

    prompt: str = ""
    generate: int = 0  # number of images the base pipeline draws from the prompt
    folder: str = ""  # or: a folder of images
    hf_dataset: str = ""  # or: a Hugging Face dataset ...
    hf_config: str = ""  # ... its configuration (e.g. "160px" for frgfm/imagenette)
    hf_split: str = "train"
    hf_label: int = -1  # ... and the class index to take
    limit: int = 0  # use at most this many images (0: all)

    def source(self) -> str:
        given = [name for name, on in (("generate", self.generate > 0), ("folder", bool(self.folder)), ("hf_dataset", bool(self.hf_dataset))) if on]
        if len(given) != 1:
            raise UserError(f"image group {self.prompt!r} must set exactly one of generate, folder, hf_dataset (it sets {given or 'none'})")
        return given[0]


@dataclass
class DataConfig:
    """Forget set D_f, remain set D_r, and the misaligned prompts c' (default: the remain prompts)."""

    forget: list[ImageGroup] = field(default_factory=list)
    remain: list[ImageGroup] = field(default_factory=list)
    misaligned_prompts: list[str] = field(default_factory=list)
    concept_words: list[str] = field(default_factory=list)  # words naming the concept in the forget prompts (fmn); default: forget-prompt words no remain prompt has
    resolution: int = 0  # training image size; 0: the UNet's native size (512 for SD-1.x)
    generation_steps: int = 50  # sampler steps when the base model draws D_f/D_r images
    generation_guidance: float = 7.5  # guidance scale for those images
    generation_batch_size: int = 8  # images drawn per pipeline call
    seed: int = 0  # image i of a generated group uses seed + i
    cache_dir: str = ""  # default: $SALUN_SD_CACHE or ~/.cache/salun_sd

    def misaligned(self) -> list[str]:
        return self.misaligned_prompts or [g.prompt for g in self.remain]

    def concept(self) -> list[str]:
        """The concept's words: given, or those of the forget prompts that no remain prompt uses ("nude" in "a photo of a nude person")."""
        if self.concept_words:
            return self.concept_words
        remain = {w for g in self.remain for w in words(g.prompt)}
        return list(dict.fromkeys(w for g in self.forget for w in words(g.prompt) if w not in remain))


def words(prompt: str) -> list[str]:
    return re.findall(r"[\w']+", prompt.lower())


@dataclass
class SingleFileSource:
    """How to read a single-file --model (.safetensors / .ckpt of SD-1.x, SD-2.x or SDXL, as A1111 and ComfyUI use them)."""

    config: str = ""  # diffusers folder or Hub ID whose component configs and tokenizers describe the file (offline: a local folder); default: diffusers' reference model of the detected family
    ema: bool = False  # load the EMA UNet where the file holds both (the official SalUn run starts from the non-EMA UNet of sd-v1-4-full-ema.ckpt)


@dataclass
class SingleFileConfig(SingleFileSource):
    """A single-file --model and a single-file export."""

    export: bool = False  # also write OUTPUT_DIR/model.safetensors: the erased model in the base file's own layout (needs a single-file --model)


UCE_TARGETS = ("empty", "misaligned")
UCE_TOKENS = ("last", "trailing")


@dataclass
class UCEConfig:
    """UCE (`--method uce`, salun_sd.families.uce): a closed-form edit of the cross-attention key/value projections, no mask or training loop.

    Defaults: the official trainscripts/uce_sd_erase.py (rohitgandikota/unified-concept-editing)."""

    target: str = "empty"  # what the concept words' keys/values become: empty (the empty prompt's, UCE's guide for objects and unsafe concepts) | misaligned (the c' prompts', averaged)
    preserve: list[str] = field(default_factory=list)  # concepts whose keys/values are kept (UCE's preserve_concepts); default: the remain prompts
    tokens: str = "last"  # last: each text's last word token (uce_sd_erase.py) | trailing: from it to the end of the padded sequence, preserved texts whole (the paper-era train_erase.py)
    erase_scale: float = 1.0  # weight of the erased concepts in the least squares
    preserve_scale: float = 1.0  # weight of the preserved concepts (train_erase.py: 0.1)
    lamb: float = 0.5  # λ: weight of staying at the original projection; must be positive (it keeps the edit defined off the texts' span)

    def check(self) -> None:
        for name, value, allowed in (("target", self.target, UCE_TARGETS), ("tokens", self.tokens, UCE_TOKENS)):
            if value not in allowed:
                raise UserError(f"uce.{name} must be one of {', '.join(allowed)}, got {value!r}")
        for name in ("erase_scale", "preserve_scale"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UserError(f"uce.{name} must be a non-negative number, got {getattr(self, name)}")
        if not (math.isfinite(self.lamb) and self.lamb > 0):
            raise UserError(f"uce.lamb must be a positive number, got {self.lamb}")


@dataclass
class EraseConfig:
    """A whole SD erase. Defaults reproduce the official SalUn nudity run on SD v1.4."""

    RENAMED: ClassVar[dict[str, str]] = {"train": "unlearn", "export_unet_only": "export_network_only"}  # one name in SD and DDPM configs, true for every family

    model: str = "CompVis/stable-diffusion-v1-4"  # Hub ID, local folder, single .safetensors/.ckpt file, or "tiny" (offline random weights)
    concept: str = ""  # name of the erased concept, for the model card
    output_dir: str = "outputs/erase"  # run folder: mask, checkpoints, manifest, pipeline/
    overwrite: bool = False  # replace an existing run folder
    mixed_precision: str = "no"  # no | fp16 | bf16 (Accelerate autocast; weights stay fp32)
    export_network_only: bool = False  # export the denoiser alone (the UNet, or SD3/FLUX's transformer) instead of the whole pipeline
    validation_grid: bool = True  # write OUTPUT_DIR/validation.png: base (top) vs erased on the forget prompts and a remain prompt, fixed seed
    single_file: SingleFileConfig = field(default_factory=SingleFileConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    unlearn: TrainConfig = field(default_factory=TrainConfig)
    uce: UCEConfig = field(default_factory=UCEConfig)
