"""Score a class-conditional model after erasing: UA, remaining-class accuracy and FID.

UA (unlearning accuracy) is the share of images generated for the forgotten class that the
classifier does not call that class (higher: more forgotten); remaining accuracy is the share of
images generated for every other class that it calls right. FID compares generated remaining-class
images with the real held-out images of those classes, on Inception features (standard, CIFAR-10)
or on the classifier's penultimate features (offline).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch

from salun_sd.ddpm.classifier import SmallResNet, predict
from salun_sd.ddpm.config import DDPMConfig
from salun_sd.ddpm.data import load_split, to_uint8
from salun_sd.ddpm.model import load_denoiser
from salun_sd.ddpm.sample import class_labels, sample, save_samples
from salun_sd.core.denoiser import ConceptData
from salun_sd.evaluation.classify import unlearning_accuracy
from salun_sd.evaluation.fid import ClassifierFeatures, feature_fid, inception_fid
from salun_sd.run.files import write_json


class Features:
    """FID of images in [-1, 1] against a reference set, on torchmetrics' one FID path: Inception features (standard;
    the images go in as uint8 at their own size, grey repeated to RGB, and the metric's Inception resizes them, see
    evaluation/fid.py), or the classifier's penultimate features (offline)."""

    def __init__(self, kind: str, classifier: SmallResNet, inception_weights: str = "", device: torch.device | str = "cpu") -> None:
        self.kind = kind
        fid = inception_fid(inception_weights or None) if kind == "inception" else feature_fid(ClassifierFeatures(classifier, classifier.head.in_features), "ddpm-classifier")
        self.fid = fid.to(device)

    def _batches(self, x: torch.Tensor, batch_size: int = 128) -> Iterator[torch.Tensor]:
        for i in range(0, len(x), batch_size):
            yield to_uint8(x[i : i + batch_size]).expand(-1, 3, -1, -1) if self.kind == "inception" else x[i : i + batch_size]

    def set_reference(self, x: torch.Tensor) -> None:
        self.fid.add(self._batches(x), real=True)

    def distance(self, x: torch.Tensor) -> float:
        return self.fid.distance(self._batches(x))


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
    scores = unlearning_accuracy(labels.tolist(), pred.tolist(), {cfg.forget_class})
    result = {
        "model": str(model_dir),
        "forget_class": cfg.forget_class,
        "ua": scores["ua"],
        "remaining_accuracy": scores["remaining_accuracy"],
        "fid": features.distance(images[~forget]),
        "fid_features": features.kind,
        "per_class_accuracy": {c: entry["top1"] for c, entry in scores["per_class"].items()},
        "samples_per_class": cfg.evaluate.samples_per_class,
        "sampling_seconds": sampling_s,
        "sample": asdict(scfg),
        "weights": cfg.weights,
    }
    write_json(model_dir / "eval.json", result)
    return result
