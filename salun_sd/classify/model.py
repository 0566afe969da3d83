"""The CIFAR ResNet (ResNet-18 by default; the digits config shrinks it) and its model folder.

As the official models/ResNets.py: a 3x3 stride-1 stem without max-pool, BasicBlocks with a 1x1 projection
shortcut where the shape changes, global average pooling and a linear head, the input normalisation inside
the model (inputs in [0, 1]). A folder holds model.safetensors and model.json (architecture and how it was made).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from salun_sd.classify.config import ModelConfig
from salun_sd.ddpm.classifier import BasicBlock
from salun_sd.errors import UserError
from salun_sd.run.files import atomic, write_json


class ResNet(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if len(cfg.widths) != len(cfg.blocks) or len(cfg.mean) != cfg.in_channels or len(cfg.std) != cfg.in_channels:
            raise UserError("model.widths and model.blocks need one entry per stage, model.mean and model.std one per input channel")
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1))
        self.conv1 = nn.Conv2d(cfg.in_channels, cfg.widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg.widths[0])
        stages, c_in = [], cfg.widths[0]
        for i, (width, blocks) in enumerate(zip(cfg.widths, cfg.blocks)):
            layers = []
            for j in range(blocks):
                layers.append(BasicBlock(c_in, width, 2 if i > 0 and j == 0 else 1))
                c_in = width
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, cfg.num_classes)
        for m in self.modules():  # torchvision's ResNet initialisation, which models/ResNet.py keeps
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1((x - self.mean) / self.std)))
        return self.fc(self.layers(x).mean((2, 3)))


def build_model(cfg: ModelConfig, seed: int) -> ResNet:
    torch.manual_seed(seed)  # the initial weights (utils.py setup_seed(train_seed) before building the model)
    return ResNet(cfg)


def save_model(model: ResNet, folder: Path, cfg: ModelConfig, info: dict) -> None:
    """model.safetensors (weights and BN statistics) and model.json (architecture plus `info`)."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic(folder / "model.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(folder / "model.json", {"architecture": asdict(cfg), **info})  # last: a folder with model.json is complete


def load_model(folder: str | Path) -> tuple[ResNet, dict]:
    folder = Path(folder)
    if not (folder / "model.json").is_file():
        raise UserError(f"{folder} holds no classifier; make one with `salun-sd classify train` (or retrain / forget)")
    info = json.loads((folder / "model.json").read_text())
    model = ResNet(ModelConfig(**info["architecture"]))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model, info
