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
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from salun_sd.families.config import ImageGroup
from salun_sd.run.files import atomic, nbytes, write_json
from salun_sd.run.runtime import pause_if_asked
from salun_sd.core.objectives import METHODS

MANIFEST_NAME = "salun_manifest.json"


def earlier_erasures(model: str) -> list[dict[str, Any]]:
    """The erase steps already made on `model` when it is a salun-sd export (its manifest's, or a single file's
    metadata), oldest first; [] for any other model. A sequential erase appends its own step to these."""
    path = Path(model).expanduser()
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return json.loads((path / MANIFEST_NAME).read_text()).get("erased", [])
    if path.is_file() and path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("salun_sd")
        return json.loads(meta).get("erased", []) if meta else []
    return []


def kept_erased_groups(steps: list[dict[str, Any]]) -> list[ImageGroup]:
    """The forget prompts of every concept erased in `steps`, as remain groups: drawn by the model being erased now
    (which no longer shows them), they hold those prompts where the earlier steps left them while a new concept is
    erased. Each draws as many images as its step used (a folder group's share of its concept's examples)."""
    groups: dict[str, ImageGroup] = {}
    for step in steps:
        for concept in step["concepts"]:
            share = max(1, concept.get("examples", 0) // max(1, len(concept["forget"])))
            for g in concept["forget"]:
                groups.setdefault(g["prompt"], ImageGroup(prompt=g["prompt"], generate=g.get("images") or share))
    return list(groups.values())


def model_card(steps: list[dict[str, Any]], loader: str, network: str, absent: list[str], family_tag: str) -> str:
    """The card of an export after every erase step in `steps` (oldest first; the last is this export's), each a
    dict with base_model, concepts (name, forget, misaligned), method, settings and mask_kept.

    `loader`: the class that loads the export (the pipeline's, or the network's alone); `network`: the erased component;
    `absent`: required components the base model was saved without (SD3 without T5), which loading must pass as None;
    `family_tag`: the family's Hub tag (Family.hub_tag)."""
    load_args = "".join(f", {name}=None" for name in absent)
    base_model, last = steps[0]["base_model"], steps[-1]
    names = [c["name"] for step in steps for c in step["concepts"]]
    title = ", ".join(f'"{n}"' for n in names)

    def kept(step: dict[str, Any]) -> str:
        return (f"{step['mask_kept']:.2%} of the trained weights" if step.get("mask_kept") is not None
                else "the cross-attention key/value projections (`attn2.to_k`, `attn2.to_v`), in closed form" if METHODS[step["method"]].closed_form
                else "no mask (all trained weights)")

    order = "\n".join(
        f"| {i} | {', '.join(c['name'] for c in step['concepts'])} | `{step['method']}` | {kept(step)} | `{step['base_model']}` |"
        for i, step in enumerate(steps, 1)
    )
    details = "\n\n".join(
        f"### Step {i}{' (this export)' if step is last else ''}: {', '.join(c['name'] for c in step['concepts'])}\n\n| setting | value |\n|---|---|\n"
        + "\n".join(f"| {k} | `{json.dumps(v)}` |" for k, v in step["settings"].items())
        for i, step in enumerate(steps, 1)
    )
    method = last["method"]
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

# {base_model} with {title} erased

This model is `{base_model}` after erasing the concept{'s' if len(names) > 1 else ''} **{', '.join(names)}** with salun-sd, the toolkit of
[SalUn](https://arxiv.org/abs/2310.12508) (saliency unlearning, Fan et al., ICLR 2024).
Only the `{network}` changed; every other component is the base model's.

- **Method:** `{method}` ({METHODS[method].doc})
- **Weights updated:** {kept(last)}; every other weight is bit-for-bit {'the base model' if len(steps) == 1 else 'the previous step'}'s.

## Concepts erased, in order

| step | concepts | method | weights updated | erased from |
|---|---|---|---|---|
{order}

## Load it

```python
from diffusers import {loader}
model = {loader}.from_pretrained(folder{load_args})
```

## Settings of each step

{details}

The full resolved configuration, package versions and git revision are in `{MANIFEST_NAME}`.
"""


def export(
    pipe: DiffusionPipeline, network: str, model: nn.Module, out: Path, card: str, manifest: dict[str, Any], network_only: bool = False
) -> Path:
    """Write the pipeline with `model` as its `network` component (or `model` alone) in safetensors to `out`,
    atomically, replacing what was there. SALUN_SD_PAUSE_AFTER_STEP=export pauses once it is written, before the rename."""
    if not network_only:
        setattr(pipe, network, model)
    parts = [model] if network_only else [c for c in pipe.components.values() if isinstance(c, nn.Module)]
    with atomic(out, lambda: nbytes(*parts)) as tmp:
        (model if network_only else pipe).save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(card)
        write_json(tmp / MANIFEST_NAME, manifest)
        pause_if_asked("export")
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
    with atomic(out, lambda: nbytes(merged)) as tmp:
        save_file({k: v.contiguous().clone() for k, v in merged.items()}, str(tmp), metadata=metadata)  # clone: .ckpt tensors share storage
    return out
