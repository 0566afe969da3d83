"""One YAML config per dataset serves every `salun-sd ddpm` command; each reads the sections it needs.

Default folders all lie under `work_dir`:
    base/                  the base model (unet/, scheduler/, checkpoints/, manifest.json)
    retrain-class<k>/      Retrain: trained from scratch without class k (the gold standard)
    <method>-class<k>/     the erased model (mask.safetensors, unet/, scheduler/, checkpoints/)
    classifier/            the judge for UA, accuracy and offline FID
Each model folder gets samples/ from `ddpm sample` and eval.json from `ddpm evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

from salun_sd.config import check_settings, setting
from salun_sd.core.config import MaskConfig, MixedPrecision, TrainConfig

# The official DDPM code sums squared errors over C·H·W (3·32·32 on CIFAR-10) in its remain, mask and training
# losses where ours average them (its forget term is already a mean). So an official remain weight α is
# α·C·H·W here, and an official clipping norm on one of those sums is norm/(C·H·W); the unlearning clip
# applies to the same total loss in both and stays as it is. (Method ga, whose official forget term is a sum
# too, keeps the official α: ours is then the official loss ÷ C·H·W, so its clip norm is norm/(C·H·W).)
CIFAR10_PIXELS = 3 * 32 * 32


@dataclass
class ModelConfig:
    """UNet and schedule. Defaults are the official CIFAR-10 model; the digits config shrinks it."""

    sample_size: int = setting(32, "image side in pixels", at_least=1)
    channels: int = setting(3, "image channels (3 for CIFAR-10, 1 for digits)", at_least=1)
    num_classes: int = setting(10, "real classes; the class embedding gets num_classes + 1 rows", at_least=1)
    block_out_channels: list[int] = setting(factory=lambda: [128, 256, 256, 256], doc="channels per UNet level", at_least=1)
    layers_per_block: int = setting(2, "ResNet layers per UNet level", at_least=1)
    attention_resolutions: list[int] = setting(factory=lambda: [16], doc="feature-map sizes with self-attention", at_least=1)
    mid_attention: bool = True
    dropout: float = setting(0.1, "dropout in the ResNet blocks", at_least=0, below=1)
    norm_num_groups: int = setting(32, "GroupNorm groups", at_least=1)
    beta_start: float = setting(1e-4, "the linear noise schedule's first β", above=0, below=1)
    beta_end: float = setting(0.02, "its last β", above=0, below=1)
    num_train_timesteps: int = setting(1000, "timesteps of the noise schedule", at_least=1)


@dataclass
class DataConfig:
    """Which images. `dataset`: cifar10 (torchvision, downloaded to `root`) or digits (scikit-learn, offline);
    `hf_dataset` instead loads a Hugging Face dataset with an image and a label column."""

    dataset: str = "cifar10"
    root: str = setting("data", "torchvision download folder")
    hf_dataset: str = setting("", "e.g. uoft-cs/cifar10")
    hf_image_column: str = "img"
    hf_label_column: str = "label"
    image_size: int = setting(0, "0: the dataset's own size (32 for CIFAR-10, 8 for digits)", at_least=0)
    random_flip: bool = setting(True, "horizontal flips in base training (off for digits: a flipped digit is another shape)")
    digits_test_fraction: float = setting(0.2, "digits have no official split; this share of each class is held out", above=0, below=1)
    seed: int = setting(0, "digits split", at_least=0)


@dataclass
class SampleConfig:
    """Sampling. Defaults are the official sampler (generalized_steps, 1000 steps, η 1: DDIM with η 1 over every
    timestep, i.e. ancestral sampling with the posterior variance) at guidance w = 2.0."""

    scheduler: Literal["ddim", "ddpm"] = setting("ddim", "ddim | ddpm")
    num_inference_steps: int = setting(1000, "sampler steps", at_least=1)
    guidance: float = setting(2.0, "w in (1+w)·ε(x_t|c) − w·ε(x_t|∅)", at_least=0)
    eta: float = setting(1.0, "DDIM stochasticity (0: deterministic, each image independent of the batch it is drawn in)", at_least=0)
    per_class: int = setting(10, "images per class", at_least=1)
    classes: list[int] = setting(factory=list, doc="empty: every class", at_least=0)
    batch_size: int = setting(256, "images per sampler call", at_least=1)
    seed: int = setting(0, "image i of a class uses seed + i", at_least=0)


@dataclass
class ClassifierConfig:
    """Classifier architecture and training (Adam with cosine decay, crop + optional flip augmentation)."""

    widths: list[int] = setting(factory=lambda: [64, 128, 256], doc="channels per stage; stages after the first halve the resolution", at_least=1)
    blocks_per_stage: int = setting(2, "residual blocks per stage", at_least=1)
    epochs: int = setting(30, "passes over the training images", at_least=1)
    batch_size: int = setting(128, "images per step", at_least=1)
    learning_rate: float = setting(2e-3, "Adam's peak step size", above=0)
    weight_decay: float = setting(5e-4, "AdamW's decoupled decay", at_least=0)
    seed: int = setting(0, "initial weights and batch order", at_least=0)


@dataclass
class BaseTrainConfig:
    """Base training. Defaults are the official CIFAR-10 run (Adam 2e-4, batch 128, 800k steps, clip 1.0 on its summed loss, EMA 0.9999)."""

    learning_rate: float = setting(2e-4, "AdamW's step size", above=0)
    weight_decay: float = setting(0.0, "AdamW's decoupled decay (no mask here, so it is safe to use)", at_least=0)
    adam_beta1: float = setting(0.9, "Adam's β1", at_least=0, below=1)
    adam_beta2: float = setting(0.999, "Adam's β2", at_least=0, below=1)
    adam_epsilon: float = setting(1e-8, "Adam's ε", at_least=0)
    warmup_steps: int = setting(0, "linear learning-rate warm-up", at_least=0)
    batch_size: int = setting(128, "per process", at_least=1)
    max_steps: int = setting(800_000, "optimizer steps (0: write the initial model untrained)", at_least=0)
    max_grad_norm: float = setting(1 / CIFAR10_PIXELS, "0 disables clipping (official CIFAR-10: 1.0 on its loss summed over 3·32·32 values)", at_least=0)
    cond_drop_prob: float = setting(0.1, "share of examples trained with the null class, for classifier-free guidance", at_least=0, below=1)
    ema_decay: float = setting(0.9999, "0 disables EMA (unet_ema/ is written besides the raw unet/); the decay ramps up as (1+step)/(10+step) until it reaches this", at_least=0, below=1)
    checkpointing_steps: int = setting(5000, "0: no intermediate checkpoints", at_least=0)
    checkpoints_total_limit: int = setting(2, "checkpoints kept, the newest; 0: all", at_least=0)
    resume_from_checkpoint: str = setting("", "\"\" | latest | path to a checkpoint folder")
    seed: int = setting(0, "initial weights, batch order, noise and timesteps", at_least=0)

    def check(self, section: str = "train") -> None:
        """Bad values fail before any data or model loads, not as torch's traceback minutes later."""
        check_settings(self, f"{section}.")


@dataclass
class EvalConfig:
    """Evaluation of a model folder: samples_per_class images per class with the `sample` settings."""

    samples_per_class: int = setting(500, "images per class", at_least=1)
    features: Literal["inception", "classifier"] = setting("inception", "FID features: inception (standard; needs torch-fidelity and its weights) | classifier")
    inception_weights: str = setting("", "local pt_inception-2015-12-05 weights file, for machines without a network")


@dataclass
class DDPMConfig:
    """The whole DDPM experiment. Defaults are the official SalUn CIFAR-10 settings."""

    work_dir: str = "outputs/ddpm-cifar10"
    output_dir: str = setting("", "this step's output folder (default: the folder under work_dir that the step's description names)")
    model_dir: list[str] = setting(factory=list, doc="model folder(s) a step reads: one for mask, erase, sample (default: WORK_DIR/base); any for evaluate (default: every model under work_dir)")
    classifier_path: str = setting("", "the classifier folder evaluate judges with (default: WORK_DIR/classifier)")
    forget_class: int = setting(0, "the class to erase", at_least=0)
    misaligned: Literal["next", "random"] = setting("next", "c' of the forget images: next = (forget_class + 1) mod num_classes (official) | random = any other class per example (ours)")
    weights: Literal["raw", "ema"] = setting("raw", "weights that mask, erase, sample and evaluate read: raw = unet/ (official: ema False) | ema = unet_ema/ where a folder has one")
    overwrite: bool = setting(False, "replace earlier results in the target folder")
    mixed_precision: MixedPrecision = setting("no", "no | fp16 | bf16")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: BaseTrainConfig = field(default_factory=BaseTrainConfig)
    mask: MaskConfig = field(default_factory=lambda: MaskConfig(guidance=2.0, batch_size=128, max_grad_norm=1 / CIFAR10_PIXELS))
    unlearn: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            alpha=1e-3 * CIFAR10_PIXELS, learning_rate=1e-4, batch_size=128, max_steps=1000, max_grad_norm=1.0, clip_before_mask=True, cond_drop_prob=0.1
        )
    )
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
