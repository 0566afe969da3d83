"""The paper's four numbers and their average gap to Retrain (Table 1).

UA = 100 − accuracy on the forget set; RA and TA: accuracy on the retain and test sets (all un-augmented).
MIA-efficacy (evaluation/SVC_MIA.py, 'confidence'): an RBF SVC (C = 3, gamma 'auto') learns member vs
non-member from the softmax probability of the true label, with the first len(test) retain images as members
and the test set as non-members; MIA-efficacy is the share of forget images it calls non-members, × 100.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.svm import SVC
from torch import nn

from salun_sd.classify.data import Images, Splits
from salun_sd.classify.forget import probabilities

METRICS = ("UA", "RA", "TA", "MIA")


def true_class_confidence(model: nn.Module, images: Images, device: torch.device | str) -> np.ndarray:
    probs = probabilities(model, images, device)
    return probs.gather(1, images.y.cpu()[:, None]).numpy()


def mia_efficacy(model: nn.Module, members: Images, non_members: Images, targets: Images, device: torch.device | str) -> float:
    """Share (× 100) of `targets` an SVC trained on members (1) vs non-members (0) calls non-members."""
    x = np.concatenate([true_class_confidence(model, members, device), true_class_confidence(model, non_members, device)])
    y = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return 100 * float(1 - clf.predict(true_class_confidence(model, targets, device)).mean())


def evaluate(model: nn.Module, splits: Splits, device: torch.device | str) -> dict[str, float]:
    """UA, RA, TA, MIA-efficacy (percent)."""
    forget, retain, test = splits.forget_set, splits.retain_set, splits.test

    def acc(images: Images) -> float:
        return 100 * (probabilities(model, images, device).argmax(1) == images.y.cpu()).float().mean().item()

    return {"UA": 100 - acc(forget), "RA": acc(retain), "TA": acc(test), "MIA": mia_efficacy(model, retain[: len(test)], test, forget, device)}


def average_gap(result: dict[str, float], retrain: dict[str, float]) -> float:
    """Mean |difference| to Retrain over UA, RA, TA and MIA-efficacy (the paper's 'Avg. Gap')."""
    return float(np.mean([abs(result[k] - retrain[k]) for k in METRICS]))
