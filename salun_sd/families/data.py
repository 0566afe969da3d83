"""Forget and remain sets for Stable Diffusion: images from three sources, encoded once to latents.

A set is a list of groups, each one prompt with its images, which come from exactly one source:
- `generate: N` — N images drawn by the base pipeline from the prompt (fixed seeds, salun_sd.generation; cached on
  disk under a key that names everything the images depend on, the model by what it is: image_key);
- `folder: DIR` — the images in a folder;
- `hf_dataset: NAME` with `hf_label` — one class of a Hugging Face dataset (e.g. frgfm/imagenette), from the
  Hub or from a folder written by `Dataset.save_to_disk` (the way to use one offline).
Latents are cached next to the images, so later runs skip the VAE as well: keyed on the images' contents (SHA-256 of
each file's bytes, or of a dataset image's pixels), not their names, and read from the cache file on the run that
writes it too, so a run's weights do not depend on whether the cache was cold.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from salun_sd.core.denoiser import ConceptData
from salun_sd.errors import UserError
from salun_sd.evaluation.imagefiles import list_images, load_rgb, to_rgb
from salun_sd.families.config import ConceptConfig, DataConfig, ImageGroup
from salun_sd.families.loading import family_of
from salun_sd.generation import ImageRequest, draw_images
from salun_sd.run.files import atomic, save_image, write_json


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("SALUN_SD_CACHE") or Path.home() / ".cache" / "salun_sd")


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def image_key(pipe: DiffusionPipeline, model: dict[str, object], group: ImageGroup, cfg: DataConfig, resolution: int) -> dict[str, object]:
    """Everything a generated group's images depend on (their noise is keyed CPU noise, salun_sd.generation): what the
    model is (loading.model_identity: its files, or its Hub commit; not its name), prompt, sampler and its settings,
    size, seed, the network's dtype and the device type and name (the same noise gives slightly different images on
    another kind of device). Not the concept: concepts that share a prompt share its images."""
    network = family_of(pipe).network_of(pipe)
    return {
        "model": model,
        "prompt": group.prompt,
        "steps": cfg.generation_steps,
        "guidance": cfg.generation_guidance,
        "resolution": resolution,
        "seed": cfg.seed,
        "noise": "salun_sd.generation: draw 0 of a CPU generator seeded seed + i",
        # the config's "_" entries are diffusers' bookkeeping (e.g. a set of defaulted names, in no fixed order)
        "scheduler": {"class": type(pipe.scheduler).__name__, **{k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}},
        "dtype": str(network.dtype),
        "device": device_name(network.device),
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
    }


def device_name(device: torch.device) -> str:
    """The kind of device (a GPU by its model name): what a computation's float rounding depends on."""
    return f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def generated_images(
    pipe: DiffusionPipeline, model: dict[str, object], group: ImageGroup, cfg: DataConfig, resolution: int, rank: int = 0, processes: int = 1
) -> list[Path]:
    """Draw `group.generate` images (image i from seed cfg.seed + i); files already on disk are reused.

    An image does not depend on who drew it or with which others (float rounding of batched kernels apart), and
    the batches are fixed too: batches of cfg.generation_batch_size, process r drawing batches r, r + processes, ...
    So the files of several processes are those of one, bit for bit. The caller waits for the other processes.
    """
    key = image_key(pipe, model, group, cfg, resolution)
    folder = cache_root(cfg) / "images" / _key(key)
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_json(folder / "key.json", key)
    paths = [folder / f"{i:05d}.png" for i in range(group.generate)]
    bs = cfg.generation_batch_size
    mine = [range(start, min(start + bs, len(paths))) for start in range(rank * bs, len(paths), processes * bs)]
    todo = [chunk for chunk in ([i for i in batch if not paths[i].is_file()] for batch in mine) if chunk]
    share = f" (process {rank} of {processes})" if processes > 1 else ""
    for chunk in tqdm(todo, desc=f"generating {group.prompt!r}{share}", disable=not todo):
        requests = [ImageRequest(group.prompt, cfg.seed + i, resolution, resolution, cfg.generation_guidance) for i in chunk]
        for i, image in zip(chunk, draw_images(pipe, requests, cfg.generation_steps, batch_size=len(chunk))):
            save_image(image, paths[i])
    return paths


def generate_share(pipe: DiffusionPipeline, model: dict[str, object], groups: list[ImageGroup], cfg: DataConfig, resolution: int, rank: int, processes: int) -> None:
    """This process's share of every generated group's missing images (the others draw theirs meanwhile)."""
    for group in groups:
        if group.source() == "generate":
            generated_images(pipe, model, group, cfg, resolution, rank, processes)


def check_sources(groups: list[ImageGroup], max_pixels: int) -> None:
    """Each group names one source, and every image of a folder group opens and has at most `max_pixels` pixels: a broken
    or huge file stops the run here, named, before any model loads rather than in the middle of encoding."""
    for group in groups:
        if group.source() == "folder":
            for path in list_images(group.folder, "image folder", recursive=True)[: group.limit or None]:
                load_rgb(path, max_pixels)


def hf_images(group: ImageGroup) -> list[Image.Image]:
    """One class of a Hugging Face image dataset, e.g. frgfm/imagenette config 160px, or of one saved with save_to_disk."""
    try:
        import datasets
    except ImportError:
        raise UserError("hf_dataset needs the `datasets` package: pip install 'salun-sd[datasets]'") from None
    saved = Path(group.hf_dataset).expanduser()
    try:
        if (saved / "dataset_dict.json").is_file() or (saved / "state.json").is_file():  # written by save_to_disk
            ds = datasets.load_from_disk(str(saved))
            ds = ds[group.hf_split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(group.hf_dataset, group.hf_config or None, split=group.hf_split)
    except Exception as err:  # the hub raises many kinds of errors when offline
        raise UserError(
            f"could not load dataset {group.hf_dataset!r} ({type(err).__name__}: {err}). Offline, save it with "
            "Dataset.save_to_disk where there is a network and pass that folder, or export the class to a folder and use `folder:`"
        ) from None
    label_column = "label" if "label" in ds.column_names else ds.column_names[-1]
    image_column = "image" if "image" in ds.column_names else ds.column_names[0]
    ds = ds.filter(lambda label: label == group.hf_label, input_columns=label_column)
    if len(ds) == 0:
        raise UserError(f"dataset {group.hf_dataset!r} has no images with {label_column} == {group.hf_label}")
    return [to_rgb(img, f"{i} of dataset {group.hf_dataset!r}") for i, img in enumerate(ds[image_column])]


def to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side and center-crop an RGB image to resolution², scaled to [-1, 1] as the VAE expects."""
    scale = resolution / min(image.size)
    image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


@torch.no_grad()
def encode_latents(pipe: DiffusionPipeline, images: list, resolution: int, seed: int, max_pixels: int, batch_size: int = 8) -> torch.Tensor:
    """VAE latents as each family's training uses them: a posterior sample, minus the VAE's shift (SD3, FLUX), times its scale."""
    vae = pipe.vae
    out = []
    for i in range(0, len(images), batch_size):
        chunk = [load_rgb(p, max_pixels) if isinstance(p, Path) else p for p in images[i : i + batch_size]]
        pixels = torch.stack([to_tensor(img, resolution) for img in chunk]).to(vae.device, vae.dtype)
        gen = torch.Generator("cpu").manual_seed(seed + i)  # the same posterior sample on any device
        shift = vae.config.get("shift_factor") or 0.0  # None in SD-1/2/XL VAE configs
        out.append(((vae.encode(pixels).latent_dist.sample(gen) - shift) * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


def content_digests(images: list[Path | Image.Image]) -> list[str]:
    """SHA-256 of each image file's bytes, or of a decoded image's mode, size and pixels (a dataset's): what the image is,
    whatever its name. Hashing the bytes each run costs about a second for 800 SD images of 500 KB (400 MB at ~500 MB/s on a
    shared 2-core CPU); keying on names and mtimes instead would miss a file replaced with its old mtime."""
    digests = []
    for image in images:
        if isinstance(image, Path):
            with image.open("rb") as f:
                digests.append(hashlib.file_digest(f, "sha256").hexdigest())
        else:
            digests.append(hashlib.sha256(f"{image.mode} {image.size}".encode() + image.tobytes()).hexdigest())
    return digests


def group_latents(pipe: DiffusionPipeline, model: dict[str, object], group: ImageGroup, cfg: DataConfig, resolution: int) -> torch.Tensor:
    """Latents of one group, from the cache when the same images were encoded before."""
    source = group.source()
    if source == "generate":
        images: list = generated_images(pipe, model, group, cfg, resolution)
    elif source == "folder":
        images = list_images(group.folder, "image folder", recursive=True)
    else:
        images = hf_images(group)
    if group.limit:
        images = images[: group.limit]
    vae = pipe.vae
    # Keyed on the images' contents, in order (image i's posterior sample is drawn from its position), not on the group: groups
    # of the same images share the file, and an image replaced under the same name is encoded again.
    path = cache_root(cfg) / "latents" / f"{_key(model, content_digests(images), resolution, cfg.seed, str(vae.dtype), device_name(vae.device))}.safetensors"
    if not path.is_file():
        with atomic(path) as tmp:
            save_file({"latents": encode_latents(pipe, images, resolution, cfg.seed, cfg.max_image_pixels).contiguous()}, str(tmp))
    # Read back also when just encoded: the VAE returns channels-last latents on the CPU, and the UNet's convolutions
    # round differently on that layout than on the file's, so training on the in-memory tensor made a cold-cache run
    # differ from every later one.
    return load_file(str(path))["latents"]


def concept_data(pipe: DiffusionPipeline, model: dict[str, object], groups: list[ImageGroup], cond_of: dict[str, int], cfg: DataConfig, resolution: int, what: str) -> ConceptData:
    """All groups of one set as latents with the condition id of each group's prompt."""
    if not groups:
        raise UserError(f"the {what} set is empty: give data.{what} at least one group with a prompt and images")
    xs, conds = [], []
    for group in groups:
        if not group.prompt.strip():
            raise UserError(f"every data.{what} group needs a non-empty prompt")
        latents = group_latents(pipe, model, group, cfg, resolution)
        xs.append(latents)
        conds.append(torch.full((len(latents),), cond_of[group.prompt], dtype=torch.long))
    return ConceptData(torch.cat(xs), torch.cat(conds))


def forget_set(pipe: DiffusionPipeline, model: dict[str, object], concepts: list[ConceptConfig], cond_of: dict[str, int], cfg: DataConfig, resolution: int) -> ConceptData:
    """Every concept's forget groups as one D_f, each example tagged with its concept (and its concept's weight
    when one differs from 1). Concepts that share a prompt share its cached images and latents."""
    parts = [concept_data(pipe, model, c.forget, cond_of, cfg, resolution, "forget") for c in concepts]
    concept = torch.cat([torch.full((len(part),), k, dtype=torch.long) for k, part in enumerate(parts)])
    weight = None if all(c.weight == 1 for c in concepts) else torch.cat([torch.full((len(part),), c.weight) for part, c in zip(parts, concepts)])
    return ConceptData(torch.cat([part.x0 for part in parts]), torch.cat([part.cond for part in parts]), concept, weight)
