"""Loading a base pipeline: a Hub model ID, a local folder, or the offline tiny pipeline."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from salun_sd.errors import UserError
from salun_sd.sd.tiny import tiny_pipeline

TINY = "tiny"  # the model name of the offline random-weight pipeline


def check_model(model: str) -> None:
    """A model written as a path (/..., ./..., ~/..., a/b/c) must exist: otherwise loading would ask the Hub for it."""
    looks_local = model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model
    if model != TINY and looks_local and not Path(model).expanduser().exists():
        raise UserError(f"model folder {model} does not exist (a Hugging Face Hub ID has the form org/name)")


def load_pipeline(model: str, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load with `from_pretrained`; on failure say whether the folder is wrong or the Hub unreachable."""
    check_model(model)
    if model == TINY:
        pipe = tiny_pipeline()
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    local = Path(model).expanduser()
    try:
        dtype_arg = {} if dtype == torch.float32 else {"torch_dtype": dtype}
        pipe = StableDiffusionPipeline.from_pretrained(str(local) if local.exists() else model, safety_checker=None, requires_safety_checker=False, **dtype_arg)
    except Exception as err:  # diffusers/hub raise OSError, ValueError, HTTP errors, ...
        if local.exists():
            raise UserError(f"{local} is not a diffusers Stable Diffusion folder (it needs model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/): {err}") from None
        raise UserError(
            f"could not load {model!r} from the Hugging Face Hub ({type(err).__name__}). If this machine is offline, download the "
            "model where there is a network (`huggingface-cli download "
            f"{model} --local-dir sd-model`), copy the folder here and pass it instead: --model ./sd-model"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe
