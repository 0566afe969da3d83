"""What one Stable Diffusion erase needs to know: data groups, mask, training, output.

Plain dataclasses (no torch or diffusers imports), loaded from YAML and `--key` flags by salun_sd.config.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal

from salun_sd.config import check_settings, setting
from salun_sd.core.config import MaskConfig, MixedPrecision, TrainConfig
from salun_sd.errors import UserError
from salun_sd.evaluation.imagefiles import MAX_IMAGE_PIXELS


@dataclass
class ImageGroup:
    """One prompt and where its images come from (set exactly one of generate, folder, hf_dataset)."""

    prompt: str = ""
    generate: int = setting(0, "number of images the base pipeline draws from the prompt", at_least=0)
    folder: str = setting("", "or: a folder of images")
    hf_dataset: str = setting("", "or: a Hugging Face dataset ...")
    hf_config: str = setting("", "... its configuration (e.g. \"160px\" for frgfm/imagenette)")
    hf_split: str = "train"
    hf_label: int = setting(-1, "... and the class index to take")
    limit: int = setting(0, "use at most this many images (0: all)", at_least=0)

    def source(self) -> str:
        given = [name for name, on in (("generate", self.generate > 0), ("folder", bool(self.folder)), ("hf_dataset", bool(self.hf_dataset))) if on]
        if len(given) != 1:
            raise UserError(f"image group {self.prompt!r} must set exactly one of generate, folder, hf_dataset (it sets {given or 'none'})")
        return given[0]


@dataclass
class ConceptConfig:
    """One concept of a multi-concept erase: its own forget data, misaligned concept c' and words."""

    name: str = setting("", "how the model card and per-concept reports name it (default: its first forget prompt)")
    forget: list[ImageGroup] = setting(factory=list, doc="its forget set")
    misaligned_prompts: list[str] = setting(factory=list, doc="its c' (default: data.misaligned_prompts, else the remain prompts)")
    concept_words: list[str] = setting(factory=list, doc="words naming it in its forget prompts (fmn, attack); default: its forget-prompt words no remain prompt has")
    weight: float = setting(1.0, "its examples' weight in the forget term and in the mask's gradient", at_least=0)


CONCEPT_COLUMNS = ("name", "forget", "misaligned")  # required columns of data.concepts_file; optional: words, weight


@dataclass
class DataConfig:
    """Forget set D_f, remain set D_r, and the misaligned prompts c' (default: the remain prompts).

    One concept: data.forget (+ misaligned_prompts, concept_words). Several: data.concepts and/or
    data.concepts_file, each concept with its own forget data and c', and the one shared remain set.
    """

    forget: list[ImageGroup] = field(default_factory=list)
    remain: list[ImageGroup] = field(default_factory=list)
    misaligned_prompts: list[str] = field(default_factory=list)
    concept_words: list[str] = setting(factory=list, doc="words naming the concept in the forget prompts (fmn); default: forget-prompt words no remain prompt has")
    concepts: list[ConceptConfig] = setting(factory=list, doc="several concepts erased at once (instead of data.forget)")
    concepts_file: str = setting("", "CSV of concepts, one a row, columns name, forget, misaligned (several prompts split by |), optional words, weight")
    concepts_file_generate: int = setting(800, "images the base model draws for each forget prompt of a concepts_file row", at_least=1)
    keep_erased: bool = setting(True, "--model is a salun-sd export: the forget prompts of the concepts it erased join the remain set, drawn by it, so they stay erased")
    resolution: int = setting(0, "training image size, a multiple of the family's (8 for SD-1.x/2.x and SDXL, 16 for SD3 and FLUX.1); 0: the network's native size (512 for SD-1.x)", at_least=0)
    generation_steps: int = setting(50, "sampler steps when the base model draws D_f/D_r images", at_least=1)
    generation_guidance: float = setting(7.5, "guidance scale for those images", at_least=0)
    generation_batch_size: int = setting(8, "images drawn per pipeline call", at_least=1)
    seed: int = setting(0, "image i of a generated group uses seed + i", at_least=0)
    cache_dir: str = setting("", "default: $SALUN_SD_CACHE or ~/.cache/salun_sd")
    max_image_pixels: int = setting(MAX_IMAGE_PIXELS, "a folder image with more pixels is refused before it is decoded (the default passes the largest phone photos, 16320x12240, and stops decompression bombs); 0: no limit", at_least=0)

    def misaligned(self) -> list[str]:
        return self.misaligned_prompts or [g.prompt for g in self.remain]

    def concept(self) -> list[str]:
        """The concept's words: given, or those of the forget prompts that no remain prompt uses ("nude" in "a photo of a nude person")."""
        return self.concept_words or self.unshared_words(self.forget)

    def unshared_words(self, groups: list[ImageGroup]) -> list[str]:
        """Words of `groups`' prompts that no remain prompt uses; none without a remain set (nothing to tell them from)."""
        if not self.remain:
            return []
        remain = {w for g in self.remain for w in words(g.prompt)}
        return list(dict.fromkeys(w for g in groups for w in words(g.prompt) if w not in remain))

    def concept_list(self, single_name: str = "", uses_misaligned: bool = True) -> list[ConceptConfig]:
        """Every concept to erase with its defaults filled in (c', words, name), checked; no model needed.

        data.forget is the one concept named `single_name` (the config's `concept`), exactly as before
        multi-concept configs existed; data.concepts and data.concepts_file list several. c' (each concept's misaligned
        prompts) is checked only when `uses_misaligned` (the method draws it: SalUn, RL).
        """
        listed = [*self.concepts, *(read_concepts_file(self.concepts_file, self.concepts_file_generate) if self.concepts_file else [])]
        if listed and self.forget:
            raise UserError("give data.forget (one concept) or data.concepts / data.concepts_file (several), not both")
        if listed and single_name:
            raise UserError("`concept` names the one concept of data.forget; with data.concepts each concept has its own name")
        if not listed and not self.forget:
            raise UserError("the forget set is empty: give data.forget at least one group with a prompt and images (or data.concepts)")
        resolved = [] if listed else [ConceptConfig(single_name or self.forget[0].prompt, self.forget, self.misaligned(), self.concept())]
        for i, c in enumerate(listed):
            name = c.name or (c.forget[0].prompt if c.forget else f"concept {i + 1}")
            if not c.forget:
                raise UserError(f"concept {name!r} has no forget data: give it at least one forget group")
            check_settings(c, f"concept {name!r}: ")  # a concepts_file row is checked only here
            resolved.append(replace(c, name=name, misaligned_prompts=c.misaligned_prompts or self.misaligned(), concept_words=c.concept_words or self.unshared_words(c.forget)))
        names = [c.name for c in resolved]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise UserError(f"two concepts are named {duplicate!r}: concept names must be unique")
        forget_of = {g.prompt: c.name for c in resolved for g in c.forget}
        for c in resolved if uses_misaligned else []:  # c' is checked only for a method that draws one
            same = next((p for p in c.misaligned_prompts if p == c.name or forget_of.get(p) == c.name), None)
            if same is not None:
                raise UserError(f"concept {c.name!r}: its misaligned prompt c' {same!r} is the concept itself; c' must be another concept")
            erased = next((p for p in c.misaligned_prompts if p in forget_of), None)
            if erased is not None:
                raise UserError(f"concept {c.name!r}: its misaligned prompt c' {erased!r} is a forget prompt of concept {forget_of[erased]!r}, which is erased too")
        if not any(c.weight > 0 for c in resolved):
            raise UserError("every concept has weight 0: at least one must count in the forget term")
        return resolved


def read_concepts_file(path: str, generate: int) -> list[ConceptConfig]:
    """Concepts from a CSV, one a row: name, forget prompt(s), c' (several split by |), optional words, weight.

    Each forget prompt gets `generate` images drawn by the base model, so "these 50 artists" is one file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"data.concepts_file {path} does not exist")
    with file.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CONCEPT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"data.concepts_file {path} needs a header row with columns {', '.join(CONCEPT_COLUMNS)} (missing {missing[0]!r})")
        rows = list(reader)
    if not rows:
        raise UserError(f"data.concepts_file {path} lists no concept")

    def split(cell: str | None) -> list[str]:
        return [p.strip() for p in (cell or "").split("|") if p.strip()]

    concepts = []
    for line, row in enumerate(rows, start=2):
        try:
            weight = float(row.get("weight") or 1.0)
        except ValueError:
            raise UserError(f"data.concepts_file {path} line {line}: weight must be a number, got {row['weight']!r}") from None
        forget = [ImageGroup(prompt=p, generate=generate) for p in split(row["forget"])]
        concepts.append(ConceptConfig((row["name"] or "").strip(), forget, split(row["misaligned"]), split(row.get("words")), weight))
    return concepts


def words(prompt: str) -> list[str]:
    return re.findall(r"[\w']+", prompt.lower())


@dataclass
class SingleFileSource:
    """How to read a single-file --model (.safetensors / .ckpt of SD-1.x, SD-2.x or SDXL, as A1111 and ComfyUI use them)."""

    config: str = setting("", "diffusers folder or Hub ID whose component configs and tokenizers describe the file (offline: a local folder); default: diffusers' reference model of the detected family")
    ema: bool = setting(False, "load the EMA UNet where the file holds both (the official SalUn run starts from the non-EMA UNet of sd-v1-4-full-ema.ckpt)")


@dataclass
class SingleFileConfig(SingleFileSource):
    """A single-file --model and a single-file export."""

    export: bool = setting(False, "also write OUTPUT_DIR/model.safetensors: the erased model in the base file's own layout (needs a single-file --model)")


@dataclass
class UCEConfig:
    """UCE (`--method uce`, salun_sd.families.uce): a closed-form edit of the cross-attention key/value projections, no mask or training loop.

    Defaults: the official trainscripts/uce_sd_erase.py (rohitgandikota/unified-concept-editing)."""

    target: Literal["empty", "misaligned"] = setting("empty", "what the concept words' keys/values become: empty (the empty prompt's, UCE's guide for objects and unsafe concepts) | misaligned (the c' prompts', averaged)")
    preserve: list[str] = setting(factory=list, doc="concepts whose keys/values are kept (UCE's preserve_concepts); default: the remain prompts (from an export, with data.keep_erased, also the concepts it erased)")
    tokens: Literal["last", "trailing"] = setting("last", "last: each text's last word token (uce_sd_erase.py) | trailing: from it to the end of the padded sequence, preserved texts whole (the paper-era train_erase.py)")
    erase_scale: float = setting(1.0, "weight of the erased concepts in the least squares", at_least=0)
    preserve_scale: float = setting(1.0, "weight of the preserved concepts (train_erase.py: 0.1)", at_least=0)
    lamb: float = setting(0.5, "λ: weight of staying at the original projection (positive: it keeps the edit defined off the texts' span)", above=0)


@dataclass
class EraseConfig:
    """A whole SD erase. Defaults reproduce the official SalUn nudity run on SD v1.4."""

    RENAMED: ClassVar[dict[str, str]] = {"train": "unlearn", "export_unet_only": "export_network_only"}  # one name in SD and DDPM configs, true for every family

    model: str = setting("CompVis/stable-diffusion-v1-4", "Hub ID, local folder, single .safetensors/.ckpt file, or \"tiny\" (offline random weights)")
    concept: str = setting("", "name of the erased concept, for the model card")
    output_dir: str = setting("outputs/erase", "run folder: mask, checkpoints, manifest, pipeline/")
    overwrite: bool = setting(False, "replace an existing run folder")
    mixed_precision: MixedPrecision = setting("no", "no | fp16 | bf16 (Accelerate autocast; weights stay fp32)")
    export_network_only: bool = setting(False, "export the denoiser alone (the UNet, or SD3/FLUX's transformer) instead of the whole pipeline")
    validation_grid: bool = setting(True, "write OUTPUT_DIR/validation.png: base (top) vs erased on the forget prompts and a remain prompt, fixed seed")
    single_file: SingleFileConfig = field(default_factory=SingleFileConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    unlearn: TrainConfig = field(default_factory=TrainConfig)
    uce: UCEConfig = field(default_factory=UCEConfig)
