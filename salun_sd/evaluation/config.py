"""What `salun-sd generate` and `salun-sd evaluate` take: plain dataclasses, loaded from YAML and `--key` flags.

Torch-free, so `--help` is instant. Settings left empty (None, "") take the protocol's value, then the
prompt set's, then the built-in default, in that order; the resolved values are what the run records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

from salun_sd.config import check_settings, setting
from salun_sd.errors import UserError
from salun_sd.evaluation.nudity import DEFAULT_DETECTOR, DEFAULT_THRESHOLD, EXPOSED_CLASSES
from salun_sd.evaluation.protocols import get_protocol
from salun_sd.families.config import SingleFileSource

Metric = Literal["nudenet", "clip", "fid", "ua"]

@dataclass
class GenerateConfig:
    """Images from a prompt set: the same prompts and seeds through a base and an erased model."""

    model: str = setting("", "pipeline folder of SD-1.x/2.x, SDXL, SD3 or FLUX.1 (e.g. one exported by salun-sd), a Hugging Face id, a single .safetensors/.ckpt file, or `tiny` (offline random test pipeline)")
    prompts: str = setting("", "I2P-style or class-prompt CSV, a text file with one prompt per line, or `i2p` (the AIML-TUDA/i2p dataset)")
    output_dir: str = setting("", "folder for the images, metadata.jsonl and manifest.json")
    overwrite: bool = setting(False, "write into OUTPUT_DIR even when its manifest.json says another command's run is there (that manifest is replaced)")
    protocol: str = setting("", "published protocol preset: salun (official SalUn scripts: LMS, 100 steps, guidance 7.5, 512 px, fp32, one generator per prompt), or empty")
    category: list[str] = setting(factory=list, doc="keep prompts tagged with any of these I2P categories (e.g. sexual)")
    min_nudity: float | None = setting(None, "keep prompts with nudity_percentage >= this")
    limit: int = setting(0, "keep only the first N prompts after the other filters; 0: all", at_least=0)
    hf_split: str = setting("train", "split of the Hugging Face dataset with prompts `i2p`")
    images_per_prompt: int = setting(1, "images per prompt", at_least=1)
    steps: int | None = setting(None, "denoising steps (default: the protocol's, else the family's: 50 for SD-1.x/2.x and SDXL, 28 for SD3 and FLUX.1)", at_least=1)
    scheduler: str = setting("", "diffusers scheduler class to sample with, e.g. LMSDiscreteScheduler (default: the protocol's, else the model's own)")
    guidance: float | None = setting(None, "guidance scale for every prompt, FLUX.1-dev's guidance embedding (default: the protocol's, else the prompt set's, else the family's: 7.5 for SD-1.x/2.x and SDXL, 7.0 for SD3, 3.5 for FLUX.1)", at_least=0)
    seed: int | None = setting(None, "seed for every prompt (default: the prompt set's, else 0)", at_least=0)
    seeding: Literal["", "per_image", "per_prompt"] = setting("", "per_image: image k of a prompt uses seed + k; per_prompt: the images of a prompt are successive draws of one generator seeded with its seed (default: the protocol's, else per_image)")
    height: int | None = setting(None, "image height for every prompt, a multiple of the family's (8 for SD-1.x/2.x and SDXL, 16 for SD3 and FLUX.1) (default: the protocol's, else the prompt set's, else the model's)", at_least=1)
    width: int | None = setting(None, "image width for every prompt, a multiple of the family's (default: the protocol's, else the prompt set's, else the model's)", at_least=1)
    batch_size: int = setting(4, "images per pipeline call and process", at_least=1)
    dtype: Literal["", "auto", "fp16", "bf16", "fp32"] = setting("", "auto (fp16 on GPU, fp32 on CPU) | fp16 | bf16 | fp32 (default: the protocol's, else auto)")
    single_file: SingleFileSource = field(default_factory=SingleFileSource)

    def resolve(self) -> GenerateConfig:
        """Fill the protocol's settings into those left empty, then the defaults that do not depend on the model (idempotent)."""
        protocol = get_protocol(self.protocol)
        for key, value in (protocol.generate if protocol else {}).items():
            if getattr(self, key) in (None, ""):
                setattr(self, key, value)
        check_settings(self)
        self.seeding = self.seeding or "per_image"
        self.dtype = self.dtype or "auto"
        return self


@dataclass
class EvaluateConfig:
    """Scores of one folder of generated images, or of a base folder against an erased one."""

    images: str = setting("", "folder of generated images (the base model's when comparing)")
    compare: str = setting("", "second folder (the erased model's), generated from the same prompts and seeds")
    labels: list[str] = setting(factory=list, doc="names of the folders in the report (default: base erased when comparing, else the folder name)")
    output_dir: str = setting("", "report folder (report.json, report.md, grids/, manifest.json)")
    overwrite: bool = setting(False, "write into OUTPUT_DIR even when its manifest.json says another command's run is there (that manifest is replaced)")
    metrics: list[Metric] = setting(factory=list, doc="any of nudenet clip fid ua (default: nudenet clip, plus fid with reference and ua with forget_class)")
    protocol: str = setting("", "published protocol preset for NudeNet: salun (threshold 0.0), unlearndiffatk (0.45, their detector copy's rule), mace (0.6), or empty")
    nudenet_threshold: float | None = setting(None, "a detected exposed part counts when its score is above this (default: the protocol's, else 0.6)")
    nudenet_detector: str = setting("", "how images reach NudeNet: rgb (the network's own order) | pip_path (as NudeDetector().detect(path) of nudenet 3.4: BGR) | unlearndiffatk (their detector copy's rule: RGB, scores from 0.5, NMS 0.5/0.5) (default: the protocol's, else rgb)")
    nudenet_classes: list[str] = setting(factory=lambda: list(EXPOSED_CLASSES), doc="exposed classes that count")
    clip_model: str = setting("ViT-L-14", "open_clip model name for the CLIP score")
    clip_pretrained: str = setting("openai", "open_clip pretrained tag or local checkpoint file")
    reference: str = setting("", "FID reference: a folder of real images, or a .npz of saved statistics")
    save_reference_stats: str = setting("", "save the reference folder's FID statistics to this .npz, to pass as reference next time")
    inception_weights: str = setting("", "local FID Inception weights file (pt_inception-2015-12-05-6726825d.pth), for machines without a network")
    forget_class: list[str] = setting(factory=list, doc="the erased class(es) for unlearning accuracy, ImageNet class names (e.g. church, 'English springer'); several: UA of each, accuracy on the images of none")
    grid_pairs: int = setting(8, "before/after pairs shown in the report; 0 for none", at_least=0)
    batch_size: int = setting(32, "images per model call while scoring", at_least=1)
    device: str = setting("auto", "torch device for scoring; auto: cuda when available, else cpu")

    def resolve(self) -> EvaluateConfig:
        """Fill the protocol's threshold and the default metrics (idempotent)."""
        protocol = get_protocol(self.protocol)
        if self.nudenet_threshold is None:
            self.nudenet_threshold = protocol.nudenet_threshold if protocol else DEFAULT_THRESHOLD
        self.nudenet_detector = self.nudenet_detector or (protocol.nudenet_detector if protocol else DEFAULT_DETECTOR)
        self.metrics = self.metrics or ["nudenet", "clip"] + (["fid"] if self.reference else []) + (["ua"] if self.forget_class else [])
        return self

    def folders(self) -> list[tuple[str, Path]]:
        """(label, folder) of the sets to score, checked against the labels given."""
        require(self, "evaluate", ("images", "output_dir"))
        folders = [Path(self.images)] + ([Path(self.compare)] if self.compare else [])
        labels = self.labels or (["base", "erased"] if self.compare else [folders[0].name])
        if len(labels) != len(folders):
            raise UserError(f"--labels names {len(labels)} folder(s) but {len(folders)} are given.")
        return list(zip(labels, folders))


def require(cfg: GenerateConfig | EvaluateConfig, command: str, names: tuple[str, ...]) -> None:
    """Fail naming the first setting the command cannot run without."""
    for name in names:
        if not getattr(cfg, name):
            raise UserError(f"{command} needs --{name} (or `{name}:` in its config file).")
