"""`salun-sd classify train | retrain | mask | forget | evaluate`: SalUn and its baselines on an image classifier."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from salun_sd.classify.config import METHODS, ClassifyConfig
from salun_sd.config import add_step_group, config_from_args, to_dict
from salun_sd.errors import UserError
from salun_sd.run.files import write_json
from salun_sd.run.folder import open_folder
from salun_sd.run.manifest import manifest

EPILOG = """examples (digits run offline on a CPU in about a minute; CIFAR-10 is the paper's setting, for a GPU):
  salun-sd classify train configs/classify_digits.yaml               # base model -> WORK_DIR/base
  salun-sd classify retrain configs/classify_digits.yaml             # Retrain on the retain set -> WORK_DIR/retrain-random10-s1
  salun-sd classify mask configs/classify_digits.yaml                # saliency mask -> WORK_DIR/salun-random10-s1/mask.safetensors
  salun-sd classify forget configs/classify_digits.yaml              # SalUn under that mask -> WORK_DIR/salun-random10-s1
  salun-sd classify forget configs/classify_digits.yaml --method ft  # a baseline: ft | ga | rl | l1_sparse | salun_soft | iu
  salun-sd classify evaluate configs/classify_digits.yaml            # UA, RA, TA, MIA-efficacy, gap to Retrain
  salun-sd classify forget configs/classify_cifar10.yaml --data.forget class --data.forget_class 3
Models load with salun_sd.classify.model.load_model("MODEL_DIR")."""


def load_config(args: argparse.Namespace) -> ClassifyConfig:
    cfg = config_from_args(args)
    cfg.check()
    return cfg


def _claim(out: Path, overwrite: bool) -> None:
    if (out / "model.json").exists() and not overwrite:
        raise UserError(f"{out} already holds a model: pass --overwrite to replace it")


def _base(cfg: ClassifyConfig) -> Path:
    if len(cfg.model_dir) > 1:
        raise UserError(f"this step reads one model, but model_dir names {len(cfg.model_dir)}")
    return Path(cfg.model_dir[0]) if cfg.model_dir else cfg.base_dir()


def _setup(cfg: ClassifyConfig):
    from salun_sd.classify.data import load_splits
    from salun_sd.run.runtime import make_accelerator

    accelerator = make_accelerator()
    if accelerator.num_processes > 1:
        raise UserError("salun-sd classify runs in one process; start it with python / salun-sd, not accelerate launch")
    return accelerator, load_splits(cfg.data)


def _save(model, out: Path, cfg: ClassifyConfig, command: str, **extra) -> None:
    from salun_sd.classify.model import save_model

    save_model(model.cpu(), out, cfg.model, manifest(to_dict(cfg), command, forget=cfg.data.forget_tag(), **extra))
    print(f"model written to {out}")


def run_train(args: argparse.Namespace) -> None:
    from salun_sd.classify.forget import accuracy, train_base

    cfg = load_config(args)
    out = Path(cfg.output_dir) if cfg.output_dir else cfg.base_dir()
    with open_folder(out, None, cfg.overwrite):  # a model folder: model.json holds its manifest
        _claim(out, cfg.overwrite)
        accelerator, splits = _setup(cfg)
        start = time.perf_counter()
        model = train_base(cfg, splits.train, splits.val, cfg.train, accelerator.device)
        seconds = time.perf_counter() - start
        acc = accuracy(model, splits.test, accelerator.device)
        _save(model, out, cfg, "classify train", train_examples=len(splits.train), seconds=seconds, test_accuracy=acc)


def run_retrain(args: argparse.Namespace) -> None:
    from salun_sd.classify.forget import train_base

    cfg = load_config(args)
    out = Path(cfg.output_dir) if cfg.output_dir else cfg.run_dir("retrain")
    with open_folder(out, None, cfg.overwrite):  # a model folder: model.json holds its manifest
        _claim(out, cfg.overwrite)
        accelerator, splits = _setup(cfg)
        start = time.perf_counter()
        model = train_base(cfg, splits.retain_set, None, cfg.methods.retrain, accelerator.device, "retrain")
        _save(model, out, cfg, "classify retrain", train_examples=len(splits.retain_set), seconds=time.perf_counter() - start)


def run_mask(args: argparse.Namespace) -> None:
    from salun_sd.classify.forget import make_masks
    from salun_sd.classify.model import load_model
    from salun_sd.core.saliency import mask_info, mask_path

    cfg = load_config(args)
    out = Path(cfg.output_dir) if cfg.output_dir else cfg.run_dir("salun")
    with open_folder(out, None, cfg.overwrite):  # a model folder: model.json holds its manifest
        if mask_path(out).exists() and not cfg.overwrite:
            raise UserError(f"{mask_path(out)} already exists: pass --overwrite to replace it")
        accelerator, splits = _setup(cfg)
        model, _ = load_model(_base(cfg))
        make_masks(model, splits.forget_set, cfg, accelerator, out)
        kept = mask_info(mask_path(out))["summary"]["total"]
        print(f"mask: kept {kept:.2%} of the weights -> {mask_path(out)}")


def run_forget(args: argparse.Namespace) -> None:
    from salun_sd.classify.forget import unlearn
    from salun_sd.classify.model import load_model
    from salun_sd.core.saliency import load_mask, mask_path

    cfg = load_config(args)
    out = Path(cfg.output_dir) if cfg.output_dir else cfg.run_dir(cfg.method)
    with open_folder(out, None, cfg.overwrite):  # a model folder: model.json holds its manifest
        _claim(out, cfg.overwrite)
        accelerator, splits = _setup(cfg)
        model, _ = load_model(_base(cfg))
        mask = None
        if cfg.method == "salun":
            path = Path(cfg.mask.path) if cfg.mask.path else mask_path(cfg.run_dir("salun"))
            mask = load_mask(path, model)
        start = time.perf_counter()
        model = unlearn(model.to(accelerator.device), splits, cfg, cfg.method, accelerator.device, mask)
        _save(model, out, cfg, f"classify forget ({cfg.method})", seconds=time.perf_counter() - start, base=str(_base(cfg)))


def run_evaluate(args: argparse.Namespace) -> None:
    from salun_sd.classify.evaluate import METRICS, average_gap, evaluate
    from salun_sd.classify.model import load_model

    cfg = load_config(args)
    candidates = [cfg.base_dir(), cfg.run_dir("retrain"), *(cfg.run_dir(m) for m in METHODS)]
    models = [Path(m) for m in cfg.model_dir] or [d for d in candidates if (d / "model.json").is_file()]
    if not models:
        raise UserError(f"no model of forget set {cfg.data.forget_tag()} under {cfg.work_dir}; pass --model_dir DIR")
    accelerator, splits = _setup(cfg)
    print(f"forget set {cfg.data.forget_tag()}: {len(splits.forget_set)} forget, {len(splits.retain_set)} retain, {len(splits.test)} test images")
    results = {}
    for folder in models:
        model, info = load_model(folder)
        results[folder] = {**evaluate(model.to(accelerator.device), splits, accelerator.device), "seconds": info.get("seconds")}
    retrain = results.get(cfg.run_dir("retrain"))
    print(f"{'model':<44}" + "".join(f"{k:>8}" for k in METRICS) + f"{'gap':>8}{'time s':>9}")
    for folder, r in results.items():
        r["gap_to_retrain"] = average_gap(r, retrain) if retrain is not None else None
        write_json(folder / "eval.json", {"forget": cfg.data.forget_tag(), **r})
        gap = f"{r['gap_to_retrain']:8.2f}" if r["gap_to_retrain"] is not None else f"{'-':>8}"
        secs = f"{r['seconds']:9.1f}" if r["seconds"] is not None else f"{'-':>9}"
        print(f"{str(folder):<44}" + "".join(f"{r[k]:8.2f}" for k in METRICS) + gap + secs)


COMMANDS = {
    "train": (run_train, "train the classifier from scratch on the training split (writes WORK_DIR/base)"),
    "retrain": (run_retrain, "Retrain, the gold standard: from scratch on the retain set (writes WORK_DIR/retrain-<forget>)"),
    "mask": (run_mask, "saliency mask of the forget set on the base model (writes WORK_DIR/salun-<forget>/mask.safetensors)"),
    "forget": (run_forget, "unlearn the forget set with `method` (salun reads the mask of `classify mask`; writes WORK_DIR/<method>-<forget>)"),
    "evaluate": (run_evaluate, "UA, RA, TA, MIA-efficacy, run time and gap to Retrain of every model of this forget set (writes MODEL/eval.json)"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    summary = "SalUn for image classification: random-data and class-wise forgetting, Retrain, FT, GA, RL, l1-sparse, SalUn-soft, IU"
    add_step_group(subparsers, "classify", summary, COMMANDS, ClassifyConfig, EPILOG, "configs/classify_cifar10.yaml, configs/classify_digits.yaml")
