"""The toy world's judge: a small CNN with a shape head and a colour head.

It plays the part ResNet-50 (object classes) and NudeNet play for real models: its predictions on
generated images give unlearning accuracy and retained accuracy, and its pooled features stand in
for Inception features in a Fréchet distance. It is trained with noise, blur and contrast
augmentation, because generated images are never as clean as drawn ones (a classifier trained on
clean drawings alone loses most of its shape accuracy on slightly noisy images). The training itself is
scripts/train_toy_classifier.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from salun_sd.errors import UserError
from salun_sd.toyworld import ASSETS
from salun_sd.toyworld.world import WorldSpec, sample, to_tensor

WEIGHTS, CONFIG = "classifier.safetensors", "classifier.json"


@dataclass
class ToyClassifierConfig:
    """Architecture, world and training settings; `measured` holds accuracies written by the training script."""

    widths: list[int] = field(default_factory=lambda: [32, 64, 96])  # one conv pair per stage; stages after the first halve the resolution
    size: int = 16
    shapes: list[str] = field(default_factory=lambda: list(WorldSpec().shapes))
    colours: list[str] = field(default_factory=lambda: list(WorldSpec().colours))
    steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 3e-3
    max_noise: float = 0.35  # std of added Gaussian noise, in the [-1, 1] image range, drawn per image up to this
    max_blur: float = 1.0  # Gaussian blur sigma in pixels, drawn per batch up to this
    seed: int = 0
    measured: dict = field(default_factory=dict)

    def spec(self) -> WorldSpec:
        return WorldSpec(size=self.size, shapes=tuple(self.shapes), colours=tuple(self.colours))


class ToyClassifier(nn.Module):
    """conv-conv(-pool) stages, global average pooling, then a shape head and a colour head."""

    def __init__(self, cfg: ToyClassifierConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, width in enumerate(cfg.widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            c_in = width
        self.body = nn.Sequential(*layers)
        self.shape_head = nn.Linear(c_in, len(cfg.shapes))
        self.colour_head = nn.Linear(c_in, len(cfg.colours))
        self.cfg = cfg

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (for the Fréchet distance). Input: (N, 3, H, W) in [-1, 1]."""
        if x.shape[-1] != self.cfg.size or x.shape[-2] != self.cfg.size:
            x = F.interpolate(x, size=(self.cfg.size, self.cfg.size), mode="area")
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.shape_head(f), self.colour_head(f)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """(shape ids, colour ids) for images in [-1, 1]."""
        self.eval()
        outs = [self(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return torch.cat([o[0] for o in outs]).argmax(1), torch.cat([o[1] for o in outs]).argmax(1)


def load_classifier(folder: str | Path | None = None) -> ToyClassifier:
    """The classifier in `folder` (default: the one shipped with the package), in eval mode."""
    folder = Path(folder) if folder is not None else ASSETS
    if not (folder / WEIGHTS).is_file():
        raise UserError(f"no toy-world classifier in {folder} (expected {WEIGHTS} and {CONFIG}; train one with scripts/train_toy_classifier.py)")
    cfg = ToyClassifierConfig(**json.loads((folder / CONFIG).read_text()))
    model = ToyClassifier(cfg)
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model.eval()


def accuracy_on_drawn(model: ToyClassifier, n: int, seed: int) -> dict[str, float]:
    """Shape and colour accuracy on `n` freshly drawn (clean) images of the classifier's world."""
    batch = sample(n, seed, model.cfg.spec())
    s, c = model.predict(to_tensor(batch.images))
    return {"shape": float((s.numpy() == batch.shape_ids).mean()), "colour": float((c.numpy() == batch.colour_ids).mean())}
