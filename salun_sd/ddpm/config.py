"""One YAML config per dataset serves every `salun-sd ddpm` command; each reads the sections it needs.

Default folders all lie under `work_dir`:
    base/                  the base model (unet/, scheduler/, checkpoints/, manifest.json)
    retrain-class<k>/      Retrain: trained from scratch without class k (the gold standard)
    <method>-class<k>/     the erased model (mask.safetensors, unet/, scheduler/, checkpoints/)
    classifier/            the judge for UA, accuracy and offline FID
Each model folder gets samples/ from `ddpm sample` and eval.json from `ddpm evaluate`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator

from salun_sd.ddpm.classifier import ClassifierConfig
from salun_sd.ddpm.data import DataConfig
from salun_sd.ddpm.model import ModelConfig
from salun_sd.ddpm.sample import SampleConfig
from salun_sd.ddpm.train import BaseTrainConfig
from salun_sd.errors import UserError
from salun_sd.core_config import MaskConfig, TrainConfig
from salun_sd.trainer import list_checkpoints


@dataclass
class EvalConfig:
    """Evaluation of a model folder: samples_per_class images per class with the `sample` settings."""

    samples_per_class: int = 500
    features: str = "inception"  # FID features: inception (standard; needs torch-fidelity and its weights) | classifier
    inception_weights: str = ""  # local pt_inception-2015-12-05 weights file, for machines without a network


@dataclass
class DDPMConfig:
    """The whole DDPM experiment. Defaults are the official SalUn CIFAR-10 settings."""

    work_dir: str = "outputs/ddpm-cifar10"
    forget_class: int = 0
    overwrite: bool = False  # replace earlier results in the target folder
    mixed_precision: str = "no"  # no | fp16 | bf16
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: BaseTrainConfig = field(default_factory=BaseTrainConfig)
    mask: MaskConfig = field(default_factory=lambda: MaskConfig(guidance=2.0, batch_size=128))
    unlearn: TrainConfig = field(default_factory=lambda: TrainConfig(alpha=1e-3, learning_rate=1e-4, batch_size=128, max_steps=1000, max_grad_norm=1.0))
    sample: SampleConfig = field(default_factory=SampleConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def base_dir(self) -> Path:
        return Path(self.work_dir) / "base"

    def retrain_dir(self) -> Path:
        return Path(self.work_dir) / f"retrain-class{self.forget_class}"

    def erase_dir(self) -> Path:
        return Path(self.work_dir) / f"{self.unlearn.method}-class{self.forget_class}"

    def classifier_dir(self) -> Path:
        return Path(self.work_dir) / "classifier"


def claim_output(out: Path, products: list[Path], overwrite: bool, resuming: bool, accelerator: Accelerator) -> None:
    """Refuse to clobber `products` or an earlier run's checkpoints unless overwrite; a fresh run drops old checkpoints.

    Pass products=[] with resuming=True for steps that neither train nor checkpoint.
    """
    blocking = [*products, *([] if resuming else list_checkpoints(out / "checkpoints")[:1])]
    existing = [p for p in blocking if p.exists()]
    if existing and not overwrite:
        hint = "; or --train.resume_from_checkpoint latest / --unlearn.resume_from_checkpoint latest to continue" if "checkpoints" in existing[0].parts else ""
        raise UserError(f"{existing[0]} already exists: pass --overwrite to replace it{hint}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if overwrite and not resuming:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a fresh run must not resume from the old one
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
