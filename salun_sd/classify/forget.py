"""Base training, Retrain, the saliency mask and every unlearning method, as the official classification code runs them.

Methods (unlearn/*.py, CIFAR-10 branch):
    ft          cross-entropy on the retain set (FT.py)
    ga          −cross-entropy on the forget set (GA.py)
    rl          each epoch: the forget batches with a fresh uniform random label per image, then the retain batches (RL.py)
    salun       rl under the saliency mask (RL.py with --mask_path)
    l1_sparse   ft + α(1 − epoch/epochs)·‖θ‖₁ (FT.py FT_l1)
    salun_soft  rl on the forget (relabelled once per epoch) and retain sets shuffled together, then after every step
                θ − θ0 soft-thresholded so the k smallest changes return to θ0, k shrinking (RL_pro.py)
    iu          one WoodFisher step θ += α·H⁻¹(∇L_f − ∇L_r weighted) (Wfisher.py)
The mask is the core's (salun_sd.core.saliency): |sum over forget batches of ∇CE|, eval mode, top fraction
over every parameter, saved as safetensors.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from salun_sd.classify.config import ClassifyConfig, SGDConfig
from salun_sd.classify.data import Images, Splits
from salun_sd.classify.model import ResNet, build_model
from salun_sd.classify.train import batches, sgd_epochs
from salun_sd.core.draws import generator
from salun_sd.core.saliency import Mask, gradient_saliency, mask_path, saliency_masks, save_mask


def train_base(cfg: ClassifyConfig, train: Images, val: Images, sgd: SGDConfig, device: torch.device | str, stream: str = "train") -> ResNet:
    """From scratch on `train`: the base model (best validation accuracy kept, main_train.py) or, on the retain set
    with val=None, Retrain (the last epoch, as unlearn/retrain.py)."""
    model = build_model(cfg.model, cfg.seed).to(device)
    gen = generator(cfg.seed, stream)
    data = train.to(device)
    best = [-1.0]

    def improved(epoch: int) -> bool:
        acc = accuracy(model, val, device)
        best[0], better = max(best[0], acc), acc > best[0]
        return better

    return sgd_epochs(model, sgd, lambda e: batches(data, sgd.batch_size, cfg.data, gen, device), select=improved if val is not None else None, desc=stream)


@torch.no_grad()
def probabilities(model: nn.Module, images: Images, device: torch.device | str, batch_size: int = 1024) -> torch.Tensor:
    """Softmax outputs in eval mode on un-augmented images (the test transform), on the CPU."""
    model.eval()
    return torch.cat([F.softmax(model(images.floats(slice(i, i + batch_size)).to(device)).float(), -1).cpu() for i in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, images: Images, device: torch.device | str) -> float:
    return (probabilities(model, images, device).argmax(1) == images.y.cpu()).float().mean().item()


def make_masks(model: ResNet, forget: Images, cfg: ClassifyConfig, accelerator: Accelerator, out: Path) -> Mask:
    """The saliency masks of cfg.mask's fractions (one gradient pass) saved in out/; returns cfg.mask.fraction's.

    As generate_mask.py: eval mode, the forget images as its loader gives them (augmented, shuffled), the
    batch-mean cross-entropy; its sign does not matter once |·| is taken of the sum."""
    start = time.perf_counter()
    device = accelerator.device
    gen = generator(cfg.seed, "mask")
    data = forget.to(device)
    losses = (F.cross_entropy(model(x), y) for x, y, _ in batches(data, cfg.mask.batch_size, cfg.data, gen, device))
    scores = gradient_saliency(model, losses, accelerator)
    fractions = [cfg.mask.fraction, *cfg.mask.extra_fractions]
    masks = saliency_masks(scores, fractions, "global")
    seconds = time.perf_counter() - start
    for fraction, mask in masks.items():
        info = {"fraction": fraction, "scope": "global", "forget": cfg.data.forget_tag(), "forget_examples": len(forget), "seconds": seconds}
        save_mask(mask, mask_path(out, None if fraction == cfg.mask.fraction else fraction), info)
    return masks[cfg.mask.fraction]


def _soft_threshold(model: nn.Module, sgd: SGDConfig, steps_per_epoch: int):
    """RL_pro.py's proximal step: k = ⌊r·(T − (epoch·L + 1))/T·n⌋ with T = epochs·L; the k-th smallest |θ − θ0| is the
    threshold t; changes within t return to θ0, the others shrink by t."""
    params = list(model.parameters())
    theta0 = torch.cat([p.detach().flatten() for p in params]).clone()
    total = sgd.epochs * steps_per_epoch

    @torch.no_grad()
    def step(epoch: int) -> None:
        k = int(sgd.soft_ratio * (total - (epoch * steps_per_epoch + 1)) / total * theta0.numel())
        if k < 1:
            return
        flat = torch.cat([p.flatten() for p in params])
        diff = flat - theta0
        t = diff.abs().kthvalue(k).values
        new = torch.where(diff > t, flat - t, torch.where(diff < -t, flat + t, theta0))
        for p, v in zip(params, new.split([p.numel() for p in params])):
            p.copy_(v.view_as(p))

    return step


def _flat_grad(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


def woodfisher(model: nn.Module, forget: Images, retain: Images, cfg: ClassifyConfig, device: torch.device | str) -> None:
    """IU as Wfisher.py: v = ∇ of the forget loss sum/(n_f + n_r) − ∇ of the retain loss sum·n_f/((n_f + n_r)·n_r), then
    its WoodFisher recursion over the first N + 2 retain images one at a time (the first only seeds it), θ += α·k.
    Its loaders keep the training augmentation, so the gradients here see augmented images too."""
    sgd = cfg.methods.iu
    model.eval().requires_grad_(True)
    gen = generator(cfg.seed, "iu")

    def summed_grad(images: Images) -> torch.Tensor:
        total = None
        for x, y, _ in batches(images, sgd.batch_size, cfg.data, gen, device, shuffle=False):
            g = _flat_grad(model, F.cross_entropy(model(x), y)) * len(y)
            total = g if total is None else total + g
        return total

    nf, nr = len(forget), len(retain)
    v = summed_grad(forget) / (nf + nr) - summed_grad(retain) * (nf / ((nf + nr) * nr))
    k, o, n = v.clone(), None, sgd.iu_samples
    for idx, (x, y, _) in enumerate(batches(retain, 1, cfg.data, gen, device, shuffle=False)):
        g = _flat_grad(model, F.cross_entropy(model(x), y))
        if o is None:
            o = g.clone()
        else:
            tmp = o @ g
            k -= (k @ g) / (n + tmp) * o
            o -= tmp / (n + tmp) * o
        if idx > n:
            break
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p += sgd.alpha * k[offset : offset + p.numel()].view_as(p)
            offset += p.numel()


def unlearn(model: ResNet, splits: Splits, cfg: ClassifyConfig, method: str, device: torch.device | str, mask: Mask | None = None) -> ResNet:
    """Apply `method` to the base model in place (salun needs `mask`); returns it in eval mode."""
    sgd: SGDConfig = getattr(cfg.methods, method)
    forget, retain = splits.forget_set.to(device), splits.retain_set.to(device)
    gen = generator(cfg.seed, method)
    classes = cfg.model.num_classes
    bf, br = -(-len(forget) // sgd.batch_size), -(-len(retain) // sgd.batch_size)

    def relabelled_then_retain(epoch: int):
        yield from batches(forget, sgd.batch_size, cfg.data, gen, device, random_labels=classes)
        yield from batches(retain, sgd.batch_size, cfg.data, gen, device)

    def mixed(epoch: int):  # RL_pro.py: forget labels redrawn once per epoch, one shuffled loader over both sets
        labels = torch.randint(0, classes, (len(forget),), generator=gen).to(device)
        both = Images(torch.cat([forget.x, retain.x]), torch.cat([labels, retain.y]))
        yield from batches(both, sgd.batch_size, cfg.data, gen, device)

    def l1(model: nn.Module, epoch: int) -> torch.Tensor:
        return sgd.alpha * (1 - epoch / sgd.epochs) * sum(p.abs().sum() for p in model.parameters())

    retain_only = lambda e: batches(retain, sgd.batch_size, cfg.data, gen, device)  # noqa: E731
    if method == "ft":
        return sgd_epochs(model, sgd, retain_only, desc=method)
    if method == "l1_sparse":
        return sgd_epochs(model, sgd, retain_only, regulariser=l1, desc=method)
    if method == "ga":
        return sgd_epochs(model, sgd, lambda e: batches(forget, sgd.batch_size, cfg.data, gen, device, sign=-1.0), desc=method)
    if method == "rl":
        return sgd_epochs(model, sgd, relabelled_then_retain, desc=method)
    if method == "salun":
        return sgd_epochs(model, sgd, relabelled_then_retain, mask=mask, desc=method)
    if method == "salun_soft":
        return sgd_epochs(model, sgd, mixed, after_step=_soft_threshold(model, sgd, bf + br), desc=method)
    if method == "iu":
        woodfisher(model, forget, retain, cfg, device)
        return model.eval().requires_grad_(False)
    raise ValueError(method)
