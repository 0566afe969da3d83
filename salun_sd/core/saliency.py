"""Saliency masks: which weights matter most for the concept to forget.

The saliency of a weight is |∂L_f/∂θ| at the original weights θ_o, with L_f the guided diffusion
loss on the whole forget set. The mask keeps the top fraction of weights (globally, or per tensor).
The threshold is found by a two-pass radix select over the float bit patterns (non-negative
float32 values order like their int32 bits), so the extra memory is one histogram plus one
temporary the size of the largest tensor, not a sort of all 860 M values.

Under FSDP (`accelerate launch --use_fsdp --fsdp_version 2`) the network is sharded before its
gradient pass: scores and masks are DTensors sharded like their parameters (each process holds its
shard, 1 byte per weight of mask), the radix-select histograms are summed over the processes, and
the saved mask is gathered one tensor at a time, so the file equals the unsharded one.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from tqdm.auto import tqdm

from salun_sd.core.config import MaskConfig, check_fraction
from salun_sd.core.denoiser import ConceptData, Denoiser
from salun_sd.core.draws import draw_example_noise
from salun_sd.errors import UserError
from salun_sd.core.objectives import guided_forget_loss
from salun_sd.core.sharding import Mask, gather_mask, local, shard_for_fsdp
from salun_sd.run.files import atomic


def gradient_saliency(
    model: nn.Module,
    losses: Iterable[torch.Tensor | None],
    accelerator: Accelerator,
    include: Callable[[str], bool] = lambda name: True,
    max_grad_norm: float = 0.0,
) -> dict[str, torch.Tensor]:
    """|sum over batches of ∂loss/∂θ| for each parameter `include` selects: the model-agnostic saliency pass.

    `losses` yields, one batch at a time, this process's share of the batch loss (None when it has no
    example of the batch); it is iterated after the model is in eval mode (no dropout: saliency must not
    depend on batching) and on its device, so a generator can move its data there first. With
    max_grad_norm, each batch's gradient is clipped to that norm before the batches are added up, as the
    official DDPM code does. Gradients are summed over the processes (per batch when clipping), so the
    result equals the single-process one up to float summation order. Under FSDP the network is sharded
    here, in place (Accelerate's own wrap policy), and each score is a DTensor sharded like its weight.
    """
    model.eval()
    for name, p in model.named_parameters():
        p.requires_grad_(include(name))
        p.grad = None
    shard_for_fsdp(accelerator, model)
    model.to(accelerator.device)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    world = accelerator.num_processes

    def summed(g: torch.Tensor) -> torch.Tensor:  # over the processes
        if isinstance(g, DTensor):  # FSDP reduced it already, to the mean
            return g.mul_(world)
        return accelerator.reduce(g, reduction="sum") if world > 1 else g

    clipped = {name: torch.zeros_like(p) for name, p in params.items()} if max_grad_norm > 0 else None
    for loss in losses:
        if loss is not None:
            loss.backward()
        if clipped is not None:
            for name, p in params.items():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                p.grad = summed(g)
            torch.nn.utils.clip_grad_norm_(params.values(), max_grad_norm)
            for name, p in params.items():
                clipped[name] += p.grad
                p.grad = None
    grads = {}
    for name, p in params.items():
        if clipped is not None:
            grads[name] = clipped[name].abs_()
        else:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = None
            grads[name] = summed(g).abs_()
        if not torch.isfinite(grads[name]).all():
            raise UserError(f"the forget-loss gradient of {name} is not finite; check the forget data (and the guidance scale)")
    model.requires_grad_(False)
    return grads


def accumulate_saliency(
    den: Denoiser,
    forget: ConceptData,
    accelerator: Accelerator,
    guidance: float,
    batch_size: int,
    seed: int = 0,
    include: Callable[[str], bool] = lambda name: True,
    max_grad_norm: float = 0.0,
) -> dict[str, torch.Tensor]:
    """|gradient| of the mean guided forget loss over all of D_f, for each parameter `include` selects.

    With max_grad_norm, the gradient of each batch's mean loss is clipped to that norm before the batches
    are added up, as the official DDPM code does. Each process takes its share of every batch.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = [list(range(i, min(i + batch_size, len(forget)))) for i in range(0, len(forget), batch_size)]

    def losses():
        den.to(accelerator.device)
        data = forget.to(accelerator.device)
        for batch in tqdm(batches, desc="saliency", disable=not accelerator.is_local_main_process):
            mine = batch[rank::world]
            if not mine:
                yield None
                continue
            examples = draw_example_noise(data, den, seed, mine)
            with accelerator.autocast():
                loss = guided_forget_loss(den, den.model, examples, guidance).sum() / (len(batch) if max_grad_norm > 0 else len(forget))
            yield loss

    return gradient_saliency(den.model, losses(), accelerator, include, max_grad_norm)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return local(x).detach().float().contiguous().view(torch.int32).flatten()


def _shard_group(tensors: list[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group whose shards make up the tensors (None when they are whole on every process).

    FSDP2 shards each weight along dim 0 over a 1-D mesh; a replicated dimension (HSDP) would count
    weights twice in a summed histogram, so it is refused."""
    sharded = [x for x in tensors if isinstance(x, DTensor)]
    if not sharded:
        return None
    if len(sharded) < len(tensors) or any(x.device_mesh.ndim != 1 or not isinstance(x.placements[0], Shard) for x in sharded):
        raise UserError("the saliency mask supports FSDP's 1-D sharding of every weight (fsdp_version 2, no HSDP replication)")
    return sharded[0].device_mesh.get_group()


def _kth_largest(tensors: Iterable[torch.Tensor] | list[torch.Tensor], k: int) -> float:
    """The k-th largest value (1-based) of non-negative float tensors, by a 16+16-bit radix select.

    For FSDP-sharded tensors each process counts its shards and the histograms are summed."""
    tensors = list(tensors)
    group = _shard_group(tensors)
    device = _bits(tensors[0]).device
    hist = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for x in tensors:
        hist += torch.bincount(_bits(x) >> 16, minlength=1 << 16)
    if group is not None:
        dist.all_reduce(hist, group=group)
    at_least = hist.flip(0).cumsum(0).flip(0)  # at_least[b]: count with high bits >= b
    high = int((at_least >= k).nonzero().max())
    k_in_bin = k - int(at_least[high] - hist[high])
    low_hist = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for x in tensors:
        bits = _bits(x)
        low_hist += torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=1 << 16)
    if group is not None:
        dist.all_reduce(low_hist, group=group)
    low = int((low_hist.flip(0).cumsum(0).flip(0) >= k_in_bin).nonzero().max())
    return torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32).item()


def _keep(score: torch.Tensor, threshold: float) -> torch.Tensor:
    # A zero threshold would keep every weight the loss does not touch; keep only salient ones.
    return score > 0 if threshold == 0 else score >= threshold


def saliency_masks(scores: dict[str, torch.Tensor], fractions: Iterable[float], scope: str = "global") -> dict[float, Mask]:
    """One mask per fraction: keep the top `fraction` of scores across all tensors, or within each tensor."""
    masks: dict[float, Mask] = {}
    total = sum(s.numel() for s in scores.values())
    for fraction in fractions:
        check_fraction(fraction, "mask fraction")
        if scope == "global":
            threshold = _kth_largest(scores.values(), max(1, round(fraction * total)))
            masks[fraction] = {n: _keep(s, threshold) for n, s in scores.items()}
        elif scope == "per_layer":
            masks[fraction] = {n: _keep(s, _kth_largest([s], max(1, round(fraction * s.numel())))) for n, s in scores.items()}
        else:
            raise UserError(f"mask scope must be 'global' or 'per_layer', got {scope!r}")
    return masks


def block_of(name: str) -> str:
    """The UNet block a parameter belongs to: 'down_blocks.1', 'mid_block', 'conv_in', ..."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def mask_summary(mask: Mask) -> dict[str, float]:
    """Kept fraction per block, plus 'total' — the numbers a person checks first."""
    kept, size = defaultdict(int), defaultdict(int)
    for name, m in mask.items():
        for key in (block_of(name), "total"):
            kept[key] += int(m.sum())
            size[key] += m.numel()
    return {key: kept[key] / size[key] for key in size}


def save_mask(mask: Mask, path: str | Path, info: dict[str, object]) -> None:
    """Save as safetensors of bool tensors; `info` and the per-block summary go into the metadata."""
    metadata = {"info": json.dumps(info), "summary": json.dumps(mask_summary(mask))}
    with atomic(path) as tmp:
        save_file({n: m.to("cpu", torch.bool).contiguous() for n, m in mask.items()}, str(tmp), metadata=metadata)


def open_mask(path: str | Path):
    """safe_open on a mask file, with a one-line error for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"mask file {path} does not exist; create one with `salun-sd mask`")
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as err:
        raise UserError(f"mask file {path} is not a complete safetensors file ({err}); make it again with `salun-sd mask`") from None


def load_mask(path: str | Path, model: nn.Module) -> Mask:
    """Load a mask and check it was made for this architecture, naming the first mismatch."""
    params = dict(model.named_parameters())
    with open_mask(path) as f:
        names = list(f.keys())
        for name in names:
            if name not in params:
                raise UserError(f"mask {path} was made for another architecture: it has {name!r}, which this model does not have")
            shape = tuple(f.get_slice(name).get_shape())
            if shape != tuple(params[name].shape):
                raise UserError(
                    f"mask {path} was made for another architecture: {name} has shape {shape} in the mask "
                    f"but {tuple(params[name].shape)} in the model"
                )
        mask = {name: f.get_tensor(name).bool() for name in names}
    return mask


def mask_info(path: str | Path) -> dict[str, object]:
    """The mask's metadata (its settings and per-block summary); reading it also checks the file is whole."""
    with open_mask(path) as f:
        meta = f.metadata() or {}
    return {"info": json.loads(meta.get("info", "{}")), "summary": json.loads(meta.get("summary", "{}"))}


def mask_path(run_dir: Path, fraction: float | None = None) -> Path:
    """Where a run keeps its mask (`mask.safetensors`), and the extra fractions (`mask-0.3.safetensors`)."""
    return run_dir / ("mask.safetensors" if fraction is None else f"mask-{fraction:g}.safetensors")


def make_masks(
    den: Denoiser,
    forget: ConceptData,
    accelerator: Accelerator,
    cfg: MaskConfig,
    run_dir: Path,
    seed: int,
    include: Callable[[str], bool],
    info: dict[str, object],
) -> Mask:
    """The mask step of every adapter: one gradient pass, a mask per fraction saved in run_dir; returns cfg.fraction's.

    With cfg.per_concept and several concepts in `forget`, one pass per concept and the union of their masks
    (each concept keeps its own top fraction, so the union keeps at least `fraction`).

    `include` picks the trainable weights. The official code ranks every weight and trains the selected
    ones that made the cut (cfg.rank_over=model); rank_over=trainable ranks among the selected alone.
    """
    ranked = include if cfg.rank_over == "trainable" else lambda name: True
    fractions = [cfg.fraction, *cfg.extra_fractions]
    concepts = forget.concept.unique().tolist() if cfg.per_concept and forget.concept is not None else [None]
    masks: dict[float, Mask] = {}
    for k in concepts:  # one pass over all of D_f, or (per_concept) one per concept whose masks are united
        data = forget if k is None else forget.select(forget.concept == k)
        scores = accumulate_saliency(den, data, accelerator, cfg.guidance, cfg.batch_size, seed, ranked, cfg.max_grad_norm)
        for f, mask in saliency_masks(scores, fractions, cfg.scope).items():
            mask = {n: m for n, m in mask.items() if include(n)}
            masks[f] = mask if f not in masks else {n: masks[f][n] | m for n, m in mask.items()}
        del scores
    for fraction, m in masks.items():
        whole = gather_mask(m, accelerator.is_main_process)  # under FSDP, gathered one tensor at a time
        if accelerator.is_main_process:
            meta = {"fraction": fraction, "scope": cfg.scope, "rank_over": cfg.rank_over, "guidance": cfg.guidance, "max_grad_norm": cfg.max_grad_norm,
                    "forget_examples": len(forget), "per_concept": len(concepts) if cfg.per_concept else 0, **info}
            save_mask(whole, mask_path(run_dir, None if fraction == cfg.fraction else fraction), meta)
    if accelerator.is_main_process:
        summary = mask_info(mask_path(run_dir))["summary"]
        size = sum(m.numel() for m in masks[cfg.fraction].values())
        rows = "\n".join(f"  {block:<16} {kept:7.2%}" for block, kept in summary.items() if block != "total")
        accelerator.print(f"mask: kept {summary['total']:.2%} of {size:,} weights -> {mask_path(run_dir)}\nkept per block:\n{rows}")
    accelerator.wait_for_everyone()
    return masks[cfg.fraction]
