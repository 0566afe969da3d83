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

from salun_sd.ddpm.classifier import SmallResNet, predict
from salun_sd.ddpm.config import DDPMConfig
from salun_sd.ddpm.data import load_split, to_uint8
from salun_sd.ddpm.model import load_denoiser
from salun_sd.ddpm.sample import class_labels, sample, save_samples
from salun_sd.core.denoiser import ConceptData
from salun_sd.errors import UserError
from salun_sd.evaluation.fid import FidStats, frechet_distance, inception_fid


class Features:
    """FID of images in [-1, 1] against a reference set: torchmetrics' Inception FID (standard; the images go in as
    uint8 at their own size, grey repeated to RGB, and the metric's Inception resizes them, see evaluation/fid.py), or
    the Fréchet distance of the classifier's penultimate features (offline)."""

    def __init__(self, kind: str, classifier: SmallResNet, inception_weights: str = "", device: torch.device | str = "cpu") -> None:
        if kind not in ("inception", "classifier"):
            raise UserError(f"evaluate.features must be inception or classifier, got {kind!r}")
        self.kind, self.classifier = kind, classifier
        self.fid = inception_fid(inception_weights or None).to(device) if kind == "inception" else None
        self.reference: FidStats | None = None

    def _classifier_stats(self, x: torch.Tensor) -> FidStats:
        f = predict(self.classifier, x)[1].double().numpy()
        return FidStats(f.mean(0), np.cov(f, rowvar=False), len(f), "ddpm-classifier")

    @staticmethod
    def _uint8_batches(x: torch.Tensor, batch_size: int = 128):
        return (to_uint8(x[i : i + batch_size]).expand(-1, 3, -1, -1) for i in range(0, len(x), batch_size))

    def set_reference(self, x: torch.Tensor) -> None:
        if self.fid is None:
            self.reference = self._classifier_stats(x)
        else:
            self.fid.add(self._uint8_batches(x), real=True)

    def distance(self, x: torch.Tensor) -> float:
        if self.fid is None:
            return frechet_distance(self._classifier_stats(x), self.reference)
        return self.fid.distance(self._uint8_batches(x))


def remaining_reference(cfg: DDPMConfig) -> ConceptData:
    """Real held-out images of every class but the forgotten one: the FID reference."""
    return load_split(cfg.data, "test", exclude_class=cfg.forget_class)


def evaluate_model(cfg: DDPMConfig, model_dir: Path, classifier: SmallResNet, features: Features, device: torch.device | str = "cpu") -> dict:
    """Sample every class, score, write model_dir/eval.json (and the samples to model_dir/eval-samples)."""
    den = load_denoiser(model_dir, cfg.weights)
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
        "fid": features.distance(images[~forget]),
        "fid_features": features.kind,
        "per_class_accuracy": per_class,
        "samples_per_class": cfg.evaluate.samples_per_class,
        "sampling_seconds": sampling_s,
        "sample": asdict(scfg),
        "weights": cfg.weights,
    }
    (model_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result
