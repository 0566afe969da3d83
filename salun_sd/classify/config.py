"""One YAML config per dataset serves every `salun-sd classify` command; each reads the sections it needs.

Defaults are the official CIFAR-10 / ResNet-18 recipe (OPTML-Group/Unlearn-Saliency `Classification/`, HEAD
a6e89fd); each value names the file it comes from. Folders under `work_dir`:
    base/                   the trained model (model.safetensors, model.json)
    retrain-<forget>/       Retrain: trained from scratch on the retain set (the gold standard)
    <method>-<forget>/      an unlearned model (salun-<forget>/ also holds mask.safetensors)
where <forget> is `random10-s1` (10 % drawn with RandomState(1)) or `class3`. `evaluate` writes eval.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from salun_sd.config import check_settings, setting
from salun_sd.errors import UserError

FORGET_KINDS = ("random", "class")


@dataclass
class DataConfig:
    """Which images, how they split, and which to forget."""

    dataset: str = setting("cifar10", "cifar10 (torchvision, downloaded to root) | digits (scikit-learn's 8x8 digits, offline)")
    root: str = setting("data", "torchvision download folder")
    split_seed: int = setting(2, "RandomState seed of the validation split, 10 % of each class (dataset.py cifar10_dataloaders; arg_parser --seed 2)", at_least=0)
    forget: str = setting("random", "random (a random share of the training split) | class (every training image of forget_class; the class also leaves the test set, dataset.py)")
    forget_fraction: float = setting(0.1, "random: share of the training split (official --num_indexes_to_replace 4500 = 10 % of 45,000; 22,500 = 50 %)", above=0, at_most=1)
    forget_seed: int = setting(1, "random: RandomState seed of the draw (dataset.py replace_class: --seed − 1 = 1)", at_least=0)
    forget_class: int = setting(0, "class: the class to forget (--class_to_replace)", at_least=0)
    test_fraction: float = setting(0.2, "digits only (no official split): share of each class held out as the test set, by RandomState(split_seed)", above=0, below=1)
    crop_padding: int = setting(4, "training augmentation: random crop with this zero padding (RandomCrop(32, padding=4), dataset.py)", at_least=0)
    flip: bool = setting(True, "training augmentation: random horizontal flip (dataset.py; off for digits: a mirrored digit is another shape)")

    def check(self) -> None:
        check_settings(self, "data.")
        if self.dataset not in ("cifar10", "digits"):
            raise UserError(f"data.dataset must be cifar10 or digits, got {self.dataset!r}")
        if self.forget not in FORGET_KINDS:
            raise UserError(f"data.forget must be one of {', '.join(FORGET_KINDS)}, got {self.forget!r}")

    def forget_tag(self) -> str:
        """The forget set's part of a folder name: random10-s1 or class3."""
        if self.forget == "class":
            return f"class{self.forget_class}"
        return f"random{100 * self.forget_fraction:g}-s{self.forget_seed}"


@dataclass
class ModelConfig:
    """A CIFAR ResNet: 3x3 stride-1 stem, no max-pool, BasicBlocks, global pooling, linear head; inputs in [0, 1],
    normalised inside the model (models/ResNets.py, utils.py NormalizeByChannelMeanStd). Defaults: ResNet-18."""

    in_channels: int = setting(3, "image channels", at_least=1)
    num_classes: int = setting(10, "classes of the head", at_least=2)
    widths: list[int] = setting(factory=lambda: [64, 128, 256, 512], doc="channels per stage; stages after the first halve the resolution", at_least=1)
    blocks: list[int] = setting(factory=lambda: [2, 2, 2, 2], doc="BasicBlocks per stage (ResNet-18: 2, 2, 2, 2)", at_least=1)
    mean: list[float] = setting(factory=lambda: [0.4914, 0.4822, 0.4465], doc="per channel (utils.py, CIFAR-10)")
    std: list[float] = setting(factory=lambda: [0.2470, 0.2435, 0.2616], doc="per channel (utils.py, CIFAR-10)", above=0)


@dataclass
class SGDConfig:
    """SGD with momentum and coupled weight decay, the learning rate ×0.1 at each milestone epoch (unlearn/impl.py,
    main_train.py). Defaults: base training (main_train.py, arg_parser.py: lr 0.1, 182 epochs, 91/136, batch 256)."""

    learning_rate: float = setting(0.1, "SGD's step size (arg_parser --lr)", above=0)
    epochs: int = setting(182, "passes over the training images (arg_parser --epochs)", at_least=0)
    milestones: list[int] = setting(factory=lambda: [91, 136], doc="arg_parser --decreasing_lr 91,136 (never reached in 10-epoch unlearning)", at_least=0)
    batch_size: int = setting(256, "arg_parser --batch_size", at_least=1)
    momentum: float = setting(0.9, "arg_parser --momentum", at_least=0)
    weight_decay: float = setting(5e-4, "arg_parser --weight_decay; with a mask, only inside it", at_least=0)
    alpha: float = setting(0.0, "l1_sparse: the ℓ1 weight at epoch 0, decaying linearly to 0 (unlearn/FT.py); iu: the step size of the WoodFisher perturbation (unlearn/Wfisher.py)", at_least=0)
    soft_ratio: float = setting(0.5, "salun_soft: share of weights reset to θ0 at the first step, shrinking linearly (unlearn/RL_pro.py; its args.mask_ratio is undefined as shipped)", above=0, at_most=1)
    iu_samples: int = setting(1000, "iu: retain samples in the WoodFisher estimate (unlearn/Wfisher.py N; it visits N + 2)", at_least=1)

@dataclass
class MethodsConfig:
    """Each method's settings, as published (unlearn/*.py; lrs and epochs from the README's commands)."""

    retrain: SGDConfig = setting(factory=lambda: SGDConfig(learning_rate=0.1, epochs=160), doc="old README: --unlearn retrain --unlearn_epochs 160 --unlearn_lr 0.1")
    ft: SGDConfig = setting(factory=lambda: SGDConfig(learning_rate=0.01, epochs=10), doc="old README: FT --unlearn_lr 0.01 --unlearn_epochs 10")
    ga: SGDConfig = setting(factory=lambda: SGDConfig(learning_rate=1e-4, epochs=5), doc="old README: GA --unlearn_lr 0.0001 --unlearn_epochs 5 (maintainer in issue #8: 5e-4 to 1e-3)")
    rl: SGDConfig = setting(factory=lambda: SGDConfig(learning_rate=0.013, epochs=10), doc="ours: SalUn's settings without the mask (main_random.py without --mask_path crashes as shipped)")
    l1_sparse: SGDConfig = setting(factory=lambda: SGDConfig(learning_rate=0.01, epochs=10, alpha=5e-4), doc="old README: FT_prune --unlearn_lr 0.01 --unlearn_epochs 10 --alpha ${alpha}; α 5e-4 is ours (no value in either repository's code)")
    salun: SGDConfig = setting(factory=lambda: SGDConfig(learning_rate=0.013, epochs=10), doc="README: --unlearn RL --unlearn_epochs 10 --unlearn_lr 0.013 --mask_path with_0.5.pt")
    salun_soft: SGDConfig = setting(factory=lambda: SGDConfig(learning_rate=0.1, epochs=10), doc="old README: RL_proximal --unlearn_lr 0.1 --unlearn_epochs 10")
    iu: SGDConfig = setting(factory=lambda: SGDConfig(alpha=0.2), doc="README: wfisher --alpha 0.2 (one-shot: no SGD)")


@dataclass
class MaskConfig:
    """The saliency mask: one pass over the forget set, |summed gradient|, top fraction over every weight (generate_mask.py)."""

    fraction: float = setting(0.5, "share of weights SalUn may update (README: with_0.5.pt for 10 % random forgetting)", above=0, at_most=1)
    extra_fractions: list[float] = setting(factory=list, doc="more masks from the same pass (generate_mask.py saves 0.1 ... 1.0)", above=0, at_most=1)
    batch_size: int = setting(256, "forget images per backward pass (arg_parser --batch_size)", at_least=1)
    path: str = setting("", "use this mask file instead of WORK_DIR/salun-<forget>/mask.safetensors")


METHODS = ("ft", "ga", "rl", "l1_sparse", "salun", "salun_soft", "iu")


@dataclass
class ClassifyConfig:
    """The whole classification experiment. Defaults are the official CIFAR-10 ResNet-18 settings."""

    work_dir: str = "outputs/classify-cifar10"
    output_dir: str = setting("", "this step's output folder (default: the folder under work_dir the step's description names)")
    model_dir: list[str] = setting(factory=list, doc="model folder(s) a step reads: one for mask and forget (default: WORK_DIR/base); any for evaluate (default: every model of this forget set under work_dir)")
    method: str = setting("salun", "forget: ft | ga | rl | l1_sparse | salun | salun_soft | iu")
    seed: int = setting(1, "initial weights, batch order, augmentation and random labels (arg_parser --train_seed 1)", at_least=0)
    overwrite: bool = setting(False, "replace an earlier result in the target folder")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: SGDConfig = field(default_factory=SGDConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)

    def check(self) -> None:
        check_settings(self)
        self.data.check()
        if self.method not in METHODS:
            raise UserError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")

    def base_dir(self) -> Path:
        return Path(self.work_dir) / "base"

    def run_dir(self, method: str) -> Path:
        """retrain-<forget> or <method>-<forget>."""
        return Path(self.work_dir) / f"{method}-{self.data.forget_tag()}"
