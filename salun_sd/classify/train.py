"""Epochs of SGD over batches of images: base training, Retrain and every iterative unlearning method.

The optimizer is the core's masked SGD (salun_sd.core.masked_step): torch's SGD with momentum and coupled
weight decay, both only inside the mask when there is one, so weights outside it stay bitwise equal to the
original. The learning rate drops ×0.1 at each milestone epoch (unlearn/impl.py, main_train.py). The batch
order, crops, flips and random labels come from one generator seeded by (seed, stream).
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from salun_sd.classify.config import DataConfig, SGDConfig
from salun_sd.classify.data import Images, augment
from salun_sd.core.masked_step import masked_sgd
from salun_sd.core.saliency import Mask
from salun_sd.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor, float]  # images, labels, sign of the cross-entropy (−1: gradient ascent)


def batches(images: Images, batch_size: int, data: DataConfig, gen: torch.Generator, device: torch.device | str,
            sign: float = 1.0, random_labels: int = 0, shuffle: bool = True) -> Iterator[Batch]:
    """One pass over `images` in training form (augmented, as the official loaders keep train transforms).
    random_labels=C replaces each label by a fresh uniform draw from 0..C−1 (the true class not excluded; unlearn/RL.py)."""
    order = torch.randperm(len(images), generator=gen) if shuffle else torch.arange(len(images))
    for idx in order.split(batch_size):
        x = augment(images.floats(idx).to(device), data.crop_padding, data.flip, gen)
        y = torch.randint(0, random_labels, (len(idx),), generator=gen) if random_labels else images.y[idx]
        yield x, y.to(device), sign


def sgd_epochs(
    model: nn.Module,
    cfg: SGDConfig,
    epoch_batches: Callable[[int], Iterable[Batch]],
    mask: Mask | None = None,
    regulariser: Callable[[nn.Module, int], torch.Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
    select: Callable[[int], bool] | None = None,
    desc: str = "train",
) -> nn.Module:
    """cfg.epochs epochs of masked SGD on sign·CE (+ regulariser(model, epoch)); after_step(epoch) runs after each step.

    select(epoch) (base training) is asked after each epoch whether this is the best model so far; the best is
    returned (main_train.py keeps the best validation accuracy), else the last."""
    device = next(model.parameters()).device
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    masks = [mask[n].to(device) for n in names] if mask is not None else None
    if mask is not None and set(mask) != set(names):
        raise UserError("the mask does not name exactly this model's parameters; make it again with `salun-sd classify mask`")
    model.requires_grad_(True)
    optimizer = masked_sgd(params, masks, cfg.learning_rate, cfg.momentum, cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, 0.1)
    best = None
    for epoch in tqdm(range(cfg.epochs), desc=desc, leave=False):
        model.train()  # BN statistics update, as in the official loops
        for x, y, sign in epoch_batches(epoch):
            loss = sign * F.cross_entropy(model(x), y)
            if regulariser is not None:
                loss = loss + regulariser(model, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(epoch)
        schedule.step()
        if select is not None and select(epoch):
            best = copy.deepcopy(model.state_dict())
    if best is not None:
        model.load_state_dict(best)
    return model.eval().requires_grad_(False)
