"""Unlearning accuracy (UA) for object classes, scored by an ImageNet classifier.

UA is the share of images generated for the forgotten class that the classifier does *not*
recognise as that class (higher: better forgetting). The accuracy on images of the remaining
classes shows what the erasure cost the model elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from PIL import Image

from salun_sd.errors import UserError
from salun_sd.evaluation.imagefiles import batched, load_rgb

# The ten Imagenette classes and their ImageNet-1k indices (also what torchvision's category list gives).
IMAGENETTE_IMAGENET_INDEX = {
    "tench": 0,
    "english springer": 217,
    "cassette player": 482,
    "chain saw": 491,
    "church": 497,
    "french horn": 566,
    "garbage truck": 569,
    "gas pump": 571,
    "golf ball": 574,
    "parachute": 701,
}


@cache
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet class names, from torchvision's metadata (no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def imagenet_index(name: str) -> int:
    """ImageNet-1k index of a class name (case-insensitive), e.g. 'English springer' -> 217."""
    key = " ".join(name.lower().split())
    if key in IMAGENETTE_IMAGENET_INDEX:
        return IMAGENETTE_IMAGENET_INDEX[key]
    lowered = [c.lower() for c in imagenet_categories()]
    if key in lowered:
        return lowered.index(key)
    close = [c for c in imagenet_categories() if key in c.lower()][:5]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UserError(f"'{name}' is not an ImageNet class name, so the classifier cannot score it.{hint}")


@dataclass
class ImageClassifier:
    """`module` maps a batch from `transform` to ImageNet-1k logits [N, 1000]."""

    module: torch.nn.Module
    transform: Callable
    name: str


def resnet50_classifier() -> ImageClassifier:
    """torchvision's ResNet-50 with IMAGENET1K_V2 weights (80.9 % top-1), downloaded on first use."""
    from torchvision.models import ResNet50_Weights, resnet50

    weights = ResNet50_Weights.IMAGENET1K_V2
    try:
        module = resnet50(weights=weights)
    except Exception as err:  # download errors come as URLError, HTTPError, RuntimeError
        raise UserError(
            f"could not load the ResNet-50 ImageNet weights: {err}. Without a network, download {weights.url} "
            "elsewhere and put it in $TORCH_HOME/hub/checkpoints/."
        ) from err
    return ImageClassifier(module.eval(), weights.transforms(), "resnet50/IMAGENET1K_V2")


class LogitsOf(torch.nn.Module):
    """A transformers image classifier as a module from pixel values to logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def transformers_classifier(model: torch.nn.Module, processor, name: str) -> ImageClassifier:
    """An ImageNet-1k classifier of transformers with its image processor (one image in, its pixel values out)."""
    return ImageClassifier(LogitsOf(model).eval(), lambda image: processor(image, return_tensors="pt").pixel_values[0], name)


def hub_resnet50_classifier(model_id: str = "microsoft/resnet-50") -> ImageClassifier:
    """The Hub's ResNet-50 through transformers, as UnlearnDiffAtk's object judge loads it (src/tasks/utils/metrics/object_eval.py)."""
    from transformers import AutoImageProcessor, ResNetForImageClassification

    try:
        processor, model = AutoImageProcessor.from_pretrained(model_id), ResNetForImageClassification.from_pretrained(model_id)
    except OSError as err:  # offline, or not a model id: transformers raises OSError naming the files it could not get
        raise UserError(f"could not load {model_id} from the Hugging Face Hub: {err}. Without a network, download it elsewhere "
                        "(huggingface-cli download microsoft/resnet-50) and copy the cache, or use imagenet_model: torchvision.") from err
    return transformers_classifier(model, processor, model_id)


@torch.inference_mode()
def predict(paths: Sequence[Path], classifier: ImageClassifier, batch_size: int = 32, device: str | torch.device = "cpu") -> list[int]:
    """Top-1 ImageNet index per image."""
    predictions: list[int] = []
    for chunk in batched(paths, batch_size, f"classify ({classifier.name})"):
        predictions.extend(predict_images([load_rgb(p) for p in chunk], classifier, device))
    return predictions


@torch.inference_mode()
def predict_images(images: Sequence[Image.Image], classifier: ImageClassifier, device: str | torch.device = "cpu") -> list[int]:
    """Top-1 ImageNet index per image in memory."""
    module = classifier.module.to(device).eval()
    batch = torch.stack([classifier.transform(image) for image in images]).to(device)
    return module(batch).argmax(dim=-1).tolist()


def unlearning_accuracy(targets: Sequence[Hashable], predictions: Sequence[Hashable], forget: Collection[Hashable]) -> dict:
    """UA: the share of images made for a forgotten class whose predicted class is none of the forgotten ones (higher:
    more forgotten); remaining accuracy: the share of the other images predicted as their own class; top-1 per class.

    The one computation for ImageNet classes, the DDPM's classes and the toy world's (colour, shape) pairs, where
    erasing a shape forgets every pair with it. A score without images is None.
    """
    per_class: dict[Hashable, dict] = {}
    for target, predicted in zip(targets, predictions, strict=True):
        entry = per_class.setdefault(target, {"images": 0, "correct": 0})
        entry["images"] += 1
        entry["correct"] += int(predicted == target)
    for entry in per_class.values():
        entry["top1"] = entry["correct"] / entry["images"]
    forgotten = [predicted not in forget for target, predicted in zip(targets, predictions) if target in forget]
    remaining = [predicted == target for target, predicted in zip(targets, predictions) if target not in forget]
    return {
        "forget_images": len(forgotten),
        "ua": sum(forgotten) / len(forgotten) if forgotten else None,
        "remaining_images": len(remaining),
        "remaining_accuracy": sum(remaining) / len(remaining) if remaining else None,
        "per_class": per_class,
    }


def imagenet_unlearning_accuracy(
    paths: Sequence[Path],
    class_names: Sequence[str],
    forget_classes: str | Sequence[str],
    classifier: ImageClassifier,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> dict:
    """UA on the images of the forgotten class(es), and top-1 accuracy on the images of every other class, by ImageNet
    index; with several forgotten classes (a joint erase) also each one's UA on its own images."""
    forget_classes = [forget_classes] if isinstance(forget_classes, str) else list(forget_classes)  # one name, not its letters
    forget_index = {name: imagenet_index(name) for name in forget_classes}
    index_of = {name: imagenet_index(name) for name in class_names}
    absent = next((name for name, index in forget_index.items() if index not in index_of.values()), None)
    if absent is not None:
        raise UserError(
            f"no image was generated for the forgotten class '{absent}' (classes present: "
            f"{', '.join(sorted(set(class_names)))}); generate from a class-prompt CSV that includes it."
        )
    predictions = predict(paths, classifier, batch_size, device)
    targets = [index_of[name] for name in class_names]
    scores = unlearning_accuracy(targets, predictions, set(forget_index.values()))
    per_concept = {name: unlearning_accuracy(*zip(*[(t, p) for t, p in zip(targets, predictions) if t == index]), {index})
                   for name, index in forget_index.items()} if len(forget_classes) > 1 else {}
    return {
        "classifier": classifier.name,
        "forget_class": ", ".join(forget_classes),
        "forget_imagenet_index": next(iter(forget_index.values())) if len(forget_classes) == 1 else sorted(forget_index.values()),
        **scores,
        **({"per_concept": {name: {"images": s["forget_images"], "ua": s["ua"]} for name, s in per_concept.items()}} if per_concept else {}),
        "per_class": {name: {"imagenet_index": index, **scores["per_class"][index]} for name, index in index_of.items()},
        "per_image": {Path(path).name: int(p) for path, p in zip(paths, predictions)},
    }
