"""Issue 3: data-parallel erase equals single-process erase (kill and resume: test_runlock.py)."""

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import exported_unet, forked
from salun_sd.cli import main
from salun_sd.families.tiny import tiny_pipeline


def test_two_processes_match_one_process_and_accumulation_with_the_same_global_batch(two_process_erase):
    p2, args = two_process_erase  # the last of repeated flags counts; the one-process runs need no process of their own
    main(["erase", *args, "--unlearn.batch_size", "2", "--output_dir", str(p2.parent / "p1")])
    main(["erase", *args, "--unlearn.gradient_accumulation_steps", "2", "--output_dir", str(p2.parent / "acc")])
    one, two, acc = exported_unet(p2.parent / "p1"), exported_unet(p2), exported_unet(p2.parent / "acc")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(acc[k], one[k], rtol=1e-5, atol=1e-7)
    original = dict(tiny_pipeline().unet.named_parameters())
    assert sum(int((one[k] != original[k].detach()).sum()) for k in one) > 0


def test_two_processes_share_the_image_generation_and_make_the_single_process_images_and_mask(erase_yaml):
    root, cfg = erase_yaml
    log = forked(main, "mask", str(cfg), "--output_dir", str(root / "mask2"), "--data.cache_dir", str(root / "cache2"))
    assert "(process 0 of 2)" in log and "(process 1 of 2)" in log  # each drew its share
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
