"""One SD erase end to end on the offline tiny pipeline, and every bad input of issue 2."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from conftest import FORGET, REMAIN, tiny_config
from salun_sd.cli import main
from salun_sd.errors import UserError
from salun_sd.core.saliency import load_mask, mask_summary
from salun_sd.families.config import DataConfig, ImageGroup
from salun_sd.families.data import concept_data
from salun_sd.families.erase import erase
from salun_sd.families.loading import model_identity
from salun_sd.families.tiny import tiny_pipeline
from salun_sd.core.trainer import TrainingDiverged, list_checkpoints


@pytest.fixture(scope="module")
def erased(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("run") / "nudity"
    cfg = tiny_config(out, data_cache, weight_decay=0.1, max_grad_norm=1.0)
    erase(cfg, Accelerator(cpu=True))
    return out, cfg


def test_masked_out_weights_are_bitwise_original_and_masked_in_weights_moved(erased):
    out, _ = erased
    base = dict(tiny_pipeline().unet.named_parameters())
    new = load_file(str(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    mask = load_mask(out / "mask.safetensors", tiny_pipeline().unet)
    kept = sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    assert kept == pytest.approx(0.5, abs=1e-6)
    moved = 0
    for name, m in mask.items():
        assert torch.equal(new[name][~m], base[name].detach()[~m]), name  # weight decay and clipping included
        moved += int((new[name][m] != base[name].detach()[m]).sum())
    assert moved > 0.9 * sum(int(m.sum()) for m in mask.values())


def test_export_loads_with_from_pretrained_in_a_fresh_process_and_generates(erased):
    out, _ = erased
    code = (
        "import sys, torch\nfrom diffusers import StableDiffusionPipeline\n"
        "pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "img = pipe('a photo', num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]\n"
        "print(img.size)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(out / "pipeline")], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("(32, 32)")
    card = (out / "pipeline" / "README.md").read_text()
    assert "base_model: tiny" in card and "nudity" in card and "50.00% of the trained weights" in card
    manifest = json.loads((out / "pipeline" / "salun_manifest.json").read_text())
    assert manifest["config"]["unlearn"]["method"] == "salun" and manifest["packages"]["torch"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_validation_grid_puts_the_base_model_above_the_erased_one(erased):
    out, cfg = erased
    grid = np.asarray(Image.open(out / "validation.png"), dtype=np.int16)
    assert grid.shape == (64, 64, 3)  # rows: base, erased; columns: the forget prompt, the remain prompt; 32 px each
    base = tiny_pipeline()(FORGET, num_inference_steps=3, guidance_scale=7.5, height=32, width=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(grid[:32, :32] - np.asarray(base, dtype=np.int16)).max() <= 1
    assert np.abs(grid[:32, :32] - grid[32:, :32]).max() > 10  # the erase changed what the forget prompt draws


def test_existing_output_is_refused_unless_overwrite(erased, data_cache):
    out, _ = erased
    with pytest.raises(UserError, match="--overwrite"):
        erase(tiny_config(out, data_cache), Accelerator(cpu=True))


def test_unreachable_model_id_says_how_to_pass_a_local_folder(tmp_path, data_cache):
    cfg = tiny_config(tmp_path / "o", data_cache)
    cfg.model = "CompVis/stable-diffusion-v1-4"
    with pytest.raises(UserError, match="local folder|pass it instead"):
        erase(cfg, Accelerator(cpu=True))
    cfg.model = str(tmp_path)  # exists but is no pipeline
    with pytest.raises(UserError, match="not a diffusers Stable Diffusion folder"):
        erase(cfg, Accelerator(cpu=True))


def test_empty_prompt_list_and_empty_folder_are_clear_errors(tmp_path, data_cache):
    cfg = tiny_config(tmp_path / "o1", data_cache)
    cfg.data.forget = []
    with pytest.raises(UserError, match="forget set is empty"):
        erase(cfg, Accelerator(cpu=True))
    (tmp_path / "empty").mkdir()
    cfg = tiny_config(tmp_path / "o2", data_cache)
    cfg.data.remain = [ImageGroup(prompt=REMAIN, folder=str(tmp_path / "empty"))]
    with pytest.raises(UserError, match="holds no images"):
        erase(cfg, Accelerator(cpu=True))
    cfg = tiny_config(tmp_path / "o3", data_cache)
    cfg.data.forget = [ImageGroup(prompt=FORGET)]
    with pytest.raises(UserError, match="exactly one of"):
        erase(cfg, Accelerator(cpu=True))


def test_folder_source_trains_on_real_images(tmp_path, data_cache):
    from skimage import data as photos

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(photos, name)()).save(folder / f"{name}.png")
    cfg = tiny_config(tmp_path / "o", data_cache, max_steps=2)
    cfg.data.forget = [ImageGroup(prompt="a photo", folder=str(folder))]
    erase(cfg, Accelerator(cpu=True))
    assert (tmp_path / "o" / "pipeline" / "model_index.json").is_file()


def test_nan_loss_stops_with_the_step_and_keeps_no_checkpoint_of_the_weights_that_gave_it(tmp_path, data_cache):
    cfg = tiny_config(tmp_path / "o", data_cache, learning_rate=1e30, max_steps=20, checkpointing_steps=1)
    with pytest.raises(TrainingDiverged, match=r"at step (\d+)") as err:
        erase(cfg, Accelerator(cpu=True))
    step = int(err.value.args[0].split("at step ")[1].split(";")[0])
    assert step >= 2  # the first step ran on the original weights
    # The weights after step - 1 gave the NaN: their checkpoint is gone (at 1e30 the first update already overflows, so none is left).
    assert "no checkpoint holds weights from before it" in str(err.value) and list_checkpoints(tmp_path / "o" / "checkpoints") == []
    assert not (tmp_path / "o" / "pipeline").exists()


def test_cli_run_from_yaml_with_flag_overrides(tmp_path, data_cache, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: tiny\ndata:\n  forget:\n    - prompt: {FORGET}\n      generate: 4\n  remain:\n    - prompt: {REMAIN}\n      generate: 4\n"
        f"  generation_steps: 2\n  cache_dir: {data_cache}\nunlearn:\n  batch_size: 2\n"
    )
    main(["run", str(config), "--output_dir", str(tmp_path / "out"), "--unlearn.max_steps", "2", "--mask.fraction", "0.25"])
    summary = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert summary["config"]["unlearn"]["max_steps"] == 2 and summary["config"]["mask"]["fraction"] == 0.25
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(config), "--output_dir", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "--overwrite" in capsys.readouterr().err
    config.write_text("model: tiny\nunlearn:\n  learning_rat: 1\n")
    with pytest.raises(SystemExit):
        main(["mask", str(config)])
    assert "unknown key run.yaml.unlearn.learning_rat" in capsys.readouterr().err


def test_mask_then_erase_in_one_folder_with_extra_fractions_and_the_unet_alone(tmp_path, data_cache):
    """`salun-sd mask` then `salun-sd erase` without mask.path: the erase trains under the mask the first step left."""
    out = tmp_path / "run"
    cfg = tiny_config(out, data_cache, max_steps=2)
    cfg.mask.extra_fractions = [0.25]
    cfg.export_network_only = True
    erase(cfg, Accelerator(cpu=True), steps=("mask",))
    unet = tiny_pipeline().unet
    kept = {f: mask_summary(load_mask(out / name, unet))["total"] for f, name in ((0.5, "mask.safetensors"), (0.25, "mask-0.25.safetensors"))}
    assert kept == pytest.approx({0.5: 0.5, 0.25: 0.25}, abs=1e-6)
    assert not (out / "pipeline").exists()

    erase(cfg, Accelerator(cpu=True), steps=("erase",))
    assert not (out / "pipeline" / "model_index.json").exists()
    erased = UNet2DConditionModel.from_pretrained(out / "pipeline").state_dict()
    base, mask = unet.state_dict(), load_mask(out / "mask.safetensors", unet)
    assert all(torch.equal(erased[n][~m], base[n][~m]) for n, m in mask.items())
    assert any(not torch.equal(erased[n][m], base[n][m]) for n, m in mask.items())


def test_hf_dataset_group_saved_to_disk_gives_the_latents_of_the_same_images_in_a_folder(tmp_path):
    """`hf_dataset: <folder written by save_to_disk>` works offline; the class filter keeps label 1 only."""
    import datasets  # the `datasets` extra, part of the `test` extra
    from skimage import data as photos

    images = {name: Image.fromarray(getattr(photos, name)()).convert("RGB") for name in ("astronaut", "coffee", "chelsea")}
    labels = {"astronaut": 0, "coffee": 1, "chelsea": 1}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": list(images.values()), "label": list(labels.values())}, features=features).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "folder").mkdir()
    for name in ("coffee", "chelsea"):
        images[name].save(tmp_path / "folder" / f"{list(labels).index(name)}_{name}.png")

    pipe, data = tiny_pipeline(), DataConfig(cache_dir=str(tmp_path / "cache"))
    from_disk = concept_data(pipe, model_identity(pipe, "tiny"), [ImageGroup(prompt=FORGET, hf_dataset=str(tmp_path / "saved"), hf_label=1)], {FORGET: 1}, data, 32, "forget")
    from_folder = concept_data(pipe, model_identity(pipe, "tiny"), [ImageGroup(prompt=FORGET, folder=str(tmp_path / "folder"))], {FORGET: 1}, data, 32, "forget")
    assert from_disk.x0.shape == (2, 4, 8, 8)
    assert torch.equal(from_disk.x0, from_folder.x0)
