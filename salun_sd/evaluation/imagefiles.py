"""Folders of images and the metadata that traces each image back to its prompt and seed."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from salun_sd.errors import UserError
from salun_sd.run.files import write_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
# 200 MP: the largest phone photos (16320x12240) pass, 0.6 GB once decoded as RGB; a 15000x15000 image or a decompression
# bomb is refused before its pixels are decoded (PIL's own guard, which raises from 179 MP, is replaced by this one).
MAX_IMAGE_PIXELS = 200_000_000

T = TypeVar("T")


def list_images(folder: str | Path, what: str = "image folder", recursive: bool = False) -> list[Path]:
    """The image files in `folder` (and its subfolders when `recursive`), sorted by path (names start with the case number)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} {folder} does not exist or is not a folder.")
    paths = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"{what} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return paths


def batched(items: Sequence[T], batch_size: int, desc: str) -> Iterator[Sequence[T]]:
    """Consecutive batches, with a progress bar: a metric over thousands of images takes minutes."""
    with tqdm(total=len(items), desc=desc, unit="img", leave=False) as bar:
        for start in range(0, len(items), batch_size):
            yield items[start : start + batch_size]
            bar.update(min(batch_size, len(items) - start))


@contextmanager
def opened(path: Path) -> Iterator[Image.Image]:
    """The image file, its header read; a file PIL cannot read is named in one line. PIL's process-wide pixel guard is
    off while the header is read: it would raise at open, before the size is known (load_rgb applies its own limit)."""
    guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as image:
            Image.MAX_IMAGE_PIXELS = guard
            yield image
    except OSError as err:
        raise UserError(f"cannot read image {path}: {err}") from err
    finally:
        Image.MAX_IMAGE_PIXELS = guard


def load_rgb(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image as RGB (to_rgb), naming the file if it cannot be read or has more than `max_pixels` pixels (0: no limit)."""
    with opened(path) as image:
        if max_pixels and image.width * image.height > max_pixels:
            raise UserError(f"image {path} is {image.width}x{image.height}, more than {max_pixels:,} pixels (an erase's data.max_image_pixels; 0: no limit): shrink it or raise the limit")
        return to_rgb(image, str(path))


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's modes of 16-bit grayscale (PNG, TIFF)
PIL_TO_RGB = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "HSV")  # PIL's convert("RGB") gives their colours (CMYK naively, without a colour profile)


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """The image as 8-bit RGB where that is faithful: 16-bit grayscale scaled to 8 bits (PIL's own convert clips it, a
    mostly white image), transparency only where every pixel is opaque. Anything else is refused, naming `name`."""
    if image.mode in SIXTEEN_BIT:
        values = np.asarray(image).astype(np.int64)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA") if image.mode != "La" else image.convert("LA").convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            raise UserError(f"image {name} has transparent pixels (mode {image.mode}), which RGB training data cannot show: flatten it onto a background first")
        return rgba.convert("RGB")
    if image.mode not in PIL_TO_RGB:
        raise UserError(f"image {name} has pixels of mode {image.mode}, which salun-sd cannot convert to 8-bit RGB faithfully: save it as 8-bit RGB")
    return image.convert("RGB")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    with opened(path) as image:
        return image.size


def require_one_size(paths: Iterable[Path], what: str) -> tuple[int, int]:
    """Fail with the sizes found when a set mixes image sizes (it would mix generation settings or runs)."""
    by_size: dict[tuple[int, int], list[Path]] = {}
    for path in paths:
        by_size.setdefault(image_size(path), []).append(path)
    if len(by_size) > 1:
        found = "; ".join(f"{w}x{h}: {len(files)} file(s), e.g. {files[0].name}" for (w, h), files in sorted(by_size.items()))
        raise UserError(f"{what} mixes image sizes ({found}). Use images generated at one size (fixed --height/--width).")
    return next(iter(by_size))


def read_metadata(folder: str | Path) -> dict[str, dict]:
    """File name -> its generation record, from the folder's metadata.jsonl ({} when there is none)."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        return {}
    entries = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entries[entry["file"]] = entry
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}, line {number}: not a metadata record written by `salun-sd generate`.") from None
    return entries


def write_metadata(folder: str | Path, entries: Iterable[dict]) -> Path:
    """Write metadata.jsonl in one step, so a killed run never leaves half a file."""
    return write_text(Path(folder) / METADATA_FILE, "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries))
