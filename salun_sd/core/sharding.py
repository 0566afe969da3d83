"""FSDP2-sharded weights and their masks (`accelerate launch --use_fsdp --fsdp_version 2`).

Accelerate's FSDP2 shards each parameter along dim 0 into a DTensor. The masked loop works on each
process's local shard (mask shard included: 1 byte per local weight), and what leaves a run — the
mask file, the exported model — is gathered one tensor at a time onto the main process's CPU, so it
is the same file an unsharded run writes.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import fsdp2_prepare_model
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

Mask = dict[str, torch.Tensor]  # parameter name -> bool tensor of the parameter's shape (or its shard)


def shard_for_fsdp(accelerator: Accelerator, model: nn.Module) -> None:
    """Under FSDP2, shard `model` in place with Accelerate's own wrap policy (from the model's `_no_split_modules`)
    before anything runs it, so the whole network never sits on one device; Accelerate's prepare keeps a model
    sharded so as it is. Without FSDP, nothing."""
    if accelerator.is_fsdp2:
        fsdp2_prepare_model(accelerator, model)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (a view: in-place ops change the parameter), else the tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The part of `mask` that matches this process's shard of parameter `p` (all of it when p is whole)."""
    if isinstance(p, DTensor) and not isinstance(mask, DTensor):
        mask = distribute_tensor(mask.to(p.device), p.device_mesh, p.placements, src_data_rank=None)  # each process cuts its own shard
    return local(mask).to(p.device, torch.bool)


def gather_mask(mask: Mask, keep: bool) -> Mask:
    """The whole mask on the CPU where `keep`, else empty. Every process must call this: sharded tensors are
    gathered one at a time, so none holds more than one whole tensor besides its result."""
    whole = {}
    for name, m in mask.items():
        if isinstance(m, DTensor):
            m = m.to(torch.uint8).full_tensor().bool()  # uint8: gloo gathers no bool
        if keep:
            whole[name] = m.cpu()
    return whole


def gather_model(model: nn.Module, keep: bool) -> nn.Module:
    """A sharded model as an ordinary module on the CPU where `keep` (for the export), else the model as it is.

    Every process must call this. FSDP2 changes the class of the modules it wraps, so the whole model is
    rebuilt from its diffusers config as the class it was, and loaded with the gathered weights."""
    if not isinstance(model, FSDPModule):
        return model
    state = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            state[name] = t.to("cpu", copy=True)
    if not keep:
        return model
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    whole = cls.from_config(model.config)
    whole.load_state_dict(state, assign=True)  # the gathered tensors themselves, in their dtypes
    return whole.requires_grad_(False)
