"""Issue 3: data-parallel erase equals single-process erase; SIGKILL + resume equals an uninterrupted run."""

import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import FORGET, REMAIN, salun
from salun_sd.sd.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """One process draws the data (two batches of 4 per prompt), then makes the mask."""
    root = tmp_path_factory.mktemp("dist")
    path = root / "cfg.yaml"
    path.write_text(
        f"model: tiny\ndata:\n  forget:\n    - prompt: {FORGET}\n      generate: 8\n  remain:\n    - prompt: {REMAIN}\n      generate: 8\n"
        f"  generation_steps: 3\n  generation_batch_size: 4\n  cache_dir: {root / 'cache1'}\nmask:\n  batch_size: 4\ntrain:\n  learning_rate: 1.0e-3\n"
    )
    salun("mask", str(path), "--output_dir", str(root / "mask1"))
    return root, path


def unet(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_two_processes_match_one_process_and_accumulation_with_the_same_global_batch(config):
    root, cfg = config
    mask = str(root / "mask1" / "mask.safetensors")
    # A large Adam epsilon keeps each update proportional to its gradient: with the default 1e-8, a gradient
    # of ~1e-9 (float noise of the summation order) decides the sign of a full lr-sized step.
    common = [str(cfg), "--mask.path", mask, "--train.max_steps", "3", "--train.adam_epsilon", "1e-2"]
    salun("erase", *common, "--train.batch_size", "2", "--output_dir", str(root / "p1"))
    salun("erase", *common, "--train.batch_size", "1", "--output_dir", str(root / "p2"), processes=2)
    salun("erase", *common, "--train.batch_size", "1", "--train.gradient_accumulation_steps", "2", "--output_dir", str(root / "acc"))
    one, two, acc = unet(root / "p1"), unet(root / "p2"), unet(root / "acc")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(acc[k], one[k], rtol=1e-5, atol=1e-7)
    original = dict(tiny_pipeline().unet.named_parameters())
    assert sum(int((one[k] != original[k].detach()).sum()) for k in one) > 0


def test_two_processes_share_the_image_generation_and_make_the_single_process_images_and_mask(config):
    root, cfg = config
    run = salun("mask", str(cfg), "--output_dir", str(root / "mask2"), "--data.cache_dir", str(root / "cache2"), processes=2)
    assert "(process 0 of 2)" in run.stderr and "(process 1 of 2)" in run.stderr  # each drew its share
    one = {p.relative_to(root / "cache1"): p for p in (root / "cache1" / "images").rglob("*.png")}
    two = {p.relative_to(root / "cache2"): p for p in (root / "cache2" / "images").rglob("*.png")}
    assert len(two) == 16 and set(two) == set(one)
    for name, path in two.items():
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(one[name]))), name
    a, b = load_file(str(root / "mask1" / "mask.safetensors")), load_file(str(root / "mask2" / "mask.safetensors"))
    total = sum(v.numel() for v in a.values())
    differ = sum(int((a[k] != b[k]).sum()) for k in a)  # only float summation order differs
    assert differ <= 1e-4 * total
    assert sum(int(v.sum()) for v in a.values()) == sum(int(v.sum()) for v in b.values())


def test_sigkill_then_resume_ends_bitwise_equal_to_an_uninterrupted_run(config):
    root, cfg = config
    mask = str(root / "mask1" / "mask.safetensors")
    common = [str(cfg), "--mask.path", mask, "--train.max_steps", "40", "--train.batch_size", "2", "--train.checkpointing_steps", "3",
              "--train.weight_decay", "0.01", "--train.max_grad_norm", "1.0"]
    salun("erase", *common, "--output_dir", str(root / "straight"))

    run = root / "killed"
    proc = salun("erase", *common, "--output_dir", str(run), processes=1, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints").is_dir() or not any(p.name.startswith("checkpoint-") for p in (run / "checkpoints").iterdir()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    time.sleep(0.3)  # somewhere in the middle of the following steps (or checkpoint writes)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "pipeline").exists()

    refused = salun("erase", *common, "--output_dir", str(run), check=False)
    assert refused.returncode == 2 and "resume_from_checkpoint latest" in refused.stderr
    resumed = salun("erase", *common, "--output_dir", str(run), "--train.resume_from_checkpoint", "latest")
    assert "resumed from" in resumed.stdout + resumed.stderr
    straight, again = unet(root / "straight"), unet(run)
    for k in straight:
        assert torch.equal(straight[k], again[k]), k
