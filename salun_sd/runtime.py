"""Process setup and teardown shared by every command that trains."""

from __future__ import annotations

import os
import sys

import torch
from accelerate import Accelerator

from salun_sd.errors import UserError


def make_accelerator(mixed_precision: str = "no") -> Accelerator:
    """Accelerate picks up `accelerate launch`; CPU-only machines need cpu=True to run several processes."""
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise UserError(f"mixed_precision must be no, fp16 or bf16, got {mixed_precision!r}")
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def finish(accelerator: Accelerator) -> None:
    """End all processes together. Gloo processes can abort in interpreter teardown after their work
    is done, so a multi-process run leaves through os._exit once every rank has flushed."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
