"""Fréchet distance between the feature statistics of generated and reference images (FID).

Users get the standard Inception-v3 pool features (torch-fidelity's `inception-v3-compat`, as in
torchmetrics' FID), and any other feature extractor can be plugged in. Statistics (mu, sigma) can
be saved to and loaded from `.npz`, so a large reference set is read once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from salun_sd.errors import UserError
from salun_sd.evaluation.imagefiles import batched, list_images, load_rgb

INCEPTION_NAME = "inception-v3-compat-2048"


@dataclass
class FeatureExtractor:
    """`module` maps uint8 images [N, 3, S, S] (S = `image_size`) to features [N, D].

    `name` is stored with saved statistics: distances are only meaningful between statistics of
    the same extractor.
    """

    module: torch.nn.Module
    image_size: int
    name: str


def inception_extractor(weights_path: str | None = None) -> FeatureExtractor:
    """The standard FID features: Inception-v3 2048-d pool features via torchmetrics + torch-fidelity."""
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception needs it; fail here with a clear message)
    except ImportError:
        raise UserError(
            "FID with the standard Inception features needs the torch-fidelity package: "
            "`pip install 'salun-sd[fid]'` (torchmetrics + torch-fidelity)."
        ) from None
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path)
    except Exception as err:  # the weights are downloaded from GitHub on first use
        raise UserError(
            f"could not load the Inception weights for FID: {err}. Without a network, download "
            "pt_inception-2015-12-05-6726825d.pth elsewhere and pass it with --inception_weights."
        ) from err
    return FeatureExtractor(module, 299, INCEPTION_NAME)


@dataclass
class FidStats:
    """Mean and covariance of the features of one image set."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    extractor: str

    def save(self, path: str | Path) -> None:
        np.savez(path, mu=self.mu, sigma=self.sigma, count=self.count, extractor=self.extractor)

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


def _to_uint8(image: Image.Image, size: int) -> torch.Tensor:
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)


@torch.inference_mode()
def extract_features(paths: Sequence[Path], extractor: FeatureExtractor, batch_size: int = 32, device: str | torch.device = "cpu") -> np.ndarray:
    """Features [N, D] in float64; every image is resized to the extractor's input size first."""
    module = extractor.module.to(device).eval()
    chunks = []
    for chunk in batched(paths, batch_size, f"FID features ({extractor.name})"):
        batch = torch.stack([_to_uint8(load_rgb(p), extractor.image_size) for p in chunk]).to(device)
        chunks.append(module(batch).reshape(len(batch), -1).double().cpu().numpy())
    return np.concatenate(chunks)


def compute_stats(paths: Sequence[Path], extractor: FeatureExtractor, batch_size: int = 32, device: str | torch.device = "cpu") -> FidStats:
    if len(paths) < 2:
        raise UserError(f"FID needs at least 2 images per set, got {len(paths)}; thousands are usual for a stable estimate.")
    features = extract_features(paths, extractor, batch_size, device)
    return FidStats(features.mean(axis=0), np.cov(features, rowvar=False), len(paths), extractor.name)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: FidStats, b: FidStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    tr((S_a S_b)^(1/2)) is computed as the trace of the square root of the symmetric matrix
    S_a^(1/2) S_b S_a^(1/2) (same eigenvalues), which avoids the complex round-off of sqrtm.
    """
    if a.extractor != b.extractor:
        raise UserError(f"cannot compare FID statistics of different feature extractors: '{a.extractor}' and '{b.extractor}'.")
    if a.mu.shape != b.mu.shape:
        raise UserError(f"FID statistics have different feature sizes: {a.mu.size} and {b.mu.size}.")
    root_a = _sqrt_psd(a.sigma)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ b.sigma @ root_a), 0, None)).sum()
    distance = float(((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma) + np.trace(b.sigma) - 2 * cross)
    return max(distance, 0.0)


def reference_stats(reference: str | Path, extractor: FeatureExtractor, batch_size: int = 32, device: str | torch.device = "cpu") -> FidStats:
    """Statistics of the reference: a folder of images (any sizes; each is resized) or a saved `.npz`."""
    reference = Path(reference)
    if reference.is_file() and reference.suffix == ".npz":
        stats = FidStats.load(reference)
        if stats.extractor != extractor.name:
            raise UserError(f"reference statistics {reference} were computed with '{stats.extractor}', but FID now uses '{extractor.name}'.")
        return stats
    if not reference.exists():
        raise UserError(f"reference set {reference} does not exist: pass a folder of real images or a .npz of precomputed statistics.")
    if not reference.is_dir():
        raise UserError(f"reference set {reference} is neither a folder of images nor a .npz statistics file.")
    return compute_stats(list_images(reference, "reference folder"), extractor, batch_size, device)
