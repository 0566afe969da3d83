"""Score a class-conditional model after erasing: UA, remaining-class accuracy and FID.

UA (unlearning accuracy) is the share of images generated for the forgotten class that the
classifier does not call that class (higher: more forgotten); remaining accuracy is the share of
images generated for every other class that it calls right. FID compares generated remaining-class
images with the real held-out images of those classes, on Inception features (standard, CIFAR-10)
or on the classifier's penultimate features (offline).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from salun_sd.ddpm.classifier import SmallResNet, predict
from salun_sd.ddpm.config import DDPMConfig
from salun_sd.ddpm.data import load_split, to_uint8
from salun_sd.ddpm.model import load_denoiser
from salun_sd.ddpm.sample import class_labels, sample, save_samples
from salun_sd.denoiser import ConceptData
from salun_sd.errors import UserError
from salun_sd.evaluation.fid import FidStats, frechet_distance, inception_extractor


class Features:
    """Maps images in [-1, 1] to FID features: Inception pool features or the classifier's penultimate layer."""

    def __init__(self, kind: str, classifier: SmallResNet, inception_weights: str = "", device: torch.device | str = "cpu") -> None:
        if kind not in ("inception", "classifier"):
            raise UserError(f"evaluate.features must be inception or classifier, got {kind!r}")
        self.kind, self.classifier, self.device = kind, classifier, device
        self.extractor = inception_extractor(inception_weights or None) if kind == "inception" else None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, batch_size: int = 128) -> np.ndarray:
        if self.extractor is None:
            return predict(self.classifier, x)[1].double().numpy()
        module, size, out = self.extractor.module.to(self.device).eval(), self.extractor.image_size, []
        for start in range(0, len(x), batch_size):
            chunk = F.interpolate(x[start : start + batch_size].float(), size=(size, size), mode="bilinear", align_corners=False)
            chunk = to_uint8(chunk.expand(-1, 3, -1, -1)).to(self.device)  # grey images repeat their channel
            out.append(module(chunk).reshape(len(chunk), -1).double().cpu().numpy())
        return np.concatenate(out)

    def stats(self, x: torch.Tensor) -> FidStats:
        f = self(x)
        return FidStats(f.mean(0), np.cov(f, rowvar=False), len(f), f"ddpm-{self.kind}")


def remaining_reference(cfg: DDPMConfig) -> ConceptData:
    """Real held-out images of every class but the forgotten one: the FID reference."""
    return load_split(cfg.data, "test", exclude_class=cfg.forget_class)


def evaluate_model(cfg: DDPMConfig, model_dir: Path, classifier: SmallResNet, features: Features, reference: FidStats, device: torch.device | str = "cpu") -> dict:
    """Sample every class, score, write model_dir/eval.json (and the samples to model_dir/eval-samples)."""
    den = load_denoiser(model_dir)
    scfg = replace(cfg.sample, per_class=cfg.evaluate.samples_per_class, classes=[])
    labels = class_labels(scfg, den.num_classes)
    start = time.perf_counter()
    images = sample(den, labels, scfg, device)
    sampling_s = time.perf_counter() - start
    save_samples(images, labels, model_dir / "eval-samples")
    images = to_uint8(images).float() / 127.5 - 1  # score exactly what was saved
    pred = predict(classifier, images)[0]
    forget = labels == cfg.forget_class
    per_class = {int(c): (pred[labels == c] == c).float().mean().item() for c in labels.unique()}
    result = {
        "model": str(model_dir),
        "forget_class": cfg.forget_class,
        "ua": (pred[forget] != cfg.forget_class).float().mean().item(),
        "remaining_accuracy": (pred[~forget] == labels[~forget]).float().mean().item(),
        "fid": frechet_distance(features.stats(images[~forget]), reference),
        "fid_features": features.kind,
        "per_class_accuracy": per_class,
        "samples_per_class": cfg.evaluate.samples_per_class,
        "sampling_seconds": sampling_s,
        "sample": asdict(scfg),
    }
    (model_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result
