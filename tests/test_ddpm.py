"""The DDPM companion on scikit-learn's digits with a small model: every command runs, and does what it says.

One module fixture trains a base model long enough to draw recognisable digits (and the judging
classifier); the forgetting test erases class 0 from it and checks the samples, not just the loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from conftest import salun
from salun_sd.cli import main as cli
from salun_sd.config import load_yaml
from salun_sd.ddpm.config import DataConfig, DDPMConfig, SampleConfig
from salun_sd.ddpm.data import load_split, split_by_class
from salun_sd.ddpm.model import build_unet, load_denoiser
from salun_sd.ddpm.sample import load_samples, sample
from salun_sd.saliency import load_mask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DIGITS = str(CONFIGS / "ddpm_digits.yaml")
QUICK = ["--unlearn.checkpointing_steps", "0", "--train.checkpointing_steps", "0"]


def run(work_dir: Path, *argv: str) -> None:
    command, *rest = argv
    cli(["ddpm", command, DIGITS, "--work_dir", str(work_dir), *rest])


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """A base digits model trained for 500 steps (~30 s) and its classifier, for this module's tests."""
    work = tmp_path_factory.mktemp("ddpm-digits")
    run(work, "train", "--train.max_steps", "500", "--train.batch_size", "64", *QUICK)
    run(work, "classifier", "--classifier.epochs", "15")
    return work


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_configs_build_the_official_and_the_small_model():
    cifar = load_yaml(DDPMConfig, CONFIGS / "ddpm_cifar10.yaml")
    unet = build_unet(cifar.model)
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(35.7e6, rel=0.01)  # the official model's size
    assert unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")  # attention at 16x16
    assert unet.config.num_class_embeds == 11 and unet.config.dropout == 0.1
    assert (cifar.unlearn.learning_rate, cifar.unlearn.max_steps, cifar.unlearn.batch_size, cifar.unlearn.max_grad_norm, cifar.unlearn.alpha) == (1e-4, 1000, 128, 1.0, 1e-3)
    assert (cifar.mask.guidance, cifar.mask.fraction, cifar.train.cond_drop_prob) == (2.0, 0.5, 0.1)
    digits = load_yaml(DDPMConfig, DIGITS)
    assert sum(p.numel() for p in build_unet(digits.model).parameters()) < 1e6


def test_digits_data_are_real_split_and_scaled():
    cfg = DataConfig(dataset="digits")
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert len(train) + len(test) == 1797 and train.x0.shape[1:] == (1, 8, 8)
    assert train.x0.min() == -1 and train.x0.max() == 1
    assert not any(torch.equal(a, b) for a in test.x0[:20] for b in train.x0)  # held-out images are not training images
    assert load_split(DataConfig(dataset="digits", image_size=16), "test").x0.shape[1:] == (1, 16, 16)
    forget, remain = split_by_class(train, 3)
    assert (forget.cond == 3).all() and (remain.cond != 3).all() and len(forget) + len(remain) == len(train)
    assert (load_split(cfg, "train", exclude_class=3).cond != 3).all()


def test_train_writes_a_loadable_model_and_a_manifest(digits):
    unet = UNet2DModel.from_pretrained(digits / "base" / "unet")
    assert unet.config.num_class_embeds == 11
    info = json.loads((digits / "base" / "manifest.json").read_text())
    assert info["config"]["train"]["max_steps"] == 500 and info["train_seconds"] > 0
    classifier = json.loads((digits / "classifier" / "classifier.json").read_text())
    assert classifier["test_accuracy"] > 0.9  # on real held-out digits


def test_resume_continues_exactly(tmp_path):
    flags = ["--train.batch_size", "8", "--train.checkpointing_steps", "2"]
    run(tmp_path / "a", "train", "--train.max_steps", "4", *flags)
    run(tmp_path / "b", "train", "--train.max_steps", "2", *flags)
    run(tmp_path / "b", "train", "--train.max_steps", "4", "--train.resume_from_checkpoint", "latest", "--overwrite", *flags)
    a, b = unet_weights(tmp_path / "a" / "base"), unet_weights(tmp_path / "b" / "base")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):  # an existing model is not replaced silently
        run(tmp_path / "a", "train", "--train.max_steps", "4", *flags)


def test_retrain_is_one_command_and_leaves_the_class_out(tmp_path):
    run(tmp_path, "retrain", "--forget_class", "7", "--train.max_steps", "2", "--train.batch_size", "8", *QUICK)
    info = json.loads((tmp_path / "retrain-class7" / "manifest.json").read_text())
    assert info["exclude_class"] == 7
    assert info["train_examples"] == len(load_split(DataConfig(dataset="digits"), "train", exclude_class=7))


def test_sampling_is_seeded_per_image(digits):
    run(digits, "sample", "--sample.per_class", "2", "--sample.num_inference_steps", "10", "--output_dir", str(digits / "s1"))
    images, labels = load_samples(digits / "s1")
    assert images.shape == (20, 1, 8, 8) and images.dtype == torch.uint8 and labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert (digits / "s1" / "grid.png").is_file()
    den = load_denoiser(digits / "base")
    cfg = SampleConfig(num_inference_steps=10, batch_size=3)
    some = sample(den, torch.tensor([4, 4, 9]), cfg)  # image i of class c is the same whatever else is drawn with it
    alone = sample(den, torch.tensor([9, 4, 4, 4]), SampleConfig(num_inference_steps=10, batch_size=1))
    torch.testing.assert_close(some, alone[[1, 2, 0]])
    assert torch.equal(some, sample(den, torch.tensor([4, 4, 9]), cfg))


def test_erase_forgets_the_class_and_keeps_masked_out_weights(digits):
    run(digits, "mask")
    mask = load_mask(digits / "salun-class0" / "mask.safetensors", load_denoiser(digits / "base").model)
    kept = sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    assert kept == pytest.approx(0.5, abs=0.01)
    run(digits, "erase", "--unlearn.max_steps", "120", "--unlearn.batch_size", "32", "--unlearn.learning_rate", "3e-4", *QUICK)
    before, after = unet_weights(digits / "base"), unet_weights(digits / "salun-class0")
    assert all(torch.equal(before[k][~mask[k]], after[k][~mask[k]]) for k in mask)  # frozen weights: bitwise equal
    assert any(not torch.equal(before[k], after[k]) for k in mask)

    run(digits, "evaluate", "--evaluate.samples_per_class", "20", "--sample.num_inference_steps", "20", "--model_dir", str(digits / "base"), str(digits / "salun-class0"))
    base = json.loads((digits / "base" / "eval.json").read_text())
    erased = json.loads((digits / "salun-class0" / "eval.json").read_text())
    print(base, erased)
    assert base["per_class_accuracy"]["0"] >= 0.7 and base["ua"] <= 0.3  # the base model draws zeros ...
    assert erased["ua"] >= 0.8  # ... the erased one does not
    assert erased["remaining_accuracy"] >= 0.6 and erased["fid"] > 0


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # A large Adam epsilon keeps updates proportional to gradients, so float summation order cannot flip a step;
    # a large learning rate makes the updates big enough that different data or noise would show.
    flags = [DIGITS, "--train.adam_epsilon", "1e-2", "--train.learning_rate", "0.05", "--train.warmup_steps", "0", *QUICK]
    salun("ddpm", "train", *flags, "--train.max_steps", "3", "--work_dir", str(tmp_path / "one"), "--train.batch_size", "8")
    salun("ddpm", "train", *flags, "--train.max_steps", "3", "--work_dir", str(tmp_path / "two"), "--train.batch_size", "4", processes=2)
    run(tmp_path / "init", "train", *flags[1:], "--train.max_steps", "0")
    one, two, init = (unet_weights(tmp_path / d / "base") for d in ("one", "two", "init"))
    assert max((one[k] - init[k]).abs().max().item() for k in one) > 1e-3
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-5)
