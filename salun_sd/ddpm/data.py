"""Class-labelled images as ConceptData in [-1, 1]: CIFAR-10 for users, scikit-learn's digits offline.

Every source yields float images in [0, 1] plus labels and goes through the same resize and scaling,
so the tests and the CPU benchmark on digits exercise the code path CIFAR-10 runs through.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from salun_sd.ddpm.config import DataConfig
from salun_sd.core.denoiser import ConceptData
from salun_sd.errors import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DIGITS_CLASSES = tuple(str(i) for i in range(10))


def class_names(cfg: DataConfig) -> tuple[str, ...]:
    return DIGITS_CLASSES if cfg.dataset == "digits" else CIFAR10_CLASSES


def _cifar10(cfg: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if cfg.hf_dataset:
        try:
            import datasets
        except ImportError:
            raise UserError("data.hf_dataset needs the datasets package: pip install 'salun-sd[datasets]'") from None
        ds = datasets.load_dataset(cfg.hf_dataset, split="train" if train else "test").with_format("numpy")
        images, labels = np.stack(ds[cfg.hf_image_column]), np.asarray(ds[cfg.hf_label_column])
    else:
        from torchvision.datasets import CIFAR10

        ds = CIFAR10(cfg.root, train=train, download=True)
        images, labels = ds.data, np.asarray(ds.targets)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return x, torch.from_numpy(labels).long()


def _digits(cfg: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 real 8x8 handwritten digits scikit-learn ships, split per class with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = torch.from_numpy(digits.target).long()
    rng = torch.Generator().manual_seed(cfg.seed)
    held_out = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=rng)]
        held_out[idx[: round(cfg.digits_test_fraction * len(idx))]] = True
    keep = ~held_out if train else held_out
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16  # pixel values are 0..16
    return x[keep], labels[keep]


def load_split(cfg: DataConfig, split: str, exclude_class: int = -1) -> ConceptData:
    """Images of `split` (train | test) scaled to [-1, 1], optionally without one class (for Retrain)."""
    if split not in ("train", "test"):
        raise UserError(f"split must be train or test, got {split!r}")
    loaders = {"cifar10": _cifar10, "digits": _digits}
    if cfg.dataset not in loaders:
        raise UserError(f"data.dataset must be one of {sorted(loaders)}, got {cfg.dataset!r}")
    x, labels = loaders[cfg.dataset](cfg, split == "train")
    if cfg.image_size and cfg.image_size != x.shape[-1]:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    keep = labels != exclude_class
    return ConceptData(x[keep] * 2 - 1, labels[keep])


def split_by_class(data: ConceptData, forget_class: int) -> tuple[ConceptData, ConceptData]:
    """(forget set D_f = the class, remain set D_r = every other class)."""
    sel = data.cond == forget_class
    if not sel.any():
        raise UserError(f"class {forget_class} has no examples in this data")
    return ConceptData(data.x0[sel], data.cond[sel]), ConceptData(data.x0[~sel], data.cond[~sel])


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to uint8 pixels."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
