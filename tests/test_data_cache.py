"""The data cache keys on what the data is, and a run's weights do not depend on what the cache held (issue 23, part 1)."""

import os
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file

from conftest import FORGET, REMAIN, exported_unet, tiny_config
from salun_sd.families.config import DataConfig, ImageGroup
from salun_sd.families.data import generated_images, group_latents
from salun_sd.families.erase import erase
from salun_sd.families.loading import load_pipeline, model_identity
from salun_sd.families.tiny import tiny_pipeline

PAINTING, SCULPTURE = "a painting of a nude person", "a sculpture of a nude person"


def photos(n: int, seed: int = 0) -> list[Image.Image]:
    """Small random RGB images (the tiny VAE reads 32 px; 48 px makes the resize and crop do something)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(n)]


def image_folder(folder: Path, images: list[Image.Image]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:02d}.png")
    return folder


def saved_dataset(folder: Path, images: list[Image.Image], labels: list[int]) -> Path:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(folder))
    return folder


def all_sources_config(tmp_path: Path, out: Path, cache: Path):
    """A tiny erase whose forget set draws on every source: generated images, a folder and a saved dataset."""
    cfg = tiny_config(out, cache)
    cfg.validation_grid = False
    cfg.data.forget = [
        ImageGroup(prompt=FORGET, generate=4),
        ImageGroup(prompt=PAINTING, folder=str(tmp_path / "folder")),
        ImageGroup(prompt=SCULPTURE, hf_dataset=str(tmp_path / "dataset"), hf_label=1),
    ]
    cfg.data.remain = [ImageGroup(prompt=REMAIN, generate=4)]
    return cfg


def test_a_cold_cache_run_and_a_warm_cache_run_are_bitwise_equal(tmp_path):
    """Generated, folder and dataset sources: the first run (which draws and encodes) trains exactly as the next (which reads the cache)."""
    image_folder(tmp_path / "folder", photos(3))
    saved_dataset(tmp_path / "dataset", photos(4, seed=1), [0, 1, 1, 0])
    runs = [tmp_path / "cold", tmp_path / "warm"]
    for out in runs:
        erase(all_sources_config(tmp_path, out, tmp_path / "cache"), Accelerator(cpu=True))
    (cold_mask, warm_mask), (cold, warm) = [load_file(str(out / "mask.safetensors")) for out in runs], [exported_unet(out) for out in runs]
    assert [n for n in cold_mask if not torch.equal(cold_mask[n], warm_mask[n])] == []
    assert [n for n in cold if not torch.equal(cold[n], warm[n])] == []


def test_a_forget_image_replaced_under_its_name_and_mtime_is_encoded_again_and_trained_on(tmp_path):
    """The latent cache keys on the images' bytes: a file replaced in place (same name, size and mtime) gives new latents for
    that image alone, and the run's mask is the one a fresh cache gives."""
    folder = image_folder(tmp_path / "folder", photos(3))
    cfg = tiny_config(tmp_path / "before", tmp_path / "cache")
    cfg.data.forget = [ImageGroup(prompt=FORGET, folder=str(folder))]
    pipe, group = tiny_pipeline(), cfg.data.forget[0]
    model = model_identity(pipe, "tiny")
    before = group_latents(pipe, model, group, cfg.data, 32)
    erase(cfg, Accelerator(cpu=True), ("mask",))

    stat = (folder / "01.png").stat()
    photos(1, seed=7)[0].save(folder / "01.png")
    os.utime(folder / "01.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (folder / "01.png").stat().st_size == stat.st_size  # random pixels do not compress: the same size
    after = group_latents(pipe, model, group, cfg.data, 32)
    assert torch.equal(after[[0, 2]], before[[0, 2]]) and not torch.equal(after[1], before[1])

    for name, cache in (("after", tmp_path / "cache"), ("fresh", tmp_path / "fresh")):
        cfg.output_dir, cfg.data.cache_dir = str(tmp_path / name), str(cache)
        erase(cfg, Accelerator(cpu=True), ("mask",))
    before_mask, after_mask, fresh_mask = (load_file(str(tmp_path / name / "mask.safetensors")) for name in ("before", "after", "fresh"))
    assert any(not torch.equal(before_mask[n], after_mask[n]) for n in before_mask)
    assert all(torch.equal(fresh_mask[n], after_mask[n]) for n in fresh_mask)


def test_a_model_re_exported_to_the_same_folder_draws_new_images(tmp_path):
    """Generated images are keyed on the model's files, not its path: another model saved over the folder gets its own images."""
    group, data = ImageGroup(prompt=FORGET, generate=2), DataConfig(generation_steps=2, cache_dir=str(tmp_path / "cache"))
    drawn = []
    for seed in (0, 1):
        tiny_pipeline(seed=seed).save_pretrained(tmp_path / "model")
        pipe = load_pipeline(str(tmp_path / "model"))
        drawn.append(generated_images(pipe, model_identity(pipe, str(tmp_path / "model")), group, data, 32))
    (old, new) = drawn
    assert old[0].parent != new[0].parent and all(p.is_file() for p in old)
    assert all(a.read_bytes() != b.read_bytes() for a, b in zip(old, new))


def test_a_hub_model_is_keyed_on_the_commit_it_was_loaded_from(tmp_path, monkeypatch):
    """A Hub ID loads (offline, from the Hub cache) through the real path, and its identity is the snapshot's commit, not its name."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    tiny_pipeline().save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pipe = load_pipeline("org/tiny")
    assert model_identity(pipe, "org/tiny") == {"hub": "org/tiny", "revision": commit}
