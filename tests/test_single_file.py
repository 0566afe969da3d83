"""Single-file checkpoints in and out (tiny SD-1.x and SDXL in the original layout, CPU, offline through
single_file.config): EMA or raw UNet on the way in; on the way out a file that from_single_file loads back bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import tiny_config
from ldm_layout import ldm_checkpoint, with_ema
from salun_sd.cli import main
from salun_sd.errors import UserError
from salun_sd.core.saliency import load_mask
from salun_sd.families.config import SingleFileConfig
from salun_sd.families.erase import erase
from salun_sd.families.export import export_single_file
from salun_sd.families.loading import load_pipeline
from salun_sd.families.tiny import tiny_pipeline
from tiny_families import tiny_sdxl_pipeline

EMA_SHIFT = 0.5  # the EMA copy is the raw UNet + 0.5, so a test can tell which one loaded


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, StableDiffusionPipeline]:
    """sd-v1-4-full-ema.ckpt in miniature (raw + EMA UNet, VAE, CLIP) and a diffusers folder of the same configs."""
    root = tmp_path_factory.mktemp("single")
    pipe = tiny_pipeline()
    save_file(with_ema(ldm_checkpoint(pipe), EMA_SHIFT), str(root / "tiny-full-ema.safetensors"))
    tiny_pipeline(seed=1).save_pretrained(root / "configs")  # other weights: only its configs and tokenizer may be read
    return root / "tiny-full-ema.safetensors", root / "configs", pipe


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in module.state_dict().items()}


@pytest.mark.parametrize("ema", [False, True])
def test_a_single_file_loads_offline_with_the_raw_or_the_ema_unet(files, ema):
    path, configs, base = files
    pipe = load_pipeline(str(path), single_file=SingleFileConfig(config=str(configs), ema=ema))
    assert isinstance(pipe, StableDiffusionPipeline)
    shift = EMA_SHIFT if ema else 0.0
    assert all(torch.equal(v + shift, weights(pipe.unet)[k]) for k, v in weights(base.unet).items())
    for component in ("vae", "text_encoder"):
        assert all(torch.equal(v, weights(getattr(pipe, component))[k]) for k, v in weights(getattr(base, component)).items())


def test_without_a_config_offline_the_error_says_what_to_set(files):
    with pytest.raises(UserError) as err:
        load_pipeline(str(files[0]))
    assert "single_file.config" in str(err.value) and "\n" not in str(err.value)


def test_the_single_file_export_loads_back_bit_for_bit_and_drops_the_ema_copy(files, tmp_path, data_cache):
    path, configs, base = files
    cfg = tiny_config(tmp_path / "run", data_cache)
    cfg.model, cfg.single_file = str(path), SingleFileConfig(config=str(configs), export=True)
    AcceleratorState._reset_state(True)
    out = erase(cfg, Accelerator(cpu=True))
    erased = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    reloaded = StableDiffusionPipeline.from_single_file(str(out / "model.safetensors"), config=str(configs), safety_checker=None, requires_safety_checker=False)
    for component in ("unet", "vae", "text_encoder"):
        new, written = weights(getattr(erased, component)), weights(getattr(reloaded, component))
        assert new.keys() == written.keys() and all(torch.equal(new[k], written[k]) for k in new), component
    mask = load_mask(out / "mask.safetensors", base.unet)
    raw, written = weights(base.unet), weights(reloaded.unet)
    assert all(torch.equal(written[k][~m], raw[k][~m]) for k, m in mask.items())  # frozen weights: the file's raw UNet
    assert any(not torch.equal(written[k], raw[k]) for k in mask)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("model_ema.") for k in f.keys()) and "salun_sd" in f.metadata()


def test_single_file_export_needs_a_single_file_base(tmp_path, data_cache):
    cfg = tiny_config(tmp_path / "run", data_cache)
    cfg.single_file.export = True
    with pytest.raises(UserError, match="single_file.export"):
        erase(cfg, Accelerator(cpu=True))
    assert not (tmp_path / "run").exists()  # refused before the run folder was claimed


def test_an_sdxl_single_file_loads_as_sdxl_and_its_export_loads_back_bit_for_bit(tmp_path):
    base = tiny_sdxl_pipeline()
    save_file(ldm_checkpoint(base), str(tmp_path / "tiny-xl.safetensors"))  # conditioner.embedders.{0,1}: CLIP-L and OpenCLIP layouts
    tiny_sdxl_pipeline(seed=1).save_pretrained(tmp_path / "configs")
    settings = SingleFileConfig(config=str(tmp_path / "configs"))
    pipe = load_pipeline(str(tmp_path / "tiny-xl.safetensors"), single_file=settings)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    components = ("unet", "vae", "text_encoder", "text_encoder_2")
    for component in components:
        assert all(torch.equal(v, weights(getattr(pipe, component))[k]) for k, v in weights(getattr(base, component)).items()), component
    with torch.no_grad():  # stands in for an erase: every UNet weight changed
        for p in pipe.unet.parameters():
            p.add_(0.25)
    export_single_file(tmp_path / "tiny-xl.safetensors", pipe.unet, tmp_path / "erased.safetensors", {})
    reloaded = load_pipeline(str(tmp_path / "erased.safetensors"), single_file=settings)
    for component in components:
        new, written = weights(getattr(pipe, component)), weights(getattr(reloaded, component))
        assert all(torch.equal(new[k], written[k]) for k in new), component


def test_generate_takes_a_single_file_as_run_does(files, tmp_path):
    """`generate --model x.safetensors --single_file.config DIR`: the file's raw UNet draws the images `--model tiny` (the same weights) draws."""
    path, configs, _ = files
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a church\n")
    common = ["--prompts", str(prompts), "--steps", "2", "--images_per_prompt", "2"]
    main(["generate", "--model", str(path), "--single_file.config", str(configs), "--output_dir", str(tmp_path / "file"), *common])
    main(["generate", "--model", "tiny", "--output_dir", str(tmp_path / "tiny"), *common])
    names = sorted(p.name for p in (tmp_path / "tiny").glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "file").glob("*.png")) and len(names) == 2
    for name in names:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "file" / name)), np.asarray(Image.open(tmp_path / "tiny" / name)))
