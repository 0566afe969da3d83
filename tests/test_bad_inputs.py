"""Every bad input of issues 15 and 23 ends in one line that names the culprit, before any model loads, and an earlier
run in the output folder survives it even with --overwrite; every command refuses an out-of-range number or an
abbreviated flag in one line, before any work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from skimage import data as photos

from conftest import FORGET, tiny_config
from salun_sd.errors import UserError
from salun_sd.families import erase as sd_erase
from salun_sd.families.config import EraseConfig, ImageGroup
from salun_sd.families.tiny import tiny_pipeline


def image_folder(root: Path, bad_name: str, bad_bytes: bytes) -> str:
    folder = root / "images"
    folder.mkdir()
    Image.fromarray(photos.coffee()).save(folder / "good.png")
    (folder / bad_name).write_bytes(bad_bytes)
    return str(folder)


def truncated_png(root: Path) -> bytes:
    Image.fromarray(photos.chelsea()).save(root / "whole.png")
    whole = (root / "whole.png").read_bytes()
    return whole[: len(whole) // 2]


def truncated_mask(root: Path) -> str:
    from salun_sd.core.saliency import save_mask

    save_mask({n: p.detach() > 0 for n, p in tiny_pipeline().unet.named_parameters()}, root / "whole.safetensors", {})
    whole = (root / "whole.safetensors").read_bytes()
    (root / "mask.safetensors").write_bytes(whole[: len(whole) // 2])
    return str(root / "mask.safetensors")


def foreign_pipeline(root: Path) -> str:
    """A pipeline folder of a family salun-sd does not erase (an audio model)."""
    folder = root / "audioldm2"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDM2Pipeline", "unet": ["diffusers", "AudioLDM2UNet2DConditionModel"]}))
    return str(folder)


def garbage_model_file(root: Path) -> str:
    (root / "model.safetensors").write_bytes(b"not a checkpoint " * 64)
    return str(root / "model.safetensors")


def pipeline_folder(root: Path, damage) -> str:
    """The tiny pipeline saved as a diffusers folder, then damaged: damage(folder)."""
    folder = root / "sd-tiny"
    tiny_pipeline().save_pretrained(folder)
    damage(folder)
    return str(folder)


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def huge_image_folder(root: Path) -> str:
    """A 15000x15000 PNG (225 MP: PIL's own guard would raise DecompressionBombError), 27 KB as a 1-bit image."""
    folder = root / "huge"
    folder.mkdir()
    Image.new("1", (15000, 15000)).save(folder / "huge.png")
    return str(folder)


def set_field(section: str, key: str, value):
    return lambda cfg, root: setattr(getattr(cfg, section), key, value)


# (case, change to a working tiny config, what the message must say)
CASES = [
    ("nan_learning_rate", set_field("unlearn", "learning_rate", float("nan")), r"^unlearn\.learning_rate must be a positive number, got nan$"),
    ("zero_learning_rate", set_field("unlearn", "learning_rate", 0.0), r"^unlearn\.learning_rate must be a positive number, got 0\.0$"),
    ("negative_learning_rate", set_field("unlearn", "learning_rate", -1e-5), r"^unlearn\.learning_rate must be a positive number"),
    ("mask_fraction_zero", set_field("mask", "fraction", 0.0), r"^mask\.fraction must be in \(0, 1\], got 0\.0$"),
    ("mask_fraction_above_one", set_field("mask", "fraction", 1.5), r"^mask\.fraction must be in \(0, 1\], got 1\.5$"),
    ("extra_fraction_above_one", set_field("mask", "extra_fractions", [0.3, 2.0]), r"^mask\.extra_fractions must be in \(0, 1\], got 2\.0$"),
    ("unknown_tracker", set_field("unlearn", "report_to", "mlflow"), r"^unlearn\.report_to must be one of tensorboard, wandb \(or empty\), got 'mlflow'$"),
    ("negative_max_steps", set_field("unlearn", "max_steps", -3), r"^unlearn\.max_steps must be a non-negative number, got -3$"),
    ("zero_epochs", set_field("unlearn", "epochs", 0.0), r"^unlearn\.epochs must be a positive number, got 0\.0$"),
    ("negative_checkpointing_steps", set_field("unlearn", "checkpointing_steps", -1), r"^unlearn\.checkpointing_steps must be a non-negative number, got -1$"),
    ("zero_train_batch_size", set_field("unlearn", "batch_size", 0), r"^unlearn\.batch_size must be at least 1, got 0$"),
    ("beta_of_one", set_field("unlearn", "adam_beta2", 1.0), r"^unlearn\.adam_beta2 must be in \[0, 1\), got 1\.0$"),
    ("zero_mask_batch_size", set_field("mask", "batch_size", 0), r"^mask\.batch_size must be at least 1, got 0$"),
    ("zero_generation_batch_size", set_field("data", "generation_batch_size", 0), r"^data\.generation_batch_size must be at least 1, got 0$"),
    ("zero_generation_steps", set_field("data", "generation_steps", 0), r"^data\.generation_steps must be at least 1, got 0$"),
    ("negative_generation_guidance", set_field("data", "generation_guidance", -7.5), r"^data\.generation_guidance must be a non-negative number, got -7\.5$"),
    ("negative_resolution", set_field("data", "resolution", -8), r"^data\.resolution must be a non-negative number, got -8$"),
    ("negative_image_count", lambda cfg, root: setattr(cfg.data.remain[0], "generate", -8), r"^data\.remain\[0\]\.generate must be a non-negative number, got -8$"),
    ("negative_group_limit", lambda cfg, root: setattr(cfg.data.forget[0], "limit", -1), r"^data\.forget\[0\]\.limit must be a non-negative number, got -1$"),
    ("resolution_not_a_multiple", set_field("data", "resolution", 20), r"^data\.resolution 20 is not a multiple of 8, which SD-1\.x/2\.x images need \(e\.g\. 16\)$"),
    ("misaligned_is_the_forget_prompt", set_field("data", "misaligned_prompts", [FORGET]),
     rf"^concept 'nudity': its misaligned prompt c' '{FORGET}' is the concept itself; c' must be another concept$"),
    ("image_too_large", lambda cfg, root: cfg.data.forget.append(ImageGroup(prompt=FORGET, folder=huge_image_folder(root))),
     r"^image .*huge\.png is 15000x15000, more than 200,000,000 pixels \(an erase's data\.max_image_pixels; 0: no limit\)"),
    ("image_over_the_set_limit", lambda cfg, root: (cfg.data.remain.append(ImageGroup(prompt="x", folder=image_folder(root, "notes.txt", b""))), setattr(cfg.data, "max_image_pixels", 1000)),
     r"^image .*good\.png is 600x400, more than 1,000 pixels"),
    ("garbage_single_file_model", lambda cfg, root: setattr(cfg, "model", garbage_model_file(root)),
     r"^.*model\.safetensors is not a complete safetensors file \(SafetensorError: .*header.*\); download or export it again$"),
    ("invalid_model_index", lambda cfg, root: setattr(cfg, "model", pipeline_folder(root, lambda f: (f / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",'))),
     r"^.*sd-tiny/model_index\.json is not valid JSON \(JSONDecodeError: .*\); download or export the model again$"),
    ("truncated_model_component", lambda cfg, root: setattr(cfg, "model", pipeline_folder(root, lambda f: cut_in_half(f / "unet" / "diffusion_pytorch_model.safetensors"))),
     r"^.*sd-tiny/unet/diffusion_pytorch_model\.safetensors is not a complete safetensors file \(SafetensorError: .*\); download or export it again$"),
    ("image_not_an_image", lambda cfg, root: cfg.data.remain.append(ImageGroup(prompt="x", folder=image_folder(root, "notes.png", b"not a picture"))),
     r"^cannot read image .*notes\.png: cannot identify image file"),
    ("truncated_image", lambda cfg, root: cfg.data.forget.append(ImageGroup(prompt=FORGET, folder=image_folder(root, "cut.png", truncated_png(root)))),
     r"^cannot read image .*cut\.png: image file is truncated"),
    ("truncated_mask_file", lambda cfg, root: setattr(cfg.mask, "path", truncated_mask(root)),
     r"^mask file .*mask\.safetensors is not a complete safetensors file \(.*\); make it again with `salun-sd mask`$"),
    ("unsupported_family", lambda cfg, root: setattr(cfg, "model", foreign_pipeline(root)),
     r"^.*audioldm2 holds AudioLDM2Pipeline, a family salun-sd does not erase; it erases StableDiffusionPipeline"),
    ("missing_local_model", lambda cfg, root: setattr(cfg, "model", str(root / "models" / "sd-v1-4")),
     r"^model folder .*sd-v1-4 does not exist"),
]


@pytest.fixture
def earlier_run(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """An output folder holding a finished run's files, and their bytes."""
    out = tmp_path / "out"
    (out / "pipeline").mkdir(parents=True)
    files = {"manifest.json": b'{"earlier": true}', "mask.safetensors": b"earlier mask", "pipeline/model_index.json": b"{}"}
    for name, content in files.items():
        (out / name).write_bytes(content)
    return out, files


@pytest.mark.parametrize(("change", "message"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_naming_the_culprit_and_leaves_the_earlier_run(tmp_path, earlier_run, data_cache, monkeypatch, change, message):
    out, files = earlier_run
    cfg: EraseConfig = tiny_config(out, data_cache)
    cfg.overwrite = True
    change(cfg, tmp_path)
    monkeypatch.setattr(sd_erase, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded before the bad input was found"))
    with pytest.raises(UserError) as err:
        sd_erase.erase(cfg, Accelerator(cpu=True))
    text = str(err.value)
    assert "\n" not in text and re.search(message, text), text
    assert {name: (out / name).read_bytes() for name in files} == files


def foreign_mask(root: Path) -> str:
    """A complete mask file made for another network."""
    from salun_sd.core.saliency import save_mask

    save_mask({"encoder.layers.0.weight": torch.ones(4, 4, dtype=torch.bool)}, root / "other.safetensors", {})
    return str(root / "other.safetensors")


def garbage_model(root: Path) -> str:
    (root / "model.safetensors").write_bytes(b"\x00\x01 not a checkpoint" * 100)
    return str(root / "model.safetensors")


# Bad inputs that fail, or failed before they were checked up front, after the run claimed its folder: whatever they
# raise, the earlier run is as it was, with --overwrite (issue 23).
LATE_CASES = [
    ("mask_of_another_model", lambda cfg, root: setattr(cfg.mask, "path", foreign_mask(root))),
    ("empty_forget_prompt", lambda cfg, root: setattr(cfg.data, "forget", [ImageGroup(prompt="", generate=8)])),
    ("garbage_model_file", lambda cfg, root: setattr(cfg, "model", garbage_model(root))),
    ("generation_batch_size_zero", set_field("data", "generation_batch_size", 0)),
    ("misaligned_prompt_is_the_forget_prompt", set_field("data", "misaligned_prompts", [FORGET])),
]


@pytest.mark.parametrize("change", [case[1] for case in LATE_CASES], ids=[case[0] for case in LATE_CASES])
def test_a_bad_input_found_late_leaves_the_earlier_run_and_nothing_else(tmp_path, earlier_run, data_cache, change):
    out, files = earlier_run
    cfg: EraseConfig = tiny_config(out, data_cache)
    cfg.overwrite = True
    change(cfg, tmp_path)
    with pytest.raises(Exception):
        sd_erase.erase(cfg, Accelerator(cpu=True))
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


@pytest.mark.parametrize("rate", ["nan", "0", "-1e-4"])
def test_ddpm_base_training_refuses_a_bad_learning_rate_before_touching_data_or_folders(tmp_path, capsys, rate):
    from salun_sd.cli import main

    with pytest.raises(SystemExit) as exit_:
        config = Path(__file__).resolve().parents[1] / "configs" / "ddpm_digits.yaml"
        main(["ddpm", "train", str(config), "--work_dir", str(tmp_path / "work"), f"--train.learning_rate={rate}"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err
    assert err.startswith("salun-sd ddpm: error: train.learning_rate must be a positive number"), err
    assert not (tmp_path / "work").exists()


# (argv of a command, what its one-line refusal must say): each fails at the flags, before any work
FLAG_CASES = [
    (["run", "--unlearn.max_steps", "-3"], r"unlearn\.max_steps must be a non-negative number, got -3"),
    (["run", "--unlearn.epochs", "0"], r"unlearn\.epochs must be a positive number, got 0\.0"),
    (["erase", "--unlearn.checkpointing_steps", "-1"], r"unlearn\.checkpointing_steps must be a non-negative number, got -1"),
    (["mask", "--data.generation_batch_size", "0"], r"data\.generation_batch_size must be at least 1, got 0"),
    (["run", "--unlearn.max_step", "3"], r"unrecognized arguments: --unlearn\.max_step"),  # not taken as --unlearn.max_steps
    (["run", "--train.max_step", "3"], r"unrecognized arguments: --train\.max_step"),  # nor as the renamed --train.max_steps
    (["generate", "--limit", "-1"], r"limit must be a non-negative number, got -1"),
    (["generate", "--height", "0"], r"height must be at least 1, got 0"),
    (["generate", "--height", "-8"], r"height must be at least 1, got -8"),
    (["generate", "--width", "0"], r"width must be at least 1, got 0"),
    (["generate", "--images_per_prompt", "0"], r"images_per_prompt must be at least 1, got 0"),
    (["generate", "--guidance", "-1"], r"guidance must be a non-negative number, got -1\.0"),
    (["generate", "--lim", "3"], r"unrecognized arguments: --lim"),
    (["evaluate", "--batch_size", "0"], r"batch_size must be at least 1, got 0"),
    (["evaluate", "--grid_pairs", "-1"], r"grid_pairs must be a non-negative number, got -1"),
    (["attack", "--limit", "-1"], r"limit must be a non-negative number, got -1"),
    (["attack", "--height", "-8"], r"height must be a non-negative number, got -8"),
    (["attack", "--timesteps", "0"], r"timesteps must be at least 1, got 0"),
    (["attack", "--learning_rate", "inf"], r"learning_rate must be a positive number, got inf"),
    (["relearn", "--steps", "0"], r"steps must be at least 1, got 0"),
    (["relearn", "--eval_images", "0"], r"eval_images must be at least 1, got 0"),
    (["compare", "--steps", "0"], r"steps must be at least 1, got 0"),
    (["compare", "--seeds", "0", "-1"], r"seeds must be a non-negative number, got -1"),
    (["ddpm", "erase", "--unlearn.max_steps", "-3"], r"unlearn\.max_steps must be a non-negative number, got -3"),
    (["ddpm", "sample", "--sample.per_class", "0"], r"sample\.per_class must be at least 1, got 0"),
    (["ddpm", "train", "--train.checkpointing_steps", "-1"], r"train\.checkpointing_steps must be a non-negative number, got -1"),
    (["classify", "forget", "--mask.batch_size", "0"], r"mask\.batch_size must be at least 1, got 0"),
    (["classify", "train", "--train.epochs", "-1"], r"train\.epochs must be a non-negative number, got -1"),
]


@pytest.mark.parametrize(("argv", "message"), FLAG_CASES, ids=[" ".join(argv) for argv, _ in FLAG_CASES])
def test_every_command_refuses_a_bad_flag_in_one_line_before_any_work(tmp_path, monkeypatch, capsys, argv, message):
    from salun_sd.cli import main

    monkeypatch.chdir(tmp_path)  # the commands' default output folders are relative: nothing may appear here
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and re.search(message, err), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["generate", "attack"])
def test_a_garbage_model_file_is_one_line_for_generate_and_attack(tmp_path, capsys, command):
    from salun_sd.cli import main

    (tmp_path / "prompts.txt").write_text("a photo of a circle\n")
    extra = ["--base", "tiny", "--judge", "toyworld", "--concept", "circle"] if command == "attack" else []
    with pytest.raises(SystemExit) as exit_:
        main([command, "--model", garbage_model_file(tmp_path), "--prompts", str(tmp_path / "prompts.txt"), "--output_dir", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert re.search(r"model\.safetensors is not a complete safetensors file \(SafetensorError: .*\); download or export it again$", err.strip()), err
