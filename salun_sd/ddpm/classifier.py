"""The judge of a class-conditional model: a classifier trained on the same dataset.

A small ResNet (CIFAR-10: widths 64,128,256, two blocks a stage; digits: far smaller by config). Its
predictions on generated images give unlearning accuracy and remaining-class accuracy, and its
penultimate (pooled) features stand in for Inception features in the offline FID.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from salun_sd.ddpm.config import ClassifierConfig
from salun_sd.core.denoiser import ConceptData
from salun_sd.core.draws import generator
from salun_sd.errors import UserError
from salun_sd.run.files import atomic, write_json


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths: list[int], blocks_per_stage: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c_in = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(c_in, width, 2 if i > 0 and j == 0 else 1))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: the globally pooled output of the last stage."""
        return self.blocks(self.stem(x)).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _augment(x: torch.Tensor, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to size/8 pixels (reflect padding), and horizontal flips where the data allows."""
    pad = max(1, x.shape[-1] // 8)
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    x = padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]
    if flip:
        flips = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flips[:, None, None, None].to(x.device), x.flip(-1), x)
    return x


@torch.no_grad()
def predict(model: SmallResNet, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, penultimate features) for images in [-1, 1]."""
    model.eval()
    device = next(model.parameters()).device
    preds, feats = [], []
    for start in range(0, len(x), batch_size):
        f = model.features(x[start : start + batch_size].to(device).float())
        preds.append(model.head(f).argmax(1).cpu())
        feats.append(f.cpu())
    return torch.cat(preds), torch.cat(feats)


def train_classifier(train: ConceptData, test: ConceptData, cfg: ClassifierConfig, num_classes: int, flip: bool, device: torch.device | str = "cpu") -> tuple[SmallResNet, float]:
    """Train on `train`; returns the model and its accuracy on `test` (real held-out images)."""
    torch.manual_seed(cfg.seed)
    model = SmallResNet(train.x0.shape[1], num_classes, cfg.widths, cfg.blocks_per_stage).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.learning_rate, total_steps=cfg.epochs * steps_per_epoch)
    for epoch in tqdm(range(cfg.epochs), desc="classifier"):
        gen = generator(cfg.seed, "classifier", epoch)
        model.train()
        for idx in torch.randperm(len(train), generator=gen).split(cfg.batch_size):
            x = _augment(train.x0[idx], flip, gen).to(device)
            loss = F.cross_entropy(model(x), train.cond[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model, accuracy(model, test)


def accuracy(model: SmallResNet, data: ConceptData) -> float:
    return (predict(model, data.x0)[0] == data.cond.cpu()).float().mean().item()


def save_classifier(model: SmallResNet, folder: Path, info: dict) -> None:
    """`classifier.safetensors` plus `classifier.json` (architecture and `info`, e.g. test accuracy)."""
    with atomic(folder / "classifier.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(folder / "classifier.json", info)


def load_classifier(folder: str | Path) -> tuple[SmallResNet, dict]:
    folder = Path(folder)
    if not (folder / "classifier.json").is_file():
        raise UserError(f"{folder} holds no classifier; train one with `salun-sd ddpm classifier`")
    info = json.loads((folder / "classifier.json").read_text())
    arch = info["architecture"]
    model = SmallResNet(arch["in_channels"], arch["num_classes"], arch["widths"], arch["blocks_per_stage"])
    model.load_state_dict(load_file(str(folder / "classifier.safetensors")))
    return model.eval(), info


def classifier_info(model: SmallResNet, cfg: ClassifierConfig, in_channels: int, num_classes: int, **extra) -> dict:
    arch = {"in_channels": in_channels, "num_classes": num_classes, "widths": cfg.widths, "blocks_per_stage": cfg.blocks_per_stage}
    return {"architecture": arch, "training": asdict(cfg), **extra}
