"""Images in [0, 1] with labels, split the way the official code splits them, and the forget set.

Official CIFAR-10 (dataset.py cifar10_dataloaders): 10 % of each class of the 50k training images goes to
validation, drawn by RandomState(split_seed) class by class; the 45k left keep their original order. A random
forget set is RandomState(forget_seed).choice of that many of the 45k without replacement; class-wise
forgetting takes every training image of the class and also removes the class from the test set.
Digits have no official split, so a test share of each class is held out first (RandomState(split_seed)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from salun_sd.classify.config import DataConfig
from salun_sd.errors import UserError


@dataclass
class Images:
    """Images (uint8 0..255 or float in [0, 1]) and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: torch.Tensor | slice) -> "Images":
        return Images(self.x[idx], self.y[idx])

    def to(self, device: torch.device | str) -> "Images":
        return Images(self.x.to(device), self.y.to(device))

    def floats(self, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        x = self.x[idx]
        return x.float() / 255 if x.dtype == torch.uint8 else x.float()


@dataclass
class Splits:
    """The training split (its `forget` flags mark D_f; the rest is D_r, in training order), validation and test."""

    train: Images
    forget: torch.Tensor  # bool, one per training image
    val: Images
    test: Images

    @property
    def forget_set(self) -> Images:
        return self.train[self.forget]

    @property
    def retain_set(self) -> Images:
        return self.train[~self.forget]


def _cifar10(cfg: DataConfig) -> tuple[Images, Images]:
    from torchvision.datasets import CIFAR10

    sets = [CIFAR10(cfg.root, train=train, download=True) for train in (True, False)]
    return tuple(Images(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets, dtype=torch.long)) for s in sets)


def _digits(cfg: DataConfig) -> tuple[Images, Images]:
    """scikit-learn's 1,797 real 8x8 handwritten digits; a test share of each class held out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16  # pixel values are 0..16
    labels = digits.target
    rng = np.random.RandomState(cfg.split_seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(labels.max() + 1):
        idx = np.flatnonzero(labels == c)
        test[rng.choice(idx, round(cfg.test_fraction * len(idx)), replace=False)] = True
    y = torch.from_numpy(labels).long()
    return Images(x[~test], y[~test]), Images(x[test], y[test])


def validation_split(full: Images, seed: int) -> tuple[Images, Images]:
    """(training, validation): 10 % of each class to validation by RandomState(seed), as dataset.py; training keeps its order."""
    labels = full.y.numpy()
    rng = np.random.RandomState(seed)
    val = np.hstack([rng.choice(np.flatnonzero(labels == c), int(0.1 * (labels == c).sum()), replace=False) for c in range(labels.max() + 1)])
    keep = np.ones(len(labels), dtype=bool)
    keep[val] = False
    return full[torch.from_numpy(np.flatnonzero(keep))], full[torch.from_numpy(val)]


def forget_flags(train: Images, cfg: DataConfig) -> torch.Tensor:
    """Which training images form D_f: a pure function of the labels and the config."""
    flags = np.zeros(len(train), dtype=bool)
    if cfg.forget == "class":
        flags[train.y.numpy() == cfg.forget_class] = True
    else:
        count = round(cfg.forget_fraction * len(train))
        flags[np.random.RandomState(cfg.forget_seed).choice(len(train), count, replace=False)] = True
    if not flags.any():
        raise UserError(f"the forget set is empty (data.forget={cfg.forget}, forget_class={cfg.forget_class}, forget_fraction={cfg.forget_fraction})")
    return torch.from_numpy(flags)


def load_splits(cfg: DataConfig) -> Splits:
    cfg.check()
    full, test = (_cifar10 if cfg.dataset == "cifar10" else _digits)(cfg)
    train, val = validation_split(full, cfg.split_seed)
    if cfg.forget == "class":
        test = test[test.y != cfg.forget_class]
    return Splits(train, forget_flags(train, cfg), val, test)


def augment(x: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per image: a random crop of the zero-padded image back to its size, and a random horizontal flip
    (torchvision's RandomCrop(size, padding) + RandomHorizontalFlip, on a batch, drawn from `gen`)."""
    n, _, h, w = x.shape
    if padding:
        padded = F.pad(x, (padding,) * 4)
        dy, dx = (torch.randint(0, 2 * padding + 1, (2, n), generator=gen)).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]
    if flip:
        flips = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    return x
