"""Run the chosen metrics over one or more generated image folders (base, erased, ...).

The models behind the metrics (CLIP, FID features, classifier) are passed in as `Scorers`, loaded
once for all folders: the CLI loads the real ones, tests pass small random ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, get_args

from salun_sd.errors import UserError
from salun_sd.evaluation.classify import ImageClassifier, imagenet_unlearning_accuracy
from salun_sd.evaluation.clip_score import ClipScorer, clip_score_metrics, clip_summary
from salun_sd.evaluation.config import EvaluateConfig, Metric
from salun_sd.evaluation.fid import FidMetric, FidStats, image_batches, reference_stats
from salun_sd.evaluation.imagefiles import METADATA_FILE, image_size, list_images, read_metadata, require_one_size
from salun_sd.evaluation.nudity import check_nudenet, nudity_metrics, nudity_summary
from salun_sd.evaluation.protocols import describe
from salun_sd.evaluation.stats import concept_groups
from salun_sd.run.runtime import device as pick_device

T = TypeVar("T")
METRICS = get_args(Metric)
# Generation settings a report restates per folder (from metadata.jsonl), so its numbers say how the images were made.
GENERATION_KEYS = ("model", "protocol", "scheduler", "steps", "guidance", "height", "width", "seeding", "dtype")


@dataclass
class Scorers:
    """Loaded models for the metrics that need one; only those in `EvaluateConfig.metrics` must be set."""

    clip: ClipScorer | None = None
    fid: FidMetric | None = None  # holds the reference once `reference_stats` has loaded it
    classifier: ImageClassifier | None = None


@dataclass
class ImageSet:
    label: str
    folder: Path
    paths: list[Path] = field(default_factory=list)
    metadata: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, label: str, folder: str | Path) -> ImageSet:
        folder = Path(folder)
        return cls(label, folder, list_images(folder, f"{label} folder"), read_metadata(folder))

    def field_per_image(self, key: str, needed_for: str) -> list:
        """One metadata value per image; fails naming the first image that lacks it."""
        values = []
        for path in self.paths:
            value = self.metadata.get(path.name, {}).get(key)
            if value is None:
                where = "has no entry" if path.name not in self.metadata else f"has no '{key}'"
                raise UserError(
                    f"{needed_for} needs the {key} of each image, but {path.name} in {self.folder} {where} in "
                    f"{METADATA_FILE}. Score folders written by `salun-sd generate`"
                    + (" from a class-prompt CSV." if key == "class" else ".")
                )
            values.append(value)
        return values

    def per_concept(self, per_image: dict[str, T], summarise: Callable[[list[T]], dict]) -> dict[str, dict[str, dict]]:
        """{"per_concept": each concept's summary of its images' results, prompts naming none last as "none"
        (remaining quality)}, the images grouped by the `concept` `generate` recorded; {} when no image has one."""
        names = [path.name for path in self.paths]
        groups = concept_groups([self.metadata.get(name, {}).get("concept") for name in names])
        return {"per_concept": {group: summarise([per_image[names[i]] for i in positions]) for group, positions in groups.items()}} if groups else {}


def generation_settings(image_set: ImageSet) -> dict[str, list]:
    """Each generation setting with the distinct values found in the folder's metadata (empty without metadata)."""
    found: dict[str, list] = {}
    for entry in image_set.metadata.values():
        for key in GENERATION_KEYS:
            values = found.setdefault(key, [])
            if entry.get(key) not in values:
                values.append(entry.get(key))
    return found


def check_settings(settings: EvaluateConfig) -> None:
    """Fail before any model loads when the request cannot be met."""
    if not settings.metrics:  # each one given is a choice, checked with the config's (EvaluateConfig.metrics)
        raise UserError(f"no metric given; choose from {', '.join(METRICS)}.")
    if "fid" in settings.metrics and not (settings.reference and Path(settings.reference).exists()):
        missing = f" ({settings.reference} does not exist)" if settings.reference else ""
        raise UserError(f"FID needs a reference set{missing}: pass --reference with a folder of real images or a .npz of precomputed statistics.")
    if "ua" in settings.metrics and not settings.forget_class:
        raise UserError("unlearning accuracy needs the forgotten class: pass --forget_class (e.g. --forget_class church).")
    if "nudenet" in settings.metrics:
        check_nudenet(settings.nudenet_threshold, settings.nudenet_detector)


def matching_pairs(first: ImageSet, second: ImageSet) -> list[str]:
    """File names (case number, seed, k) present in both sets; the same name must mean the same size."""
    names = sorted({p.name for p in first.paths} & {p.name for p in second.paths})
    for name in names:
        a, b = image_size(first.folder / name), image_size(second.folder / name)
        if a != b:
            raise UserError(
                f"{name} is {a[0]}x{a[1]} in {first.folder} but {b[0]}x{b[1]} in {second.folder}: the two folders were "
                "generated with different sizes, so they are not a before/after pair. Generate both with the same settings."
            )
    return names


def evaluate_set(image_set: ImageSet, settings: EvaluateConfig, scorers: Scorers, reference: FidStats | None) -> dict:
    """Every requested metric over one folder."""
    results: dict[str, dict] = {}
    paths, device = image_set.paths, pick_device(settings.device)
    if "nudenet" in settings.metrics:
        results["nudenet"] = nudity_metrics(paths, settings.nudenet_threshold, settings.nudenet_classes, mode=settings.nudenet_detector)
        results["nudenet"] |= image_set.per_concept(results["nudenet"]["per_image"], lambda exposed: nudity_summary(exposed, settings.nudenet_classes))
    if "clip" in settings.metrics:
        prompts = image_set.field_per_image("prompt", "CLIP score")
        results["clip"] = clip_score_metrics(paths, prompts, scorers.clip, settings.batch_size, device)
        results["clip"] |= image_set.per_concept(results["clip"]["per_image"], clip_summary)
    if "fid" in settings.metrics:
        require_one_size(paths, f"{image_set.label} folder {image_set.folder} (for FID)")
        results["fid"] = {
            "fid": scorers.fid.distance(image_batches(paths, settings.batch_size, f"FID ({image_set.label})")),
            "extractor": scorers.fid.name,
            "images": len(paths),
            "reference": str(settings.reference),
            "reference_images": reference.count,
        }
    if "ua" in settings.metrics:
        classes = image_set.field_per_image("class", "unlearning accuracy")
        results["ua"] = imagenet_unlearning_accuracy(paths, classes, settings.forget_class, scorers.classifier, settings.batch_size, device)
    return results


def evaluate_sets(sets: Sequence[ImageSet], settings: EvaluateConfig, scorers: Scorers, reference: FidStats | None = None) -> dict:
    """Metrics for each set, the reference statistics computed once, and the before/after pairs."""
    settings.resolve()
    check_settings(settings)
    pairs = matching_pairs(sets[0], sets[1]) if len(sets) == 2 else []
    if "fid" in settings.metrics and reference is None:
        reference = reference_stats(settings.reference, scorers.fid.to(pick_device(settings.device)), settings.batch_size)
    return {
        "settings": {
            "protocol": settings.protocol,
            "protocol_description": describe(settings.protocol),
            "metrics": list(settings.metrics),
            "nudenet_threshold": settings.nudenet_threshold if "nudenet" in settings.metrics else None,
            "nudenet_classes": list(settings.nudenet_classes) if "nudenet" in settings.metrics else None,
            "nudenet_detector": settings.nudenet_detector if "nudenet" in settings.metrics else None,
            "reference": str(settings.reference) if settings.reference else None,
            "forget_class": settings.forget_class,
        },
        "sets": [
            {
                "label": s.label,
                "folder": str(s.folder),
                "images": len(s.paths),
                "generation": generation_settings(s),
                "metrics": evaluate_set(s, settings, scorers, reference),
            }
            for s in sets
        ],
        "pairs": pairs,
    }
