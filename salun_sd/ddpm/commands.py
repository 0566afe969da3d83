"""`salun-sd ddpm train | retrain | classifier | mask | erase | sample | evaluate` for the class-conditional DDPM."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from salun_sd.config import add_step_group, config_from_args, to_dict
from salun_sd.ddpm.config import DDPMConfig
from salun_sd.errors import UserError
from salun_sd.run.files import write_json
from salun_sd.run.manifest import manifest
from salun_sd.run.folder import open_folder
from salun_sd.run.runtime import device, finish, make_accelerator

EPILOG = """examples (digits run offline on a CPU in minutes; CIFAR-10 is the paper's setting):
  salun-sd ddpm train configs/ddpm_digits.yaml              # base model -> WORK_DIR/base
  salun-sd ddpm retrain configs/ddpm_digits.yaml            # gold standard: no forget_class -> WORK_DIR/retrain-class0
  salun-sd ddpm classifier configs/ddpm_digits.yaml         # the judge -> WORK_DIR/classifier
  salun-sd ddpm mask configs/ddpm_digits.yaml               # saliency mask -> WORK_DIR/salun-class0/mask.safetensors
  salun-sd ddpm erase configs/ddpm_digits.yaml              # masked unlearning -> WORK_DIR/salun-class0
  salun-sd ddpm sample configs/ddpm_digits.yaml --model_dir outputs/ddpm-digits/salun-class0 --output_dir samples/
  salun-sd ddpm evaluate configs/ddpm_digits.yaml           # UA, remaining accuracy, FID of every model found
  salun-sd ddpm evaluate configs/ddpm_digits.yaml --model_dir DIR_A DIR_B --classifier_path DIR_C
  accelerate launch --num_processes 4 -m salun_sd ddpm train configs/ddpm_cifar10.yaml --train.batch_size 32
Models load with UNet2DModel.from_pretrained("MODEL_DIR/unet") (base training also writes its EMA weights to
MODEL_DIR/unet_ema; --weights ema reads them) and DDPMScheduler.from_pretrained("MODEL_DIR/scheduler")."""



def model_dir(cfg: DDPMConfig) -> Path:
    """The one model a step reads: model_dir, else the base model."""
    if len(cfg.model_dir) > 1:
        raise UserError(f"this step reads one model, but model_dir names {len(cfg.model_dir)}: {' '.join(cfg.model_dir)}")
    return Path(cfg.model_dir[0]) if cfg.model_dir else cfg.base_dir()


def run_train(args: argparse.Namespace, exclude_class: int = -1) -> None:
    """Base training, or with exclude_class: Retrain, the same recipe without that class's images."""
    from salun_sd.core.trainer import list_checkpoints
    from salun_sd.ddpm.data import load_split
    from salun_sd.ddpm.train import train_base
    from salun_sd.run.folder import MANIFEST, claim
    from salun_sd.run.log import LOG_NAME

    cfg = config_from_args(args)
    cfg.train.check()
    out = Path(cfg.output_dir) if cfg.output_dir else cfg.retrain_dir() if exclude_class >= 0 else cfg.base_dir()
    command = "ddpm retrain" if exclude_class >= 0 else "ddpm train"
    resuming = bool(cfg.train.resume_from_checkpoint)
    writes = [MANIFEST, "unet", "unet_ema", "scheduler", *([] if resuming else ["checkpoints", LOG_NAME])]

    def blocking() -> list[Path]:
        return [out / "unet", *([] if resuming else list_checkpoints(out / "checkpoints")[:1])]

    accelerator = make_accelerator(cfg.mixed_precision)
    with open_folder(out, command, cfg.overwrite, accelerator.is_main_process), claim(out, writes, blocking, cfg.overwrite, resuming, accelerator, command, "train"):
        data = load_split(cfg.data, "train", exclude_class)
        extra = {"exclude_class": exclude_class, "train_examples": len(data), "num_processes": accelerator.num_processes}
        if accelerator.is_main_process:
            write_json(out / MANIFEST, manifest(to_dict(cfg), command, **extra))
        start = time.perf_counter()
        train_base(cfg.model, data, cfg.train, accelerator, out, cfg.data.random_flip)
        if accelerator.is_main_process:  # again, with the wall time of this (possibly resumed) run
            write_json(out / MANIFEST, manifest(to_dict(cfg), command, train_seconds=time.perf_counter() - start, **extra))
            print(f"model written to {out}")
    finish(accelerator)


def run_retrain(args: argparse.Namespace) -> None:
    run_train(args, exclude_class=config_from_args(args).forget_class)


def run_forget(args: argparse.Namespace, steps: tuple[str, ...]) -> None:
    from salun_sd.ddpm.forget import erase

    cfg = config_from_args(args)
    out = Path(cfg.output_dir) if cfg.output_dir else cfg.erase_dir()
    accelerator = make_accelerator(cfg.mixed_precision, cfg.unlearn.report_to, str(out))
    with open_folder(out, "+".join(steps), cfg.overwrite, accelerator.is_main_process):
        erase(cfg, accelerator, model_dir(cfg), out, steps)
    finish(accelerator)


def run_sample(args: argparse.Namespace) -> None:
    from salun_sd.ddpm.model import load_denoiser
    from salun_sd.ddpm.sample import class_labels, sample, save_samples

    cfg = config_from_args(args)
    model = model_dir(cfg)
    out = Path(cfg.output_dir) if cfg.output_dir else model / "samples"
    with open_folder(out, None, cfg.overwrite):
        if (out / "samples.safetensors").exists() and not cfg.overwrite:
            raise UserError(f"{out / 'samples.safetensors'} already exists: pass --overwrite to replace it")
        den = load_denoiser(model, cfg.weights)
        labels = class_labels(cfg.sample, den.num_classes)
        images = sample(den, labels, cfg.sample, device())
        save_samples(images, labels, out, {"model": str(model), "sample": json.dumps(to_dict(cfg.sample))})
        print(f"{len(labels)} samples written to {out} (grid.png, samples.safetensors)")


def run_classifier(args: argparse.Namespace) -> None:
    from salun_sd.ddpm.classifier import classifier_info, save_classifier, train_classifier
    from salun_sd.ddpm.data import load_split

    cfg = config_from_args(args)
    out = Path(cfg.output_dir) if cfg.output_dir else cfg.classifier_dir()
    with open_folder(out, None, cfg.overwrite):
        if (out / "classifier.json").exists() and not cfg.overwrite:
            raise UserError(f"{out / 'classifier.json'} already exists: pass --overwrite to replace it")
        train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
        model, acc = train_classifier(train, test, cfg.classifier, cfg.model.num_classes, cfg.data.random_flip, device())
        info = classifier_info(model, cfg.classifier, train.x0.shape[1], cfg.model.num_classes, dataset=to_dict(cfg.data), test_accuracy=acc, test_examples=len(test))
        save_classifier(model, out, info)
        print(f"classifier written to {out}: accuracy {acc:.2%} on {len(test)} real held-out images")


def run_evaluate(args: argparse.Namespace) -> None:
    from salun_sd.ddpm.classifier import load_classifier
    from salun_sd.ddpm.evaluate import Features, evaluate_model, remaining_reference

    cfg = config_from_args(args)
    models = [Path(m) for m in cfg.model_dir] or [d for d in (cfg.base_dir(), cfg.retrain_dir(), cfg.erase_dir()) if (d / "unet").is_dir()]
    if not models:
        raise UserError(f"no trained model under {cfg.work_dir}; pass --model_dir DIR")
    classifier, info = load_classifier(cfg.classifier_path or cfg.classifier_dir())
    if info["architecture"]["num_classes"] != cfg.model.num_classes:
        raise UserError(f"the classifier knows {info['architecture']['num_classes']} classes but model.num_classes is {cfg.model.num_classes}")
    classifier.to(device())
    features = Features(cfg.evaluate.features, classifier, cfg.evaluate.inception_weights, device())
    features.set_reference(remaining_reference(cfg).x0)
    print(f"classifier accuracy on real held-out images: {info['test_accuracy']:.2%}")
    print(f"{'model':<48} {'UA':>6} {'remain acc':>10} {'FID':>9}")
    for model_dir in models:
        r = evaluate_model(cfg, model_dir, classifier, features, device())
        print(f"{str(model_dir):<48} {r['ua']:>6.3f} {r['remaining_accuracy']:>10.3f} {r['fid']:>9.3f}")


COMMANDS = {
    "train": (run_train, "train the class-conditional DDPM from scratch (writes WORK_DIR/base)"),
    "retrain": (run_retrain, "Retrain, the gold standard: train from scratch without forget_class (writes WORK_DIR/retrain-class<k>)"),
    "classifier": (run_classifier, "train the classifier that scores UA, remaining accuracy and offline FID (writes WORK_DIR/classifier)"),
    "mask": (lambda args: run_forget(args, ("mask",)), "saliency mask of forget_class on the base model (writes WORK_DIR/<method>-class<k>/mask.safetensors)"),
    "erase": (lambda args: run_forget(args, ("erase",)), "masked unlearning of forget_class under the mask of `ddpm mask` (writes WORK_DIR/<method>-class<k>)"),
    "sample": (run_sample, "draw guided samples per class (writes MODEL/samples/grid.png and samples.safetensors)"),
    "evaluate": (run_evaluate, "UA, remaining-class accuracy and FID of one or more models (writes MODEL/eval.json)"),
}
def register(subparsers: argparse._SubParsersAction) -> None:
    summary = "class-conditional DDPM with classifier-free guidance (the paper's CIFAR-10 setting; digits offline)"
    add_step_group(subparsers, "ddpm", summary, COMMANDS, DDPMConfig, EPILOG, "configs/ddpm_cifar10.yaml, configs/ddpm_digits.yaml")
