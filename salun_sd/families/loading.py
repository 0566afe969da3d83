"""Loading a base pipeline (a Hub model ID, a local folder, a single-file checkpoint, or the offline tiny
pipeline) and knowing its family.

The family comes from the model itself: a folder's model_index.json `_class_name`, or for a single file the
checkpoint type diffusers infers from its keys. So an SDXL folder loads as SDXL, and a family the toolkit does
not erase is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint
from safetensors import SafetensorError, safe_open
from torch import nn

from salun_sd.core.denoiser import Denoiser
from salun_sd.errors import UserError
from salun_sd.families.sd_unet import encode_prompts, sd_denoiser, sdxl_denoiser, sdxl_text_states
from salun_sd.families.config import SingleFileSource
from salun_sd.families.sd3_flux import flux_denoiser, pack_flux_latents, sd3_denoiser
from salun_sd.families.tiny import TINY_VAE_CHANNELS, tiny_pipeline

TINY = "tiny"  # the model name of the offline random-weight pipeline
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def check_model(model: str) -> Family | None:
    """Fail before anything loads: a model written as a path (/..., ./..., ~/..., a/b/c, x.safetensors) must exist
    (else loading would ask the Hub for it), a local pipeline folder must hold a family salun-sd erases, and its
    .safetensors files (or the single file) must be whole.

    Returns the family where it is known without loading (the tiny pipeline, a local folder), else None."""
    if model == TINY:
        return FAMILIES[StableDiffusionPipeline.__name__]
    local = Path(model).expanduser()
    looks_local = model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model or is_single_file(model)
    if looks_local and not local.exists():
        raise UserError(f"model folder {model} does not exist (a Hugging Face Hub ID has the form org/name)")
    family = model_family(model, model_index(model, local)) if local.is_dir() else None
    if local.exists():
        check_weight_files(model, local)
    return family


def check_weight_files(model: str, local: Path) -> None:
    """Every .safetensors file of a local model (the single file, or a folder's components) has a whole header and
    data, read without loading a weight: a truncated or garbage file is refused in one line, not as a loader's traceback."""
    for file in [local] if local.is_file() else sorted(local.glob("*/*.safetensors")):
        if file.suffix != ".safetensors":
            continue  # a .ckpt is a pickle: only loading tells (load_single_file)
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise UserError(f"{file} is not a complete safetensors file ({first_line(err)}); download or export it again") from None


def first_line(err: BaseException) -> str:
    """An exception's message in one line (diffusers' and the Hub's run over several)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


@dataclass(frozen=True)
class Family:
    """A text-to-image family the toolkit erases: its pipeline class, its network as a Denoiser, and what drawing
    images with it needs (latent layout, size rule, sampling defaults)."""

    name: str
    pipeline: type[DiffusionPipeline]
    denoiser: Callable[..., Denoiser]  # (pipe, prompts, concept_words, resolution) -> Denoiser over "" + prompts
    network: str = "unet"  # the pipeline component that is erased; every other one stays the base model's
    load_options: dict[str, Any] = field(default_factory=dict)  # extra from_pretrained arguments
    checkpoint_types: tuple[str, ...] = ()  # diffusers' names (infer_diffusers_model_type) of its single-file checkpoints
    text_states: Callable[..., torch.Tensor] | None = None  # (pipe, prompts) -> [prompts, tokens, dim]: what the network's attn2 reads (UCE); None: no such cross-attention
    steps: int = 50  # generate's default denoising steps
    guidance: float = 7.5  # generate's default guidance scale (FLUX.1-dev: the value of its guidance embedding)
    pack: Callable[[torch.Tensor], torch.Tensor] | None = None  # VAE-layout noise [B, C, h, w] -> the pipeline's `latents=` (FLUX: 2x2 patches)
    hub_tag: str = "stable-diffusion"  # the model card's family tag on the Hub, as diffusers' training scripts write it
    pipeline_multiple: int = 1  # what the pipeline's check_inputs asks of image sides whatever the VAE (SD-1.x/2.x, SDXL: 8)

    def network_of(self, pipe: DiffusionPipeline) -> nn.Module:
        return getattr(pipe, self.network)

    def default_size(self, pipe: DiffusionPipeline) -> int:
        """The side in pixels the model was trained at (the pipeline's default_sample_size; SD-1/2 pipelines have none: the UNet's)."""
        return (getattr(pipe, "default_sample_size", None) or self.network_of(pipe).config.sample_size) * pipe.vae_scale_factor

    def size_multiple(self, pipe: DiffusionPipeline) -> int:
        return self.multiple_of_configs(pipe.vae.config, self.network_of(pipe).config)

    def multiple_of_configs(self, vae: Mapping[str, Any], network: Mapping[str, Any]) -> int:
        """Image sides must be multiples of this: the VAE's factor (diffusers' vae_scale_factor) times the network's patch
        (SD3) or FLUX's 2x2 packing, and of what the pipeline asks."""
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        return math.lcm(self.pipeline_multiple, factor * (2 if self.pack else network.get("patch_size", 1)))

    def check_size(self, size: int, multiple: int, where: str) -> None:
        if size % multiple:
            raise UserError(f"{where} {size} is not a multiple of {multiple}, which {self.name} images need (e.g. {max(multiple, round(size / multiple) * multiple)})")

    def pipeline_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return self.pack(noise) if self.pack else noise


FAMILIES = {
    f.pipeline.__name__: f
    for f in (
        Family("SD-1.x/2.x", StableDiffusionPipeline, sd_denoiser, load_options={"safety_checker": None, "requires_safety_checker": False},
               checkpoint_types=("v1", "v2"), text_states=encode_prompts, pipeline_multiple=8),
        Family("SDXL", StableDiffusionXLPipeline, sdxl_denoiser, checkpoint_types=("xl_base",), hub_tag="stable-diffusion-xl",
               text_states=lambda pipe, prompts: sdxl_text_states(pipe, prompts)[0], pipeline_multiple=8),
        # SD3 and FLUX sample with their pipelines' own defaults (StableDiffusion3Pipeline / FluxPipeline.__call__).
        Family("SD3", StableDiffusion3Pipeline, sd3_denoiser, network="transformer", steps=28, guidance=7.0, hub_tag="sd3"),
        Family("FLUX.1", FluxPipeline, flux_denoiser, network="transformer", steps=28, guidance=3.5, pack=pack_flux_latents, hub_tag="flux"),
    )
}


def family_of(pipe: DiffusionPipeline) -> Family:
    return FAMILIES[type(pipe).__name__]


def configured_size_multiple(model: str, family: Family) -> int | None:
    """The family's size multiple from the tiny pipeline's or a local folder's component configs, no weight loaded;
    None where only loading tells (a Hub ID, a single file)."""
    if model == TINY:
        return family.multiple_of_configs({"block_out_channels": TINY_VAE_CHANNELS}, {})
    configs = [Path(model).expanduser() / part / "config.json" for part in ("vae", family.network)]
    if not all(c.is_file() for c in configs):
        return None  # an incomplete folder: loading says what is missing
    vae, network = (read_json(c) for c in configs)
    return family.multiple_of_configs(vae, network)


def read_json(path: Path) -> dict[str, Any]:
    """A model's JSON file (model_index.json, a component's config.json), refused in one line when it is not a JSON object."""
    try:
        value = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise UserError(f"{path} is not valid JSON ({first_line(err)}); download or export the model again") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds {type(value).__name__}, not a JSON object; download or export the model again")
    return value


def model_family(model: str, index: dict[str, Any]) -> Family:
    name = index.get("_class_name", "")
    if name not in FAMILIES:
        raise UserError(f"{model} holds {name or 'a pipeline without a _class_name'}, a family salun-sd does not erase; it erases {', '.join(FAMILIES)}")
    return FAMILIES[name]


def model_index(model: str, local: Path) -> dict[str, Any]:
    """The model's model_index.json (read from the Hub for a model ID): `_class_name` and the components."""
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise UserError(f"{local} is not a diffusers Stable Diffusion folder (it needs model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        return read_json(index)
    try:
        return dict(DiffusionPipeline.load_config(model))
    except Exception as err:  # diffusers/hub raise OSError, ValueError, HTTP errors, ...
        raise UserError(
            f"could not load {model!r} from the Hugging Face Hub ({type(err).__name__}). If this machine is offline, download the "
            "model where there is a network (`huggingface-cli download "
            f"{model} --local-dir sd-model`), copy the folder here and pass it instead: --model ./sd-model"
        ) from None


def is_single_file(model: str) -> bool:
    return Path(model).suffix in SINGLE_FILE_SUFFIXES


def load_single_file(path: Path, settings: SingleFileSource, dtype_arg: dict[str, torch.dtype]) -> DiffusionPipeline:
    """A .safetensors/.ckpt checkpoint through diffusers' from_single_file, with the family its keys say it is."""
    try:
        kind = infer_diffusers_model_type(load_single_file_checkpoint(str(path)))
    except Exception as err:  # a garbage or truncated .ckpt (torch.load's pickle errors), an unreadable file, ...
        raise UserError(f"could not read {path} as a single-file checkpoint ({first_line(err)}); download or export it again") from None
    family = next((f for f in FAMILIES.values() if kind in f.checkpoint_types), None)
    if family is None:
        raise UserError(f"{path} is a {kind!r} checkpoint, a family salun-sd does not erase; it erases single files of {', '.join(f.name for f in FAMILIES.values() if f.checkpoint_types)}")
    config = Path(settings.config).expanduser() if settings.config else None  # a local folder, or a Hub ID
    try:
        tokenizers = shared_tokenizers(config, read_json(config / "model_index.json")) if config and (config / "model_index.json").is_file() else {}
        return family.pipeline.from_single_file(str(path), config=settings.config or None, extract_ema=settings.ema, **family.load_options, **tokenizers, **dtype_arg)
    except Exception as err:  # offline without a config, a broken file, a config of another family, ...
        raise UserError(
            f"could not load {path} as a {family.name} single file ({first_line(err)}); "
            "offline, set single_file.config to a local diffusers folder of the same family (its configs and tokenizers describe the file)"
        ) from None


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, single_file: SingleFileSource | None = None) -> DiffusionPipeline:
    """Load with the family's pipeline class; on failure say whether the model is wrong, unsupported or the Hub unreachable."""
    check_model(model)
    if model == TINY:
        pipe = tiny_pipeline()
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    local = Path(model).expanduser()
    dtype_arg = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    if is_single_file(model):
        pipe = load_single_file(local, single_file or SingleFileSource(), dtype_arg)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    index = model_index(model, local)
    family = model_family(model, index)
    # A required component saved as [null, null] (SD3 without T5) must be passed as None, as diffusers asks.
    absent = {key: None for key, entry in index.items() if entry == [None, None] and key not in family.pipeline._optional_components}
    try:
        pipe = family.pipeline.from_pretrained(str(local) if local.exists() else model, **family.load_options, **absent, **shared_tokenizers(local, index), **dtype_arg)
    except Exception as err:  # a folder with a broken or missing component
        raise UserError(f"{model} is not a complete diffusers {family.name} folder: {first_line(err)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shared_tokenizers(local: Path, index: Mapping[str, Any]) -> dict[str, Any]:
    """A local folder's tokenizers, read once per process while their files (name, size, mtime_ns) stay the same
    and shared by the pipelines loaded from it (the toy world's and a test's base folders are loaded again and
    again): transformers parses a CLIP tokenizer.json (3.6 MB) four times a load, 0.1-0.5 s of CPU. Nothing
    changes a pipeline's tokenizer in place; code that needs a changed one changes a copy (attack.run.eos_padded)."""
    shared = {}
    for key, entry in index.items():
        folder = local / key
        if key.startswith("tokenizer") and isinstance(entry, list) and entry[0] == "transformers" and folder.is_dir():
            files = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))
            shared[key] = _read_tokenizer(entry[1], str(folder), files)
    return shared


@lru_cache(maxsize=8)
def _read_tokenizer(class_name: str, folder: str, files: tuple[tuple[str, int, int], ...]) -> Any:
    import transformers

    return getattr(transformers, class_name).from_pretrained(folder)


def model_identity(pipe: DiffusionPipeline, model: str, single_file: SingleFileSource | None = None) -> dict[str, object]:
    """What the loaded base model is, for the data cache's keys: re-exported weights at the same path are another model.

    A local folder or single file: every file's (relative path, size, mtime_ns). Not a hash of the weights: that would
    read 5 GB (SD-1.5) to 30 GB (FLUX) each run, and writing new weights (an export, a download) always gives new mtimes.
    A Hub ID: the commit diffusers loaded, the snapshots/<commit> folder of the Hub cache its components come from (a
    loaded component's _name_or_path). The tiny pipeline is built by code: the SHA-256 of its weights (1 M of them).
    """
    if model == TINY:
        digest = hashlib.sha256()
        for component, module in sorted(pipe.components.items()):
            for name, tensor in module.state_dict().items() if isinstance(module, nn.Module) else ():
                digest.update(f"{component}.{name}".encode() + tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return {"tiny": digest.hexdigest()}
    local = Path(model).expanduser()
    if local.is_file():  # a single file, and how it is read
        settings = single_file or SingleFileSource()
        config = Path(settings.config).expanduser()
        return {"files": file_stamps(local), "ema": settings.ema, "config": file_stamps(config) if settings.config and config.is_dir() else settings.config}
    if local.is_dir():
        return {"files": file_stamps(local)}
    snapshot = Path(family_of(pipe).network_of(pipe).config._name_or_path).parent
    return {"hub": model, "revision": snapshot.name if snapshot.parent.name == "snapshots" else file_stamps(snapshot)}


def file_stamps(path: Path) -> list[tuple[str, int, int]]:
    """(path relative to `path`, size, mtime_ns) of a file, or of every file in a folder (symlinks followed: the Hub cache's are)."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p.relative_to(path)) if p != path else p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in files]


def scheduler_class(name: str) -> type | None:
    """The diffusers scheduler class called `name` (e.g. LMSDiscreteScheduler); None for "" (keep the pipeline's own)."""
    if not name:
        return None
    import diffusers

    scheduler = getattr(diffusers, name, None)
    if not (isinstance(scheduler, type) and issubclass(scheduler, diffusers.SchedulerMixin)):
        raise UserError(f"--scheduler {name!r} is not a diffusers scheduler class (e.g. LMSDiscreteScheduler, DDIMScheduler, EulerDiscreteScheduler).")
    return scheduler
