"""Data order and noise that depend only on (seed, stream, step).

Every micro-step draws its examples, noise and timesteps for the *global* batch from a generator
seeded by its position in the run, and each process takes its slice. So a run gives the same
updates on 1 or N processes with the same global batch, and a resumed run continues exactly where
an uninterrupted one would be: no sampler or RNG state has to survive a crash.
"""

from __future__ import annotations

import hashlib

import torch

from salun_sd.denoiser import ConceptData, Denoiser
from salun_sd.objectives import Batch


def generator(*key: object) -> torch.Generator:
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def stream_indices(n: int, positions: torch.Tensor, seed: int, stream: str) -> torch.Tensor:
    """Indices at `positions` of an endless stream that visits all n examples once per epoch, reshuffled each epoch."""
    epochs = positions // n
    out = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(n, generator=generator(seed, stream, "epoch", epoch))
        sel = epochs == epoch
        out[sel] = perm[positions[sel] % n]
    return out


def draw_batch(
    data: ConceptData,
    den: Denoiser,
    seed: int,
    stream: str,
    micro_step: int,
    global_batch: int,
    rank: int,
    per_rank: int,
    misaligned_candidates: torch.Tensor | None = None,
) -> Batch:
    """This process's share of global micro-batch number `micro_step` of `stream` (e.g. 'forget').

    With `misaligned_candidates`, each example also gets a misaligned condition c' ≠ c.
    """
    positions = torch.arange(micro_step * global_batch, (micro_step + 1) * global_batch)
    idx = stream_indices(len(data), positions, seed, stream)
    gen = generator(seed, stream, "noise", micro_step)
    noise = torch.randn((global_batch, *data.x0.shape[1:]), generator=gen)
    t = torch.randint(0, den.num_train_timesteps, (global_batch,), generator=gen)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    device = data.x0.device
    cond = data.cond[idx.to(device)]
    misaligned = None
    if misaligned_candidates is not None:
        misaligned = draw_misaligned(cond.cpu(), misaligned_candidates.cpu(), gen)[mine].to(device)
    return Batch(
        x0=data.x0[idx[mine].to(device)],
        cond=cond[mine],
        noise=noise[mine].to(device, data.x0.dtype),
        t=t[mine].to(device),
        misaligned=misaligned,
    )


def draw_misaligned(cond: torch.Tensor, candidates: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each example a condition c' ≠ c drawn uniformly from `candidates` (e.g. another class)."""
    out = []
    for c in cond.tolist():
        allowed = candidates[candidates != c]
        if len(allowed) == 0:
            raise ValueError(f"no misaligned condition differs from condition {c}")
        out.append(allowed[torch.randint(len(allowed), (1,), generator=gen)].item())
    return torch.tensor(out, dtype=torch.long)


def draw_example_noise(data: ConceptData, den: Denoiser, seed: int, indices: list[int]) -> Batch:
    """Noise and timestep per example index, independent of batching (used by the saliency pass)."""
    noises, ts = [], []
    for i in indices:
        gen = generator(seed, "saliency", i)
        noises.append(torch.randn(data.x0.shape[1:], generator=gen))
        ts.append(torch.randint(0, den.num_train_timesteps, (1,), generator=gen))
    idx = torch.tensor(indices, device=data.x0.device)
    return Batch(
        x0=data.x0[idx],
        cond=data.cond[idx],
        noise=torch.stack(noises).to(data.x0.device, data.x0.dtype),
        t=torch.cat(ts).to(data.x0.device),
    )
