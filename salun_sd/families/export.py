"""Export the erased model as a folder diffusers loads as it is, with a model card, and optionally as one
single-file checkpoint in the base file's own layout (A1111, ComfyUI, from_single_file).

Everything is written under a temporary name and renamed at the end, so a crash never leaves a
half-written export under the final name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, load_single_file_checkpoint
from safetensors.torch import save_file
from torch import nn

from salun_sd.run.files import atomic, write_json
from salun_sd.core.objectives import METHODS

MANIFEST_NAME = "salun_manifest.json"


def model_card(base_model: str, concept: str, settings: dict[str, Any], mask_kept: float | None, loader: str, network: str, absent: list[str],
               family_tag: str) -> str:
    """`loader`: the class that loads the export (the pipeline's, or the network's alone); `network`: the erased component;
    `absent`: required components the base model was saved without (SD3 without T5), which loading must pass as None;
    `family_tag`: the family's Hub tag (Family.hub_tag)."""
    load_args = "".join(f", {name}=None" for name in absent)
    method = settings.get("method", "salun")
    rows = "\n".join(f"| {k} | `{json.dumps(v)}` |" for k, v in settings.items())
    kept = (f"{mask_kept:.2%} of the trained weights" if mask_kept is not None
            else "the cross-attention key/value projections (`attn2.to_k`, `attn2.to_v`), in closed form" if METHODS[method].closed_form
            else "no mask (all trained weights)")
    return f"""---
library_name: diffusers
base_model: {base_model}
tags:
- {family_tag}
- text-to-image
- concept-erasure
- machine-unlearning
- salun
---

# {base_model} with "{concept}" erased

This model is `{base_model}` after erasing the concept **{concept}** with salun-sd, the toolkit of
[SalUn](https://arxiv.org/abs/2310.12508) (saliency unlearning, Fan et al., ICLR 2024).
Only the `{network}` changed; every other component is the base model's.

- **Method:** `{method}` ({METHODS[method].doc})
- **Weights updated:** {kept}; every other weight is bit-for-bit the base model's.

## Load it

```python
from diffusers import {loader}
model = {loader}.from_pretrained(folder{load_args})
```

## Settings

| setting | value |
|---|---|
{rows}

The full resolved configuration, package versions and git revision are in `{MANIFEST_NAME}`.
"""


def export(
    pipe: DiffusionPipeline, network: str, model: nn.Module, out: Path, card: str, manifest: dict[str, Any], network_only: bool = False
) -> Path:
    """Write the pipeline with `model` as its `network` component (or `model` alone) in safetensors to `out`,
    atomically, replacing what was there."""
    with atomic(out) as tmp:
        if network_only:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            setattr(pipe, network, model)
            pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(card)
        write_json(tmp / MANIFEST_NAME, manifest)
    return Path(out)


def export_single_file(base_file: str | Path, unet: nn.Module, out: Path, metadata: dict[str, str]) -> Path:
    """The base single file with its UNet replaced by `unet`, as safetensors at `out`.

    Each UNet weight goes under the key diffusers' own conversion reads it from (found by running that
    conversion on the base file and matching the tensors it hands out by identity), so from_single_file
    loads the written UNet bit for bit. Every other tensor (VAE, text encoders) is the base file's as it is.
    The file's EMA copy of the UNet (`model_ema.*`) is left out: it still holds the concept.
    """
    checkpoint = {k: v for k, v in load_single_file_checkpoint(str(base_file)).items() if isinstance(v, torch.Tensor)}
    key_of = {id(tensor): key for key, tensor in checkpoint.items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config), extract_ema=False)
    names = {name: key_of[id(tensor)] for name, tensor in converted.items()}
    weights = unet.state_dict()
    missing = sorted(set(weights) - set(names))
    if missing:
        raise ValueError(f"{base_file} has no weight that diffusers maps to {missing[0]}")  # a UNet that is not the file's
    merged = {key: tensor for key, tensor in checkpoint.items() if not key.startswith("model_ema.")}
    merged.update({names[name]: weight.detach().cpu() for name, weight in weights.items()})
    with atomic(out) as tmp:
        save_file({k: v.contiguous().clone() for k, v in merged.items()}, str(tmp), metadata=metadata)  # clone: .ckpt tensors share storage
    return out
