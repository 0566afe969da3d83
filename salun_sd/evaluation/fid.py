"""FID: torchmetrics' FrechetInceptionDistance, with the reference held as its real statistics.

Preprocessing, the one path for Stable Diffusion images and the DDPM: each image goes in as uint8 RGB at
its own size (grey images repeat their channel); the metric's Inception-v3 (torch-fidelity's
`inception-v3-compat`, 2048-d pool features) resizes it to 299x299 with torch-fidelity's TensorFlow-1
compatible bilinear resize (`antialias=False`), as the original TensorFlow FID code does. No resize of
ours comes before it. Reference statistics (mu, sigma) can be saved to and loaded from `.npz` (ours or
pytorch-fid's), so a large reference set is read once. The same metric on another network's features
(`feature_fid`) gives the Fréchet distance of the toy world's and the digits DDPM's classifier features,
where no Inception is involved: one distance for every caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from salun_sd.errors import UserError
from salun_sd.evaluation.imagefiles import batched, list_images, load_rgb
from salun_sd.run.files import atomic

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

INCEPTION_NAME = "inception-v3-compat-2048"


@dataclass
class FidStats:
    """Mean and covariance of the features of one image set."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    extractor: str

    def save(self, path: str | Path) -> None:
        with atomic(path) as tmp, tmp.open("wb") as f:  # a file object: np.savez would add .npz to the temporary name
            np.savez(f, mu=self.mu, sigma=self.sigma, count=self.count, extractor=self.extractor)

    @classmethod
    def load(cls, path: str | Path) -> FidStats:
        """Our `.npz` or one from pytorch-fid (mu and sigma only; the extractor is then assumed Inception)."""
        try:
            with np.load(path) as data:
                mu, sigma = data["mu"], data["sigma"]
                count = int(data["count"]) if "count" in data else 0
                extractor = str(data["extractor"]) if "extractor" in data else INCEPTION_NAME
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"{path} is not a statistics file with 'mu' and 'sigma' arrays ({err}).") from err
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise UserError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D).")
        return cls(mu.astype(np.float64), sigma.astype(np.float64), count, extractor)


class FidMetric:
    """A FrechetInceptionDistance whose real statistics are the reference; `name` is stored with saved statistics,
    because distances are only meaningful between statistics of the same features."""

    def __init__(self, metric: FrechetInceptionDistance, name: str) -> None:
        metric.reset_real_features = False  # reset() clears the generated images only
        self.metric, self.name = metric, name

    def to(self, device: str | torch.device) -> FidMetric:
        self.metric = self.metric.to(device)
        return self

    def add(self, batches: Iterable[torch.Tensor], real: bool) -> None:
        """Batches of uint8 images [N, 3, H, W] (one size per batch), as the reference (real) or as generated images."""
        for images in batches:
            self.metric.update(images.to(self.metric.device), real=real)

    def set_reference(self, stats: FidStats) -> None:
        """Make `stats` the metric's real statistics, through its state_dict (the sums it would have accumulated;
        a pytorch-fid .npz has no count: any n >= 2 gives the same mu, sigma)."""
        if stats.extractor != self.name:
            raise UserError(f"reference statistics were computed with '{stats.extractor}', but FID now uses '{self.name}'.")
        state = self.metric.metric_state
        n = max(stats.count, 2)
        mu = torch.as_tensor(stats.mu, dtype=torch.float64, device=self.metric.device)
        if mu.shape != state["real_features_sum"].shape:
            raise UserError(f"reference statistics have {mu.numel()} features, but {self.name} gives {state['real_features_sum'].numel()}.")
        sigma = torch.as_tensor(stats.sigma, dtype=torch.float64, device=self.metric.device)
        sums = {"real_features_sum": mu * n, "real_features_cov_sum": sigma * (n - 1) + n * torch.outer(mu, mu),
                "real_features_num_samples": torch.tensor(n, device=self.metric.device)}
        self.metric.load_state_dict(sums, strict=False)

    def reference(self) -> FidStats:
        """The real statistics, as the metric computes them from its sums."""
        state = self.metric.metric_state
        n = int(state["real_features_num_samples"])
        mu = state["real_features_sum"] / n
        sigma = (state["real_features_cov_sum"] - n * torch.outer(mu, mu)) / (n - 1)
        return FidStats(mu.cpu().numpy(), sigma.cpu().numpy(), n, self.name)

    def distance(self, batches: Iterable[torch.Tensor]) -> float:
        """FID of the images in `batches` (as for `add`) against the reference."""
        self.metric.reset()
        self.add(batches, real=False)
        if int(self.metric.fake_features_num_samples) < 2:
            raise UserError("FID needs at least 2 images per set; thousands are usual for a stable estimate.")
        return max(float(self.metric.compute()), 0.0)  # a set against itself can round to a tiny negative


def image_batches(paths: Sequence[Path], batch_size: int = 32, desc: str = "FID features") -> Iterator[torch.Tensor]:
    """The files as uint8 tensors [N, 3, H, W] at their own size, one batch per size within each chunk."""
    for chunk in batched(paths, batch_size, desc):
        arrays = [np.asarray(load_rgb(p)) for p in chunk]
        for size in dict.fromkeys(a.shape for a in arrays):  # a reference folder may mix sizes
            yield torch.from_numpy(np.stack([a for a in arrays if a.shape == size])).permute(0, 3, 1, 2)


def inception_fid(weights_path: str | None = None) -> FidMetric:
    """The standard FID: torchmetrics' FrechetInceptionDistance on 2048-d Inception-v3 pool features."""
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception needs it; fail here with a clear message)
    except ImportError:
        raise UserError(
            "FID with the standard Inception features needs the torch-fidelity package: "
            "`pip install 'salun-sd[fid]'` (torchmetrics + torch-fidelity)."
        ) from None
    from torchmetrics.image.fid import FrechetInceptionDistance

    if weights_path and not Path(weights_path).is_file():
        raise UserError(f"Inception weights file {weights_path} does not exist: pass the path of pt_inception-2015-12-05-6726825d.pth.")
    try:
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights_path, antialias=False)
    except Exception as err:  # the weights are downloaded from GitHub on first use
        raise UserError(
            f"could not load the Inception weights for FID ({type(err).__name__}: {err}). Without a network, download "
            "pt_inception-2015-12-05-6726825d.pth elsewhere and pass it with --inception_weights."
        ) from err
    return FidMetric(metric, INCEPTION_NAME)


class ClassifierFeatures(nn.Module):
    """A classifier's `features(x)` (images in [-1, 1]) as torchmetrics' custom FID extractor, in eval mode;
    `num_features` spares torchmetrics a trial forward on a uint8 image."""

    def __init__(self, classifier: nn.Module, num_features: int) -> None:
        super().__init__()
        self.classifier, self.num_features = classifier.eval(), num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x.float())


def feature_fid(module: nn.Module, name: str) -> FidMetric:
    """FrechetInceptionDistance on another feature network (ClassifierFeatures; tests use a small random CNN on uint8 images)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FidMetric(FrechetInceptionDistance(feature=module, input_img_size=(3, 32, 32)), name)


def reference_stats(reference: str | Path, fid: FidMetric, batch_size: int = 32) -> FidStats:
    """Load the reference into `fid`: a folder of images (any sizes) or a saved `.npz`; return its statistics."""
    reference = Path(reference)
    if reference.is_file() and reference.suffix == ".npz":
        stats = FidStats.load(reference)
        fid.set_reference(stats)
        return stats
    if not reference.exists():
        raise UserError(f"reference set {reference} does not exist: pass a folder of real images or a .npz of precomputed statistics.")
    if not reference.is_dir():
        raise UserError(f"reference set {reference} is neither a folder of images nor a .npz statistics file.")
    paths = list_images(reference, "reference folder")
    if len(paths) < 2:
        raise UserError(f"FID needs at least 2 reference images, {reference} holds {len(paths)}.")
    fid.add(image_batches(paths, batch_size, f"FID reference ({fid.name})"), real=True)
    return fid.reference()
