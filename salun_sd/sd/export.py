"""Export the erased model as a folder diffusers loads as it is, with a model card.

The folder is written under a temporary name and renamed at the end, so a crash never leaves a
half-written folder under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline
from torch import nn

from salun_sd.manifest import write_manifest
from salun_sd.objectives import METHODS

MANIFEST_NAME = "salun_manifest.json"


def model_card(base_model: str, concept: str, settings: dict[str, Any], mask_kept: float | None, loader: str, network: str) -> str:
    """`loader`: the class that loads the export (the pipeline's, or the network's alone); `network`: the erased component."""
    method = settings.get("method", "salun")
    rows = "\n".join(f"| {k} | `{json.dumps(v)}` |" for k, v in settings.items())
    kept = f"{mask_kept:.2%} of the trained weights" if mask_kept is not None else "no mask (all trained weights)"
    return f"""---
library_name: diffusers
base_model: {base_model}
tags:
- stable-diffusion
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
model = {loader}.from_pretrained(folder)
```

## Settings

| setting | value |
|---|---|
{rows}

The full resolved configuration, package versions and git revision are in `{MANIFEST_NAME}`.
"""


def export(
    pipe: DiffusionPipeline, network: str, model: nn.Module, out: Path, card: str, manifest: dict[str, Any], unet_only: bool = False
) -> Path:
    """Write the pipeline with `model` as its `network` component (or `model` alone) in safetensors to `out`,
    atomically, replacing what was there."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if unet_only:
        model.save_pretrained(tmp, safe_serialization=True)
    else:
        setattr(pipe, network, model)
        pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "README.md").write_text(card)
    write_manifest(tmp / MANIFEST_NAME, manifest)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.replace(old)
        tmp.replace(out)
        shutil.rmtree(old)
    else:
        tmp.replace(out)
    return out
