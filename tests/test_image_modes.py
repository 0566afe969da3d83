"""Images of modes other than 8-bit RGB: converted where that is faithful, else refused in one line naming the file (issue 23)."""

import numpy as np
import pytest
import torch
from PIL import Image

from salun_sd.errors import UserError
from salun_sd.evaluation.imagefiles import load_rgb
from salun_sd.families.config import DataConfig, ImageGroup
from salun_sd.families.data import group_latents
from salun_sd.families.loading import model_identity
from salun_sd.families.tiny import tiny_pipeline

GRADIENT = (np.arange(48 * 40).reshape(48, 40) * 34).astype(np.uint16)  # 0 .. 65246: the whole 16-bit range


def test_16_bit_grayscale_is_scaled_to_8_bits_and_encodes_as_its_8_bit_copy(tmp_path):
    """PIL's convert("RGB") clips I;16 at 255 (a nearly white image); the toolkit scales it, so a folder of 16-bit
    PNGs gives the latents of the same pictures saved at 8 bits."""
    (tmp_path / "16").mkdir(), (tmp_path / "8").mkdir()
    Image.fromarray(GRADIENT).save(tmp_path / "16" / "a.png")
    eight = ((GRADIENT.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "8" / "a.png")
    assert Image.open(tmp_path / "16" / "a.png").mode == "I;16"
    rgb = np.asarray(load_rgb(tmp_path / "16" / "a.png"))
    assert rgb.shape == (48, 40, 3) and np.array_equal(rgb[..., 0], eight) and np.array_equal(rgb[..., 2], eight)
    assert rgb.min() == 0 and rgb.max() == 254  # round(65246 · 255 / 65535)

    pipe, data = tiny_pipeline(), DataConfig(cache_dir=str(tmp_path / "cache"))
    latents = [group_latents(pipe, model_identity(pipe, "tiny"), ImageGroup(prompt="a photo", folder=str(tmp_path / bits)), data, 32) for bits in ("16", "8")]
    assert torch.equal(*latents)


def test_transparent_pixels_are_refused_naming_the_file_and_an_opaque_alpha_channel_is_dropped(tmp_path):
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(0, (0, 0, 4, 8))  # the left half is colour 0, the transparent one
    palette.save(tmp_path / "palette.png", transparency=0)
    with pytest.raises(UserError, match=r"palette\.png has transparent pixels \(mode P\)"):
        load_rgb(tmp_path / "palette.png")
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    rgba.save(tmp_path / "opaque.png")
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "opaque.png")), np.full((8, 8, 3), (10, 20, 30), np.uint8))
    rgba.putpixel((3, 3), (10, 20, 30, 128))
    rgba.save(tmp_path / "half.png")
    with pytest.raises(UserError, match=r"half\.png has transparent pixels \(mode RGBA\)"):
        load_rgb(tmp_path / "half.png")


def test_cmyk_converts_through_pil_and_pixels_without_a_fixed_range_are_refused(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    red = np.asarray(load_rgb(tmp_path / "cmyk.jpg")).astype(int)
    assert np.abs(red - (255, 0, 0)).max() <= 3  # JPEG's rounding
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "float.tiff")
    with pytest.raises(UserError, match=r"float\.tiff has pixels of mode F"):
        load_rgb(tmp_path / "float.tiff")
