"""Every bad input of issue 15 ends in one line that names the culprit, before any model loads, and an earlier
run in the output folder survives it even with --overwrite."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
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
