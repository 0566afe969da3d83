"""Base → Retrain → SalUn on scikit-learn's digits, end to end on a CPU, and the results table.

Runs the `salun-sd ddpm` commands with configs/ddpm_digits.yaml (forgetting class 0), scores every
model with the module's classifier (UA, remaining-class accuracy, FID on its penultimate features),
and writes the table into the DDPM section of docs/RESULTS.md (the rest of that file is kept).

    OMP_NUM_THREADS=1 python scripts/ddpm_digits_benchmark.py            # ~15-20 min on one CPU core
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from salun_sd.cli import main as cli
from salun_sd.config import from_dict
from salun_sd.ddpm.classifier import load_classifier, predict
from salun_sd.ddpm.config import DDPMConfig
from salun_sd.ddpm.data import load_split
from salun_sd.ddpm.evaluate import Features
from salun_sd.evaluation.classify import unlearning_accuracy
from salun_sd.run.files import write_section
from salun_sd.run.manifest import git_revision

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- ddpm-digits-benchmark:begin -->", "<!-- ddpm-digits-benchmark:end -->"


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    cli(argv)
    return time.perf_counter() - start


def real_reference(cfg: DDPMConfig) -> dict:
    """What real images score: the classifier on held-out digits, and FID of real training vs held-out images."""
    classifier, _ = load_classifier(cfg.classifier_dir())
    features = Features("classifier", classifier)
    test, train = load_split(cfg.data, "test"), load_split(cfg.data, "train", exclude_class=cfg.forget_class)
    scores = unlearning_accuracy(test.cond.tolist(), predict(classifier, test.x0)[0].tolist(), {cfg.forget_class})
    features.set_reference(test.x0[test.cond != cfg.forget_class])
    return {
        "ua": scores["ua"],
        "remaining_accuracy": scores["remaining_accuracy"],
        "fid": features.distance(train.x0),
    }


def table(cfg: DDPMConfig, rows: dict[str, dict], seconds: dict[str, float], total: float, classifier_acc: float) -> str:
    k = cfg.forget_class
    pixels = cfg.model.channels * cfg.model.sample_size**2  # the official losses sum over these values, ours average
    lines = [
        BEGIN,
        f"### Digits: base, Retrain and SalUn (forgetting class {k})",
        "",
        f"Written by `scripts/ddpm_digits_benchmark.py` on {time.strftime('%Y-%m-%d')} (revision `{git_revision()[:12]}`), "
        f"CPU only ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)), total {total / 60:.1f} min. "
        f"Config `configs/ddpm_digits.yaml`: UNet2DModel {cfg.model.block_out_channels}, {cfg.model.sample_size}x{cfg.model.sample_size}, "
        f"base and Retrain {cfg.train.max_steps} steps of batch {cfg.train.batch_size}; SalUn mask {cfg.mask.fraction:.0%} (guidance {cfg.mask.guidance}), "
        f"{cfg.unlearn.max_steps} masked Adam steps, lr {cfg.unlearn.learning_rate:g}, batch {cfg.unlearn.batch_size}, α {cfg.unlearn.alpha:g} on the mean remain loss "
        f"(official terms: {cfg.unlearn.alpha / pixels:g} on the summed one), clip {cfg.unlearn.max_grad_norm:g} {'before' if cfg.unlearn.clip_before_mask else 'after'} the mask, "
        f"mask gradients clipped per batch to {cfg.mask.max_grad_norm:g} (official terms: {cfg.mask.max_grad_norm * pixels:g}), class dropout {cfg.unlearn.cond_drop_prob:g}, "
        f"c′ = {'(k + 1) mod 10' if cfg.misaligned == 'next' else 'a random other class'}, {cfg.weights} weights. "
        f"Seeds: data split {cfg.data.seed}, base/Retrain {cfg.train.seed}, unlearning {cfg.unlearn.seed}, sampling {cfg.sample.seed}, classifier {cfg.classifier.seed}.",
        "",
        f"Scored on {cfg.evaluate.samples_per_class} samples per class ({cfg.sample.scheduler.upper()} {cfg.sample.num_inference_steps} steps, η {cfg.sample.eta:g}, guidance w = {cfg.sample.guidance}) "
        f"by the module's classifier ({classifier_acc:.1%} on real held-out digits). UA: share of class-{k} samples not classified as {k} "
        f"(higher = more forgotten). Remaining accuracy: share of the other classes' samples classified as their class. FID: those samples vs "
        f"the real held-out images of their classes, on the classifier's {cfg.classifier.widths[-1]}-d penultimate features (not comparable "
        "with Inception FID). Wall time: training (SalUn: mask + unlearning); sampling excluded.",
        "",
        "| model | UA ↑ | remaining accuracy ↑ | FID ↓ | wall time |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        wall = f"{seconds[name]:.0f} s" if name in seconds else "–"
        lines.append(f"| {name} | {r['ua']:.3f} | {r['remaining_accuracy']:.3f} | {r['fid']:.3f} | {wall} |")
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/ddpm-digits-benchmark")
    parser.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"))
    args, extra = parser.parse_known_args()  # extra: config flags for every command, e.g. --unlearn.max_steps 300
    config = str(ROOT / "configs" / "ddpm_digits.yaml")
    common = [config, "--work_dir", args.work_dir, "--overwrite", *extra]
    start = time.perf_counter()
    seconds = {
        "base": timed(["ddpm", "train", *common]),
        "classifier": timed(["ddpm", "classifier", *common]),
        "Retrain": timed(["ddpm", "retrain", *common]),
        "SalUn": timed(["ddpm", "mask", *common]) + timed(["ddpm", "erase", *common]),
    }
    cfg = from_dict(DDPMConfig, json.loads((Path(args.work_dir) / "base" / "manifest.json").read_text())["config"])  # as resolved, flags included
    cli(["ddpm", "evaluate", *common, "--model_dir", str(cfg.base_dir()), str(cfg.retrain_dir()), str(cfg.erase_dir())])
    total = time.perf_counter() - start
    rows = {"real held-out digits (reference)": real_reference(cfg)}
    for name, folder in (("base", cfg.base_dir()), ("Retrain", cfg.retrain_dir()), ("SalUn", cfg.erase_dir())):
        rows[name] = json.loads((folder / "eval.json").read_text())
    classifier_acc = json.loads((cfg.classifier_dir() / "classifier.json").read_text())["test_accuracy"]
    section = table(cfg, rows, seconds, total, classifier_acc)
    write_section(args.results, BEGIN, END, section)
    (Path(args.work_dir) / "results.json").write_text(json.dumps({"rows": rows, "seconds": seconds, "total_seconds": total}, indent=2))
    print(section)


if __name__ == "__main__":
    main()
