"""Data order and noise that depend only on (seed, stream, position).

Position p of a stream (e.g. 'forget') is the p-th example the run consumes from it. Which example
that is, and its noise, timestep and misaligned condition, come from generators seeded by
(seed, stream, p). So a run makes the same updates on 1 or N processes and with any split into
accumulation steps, as long as the global batch is the same; and a resumed run continues exactly
where an uninterrupted one would be, with no sampler or RNG state to carry across a crash.
"""

from __future__ import annotations

import hashlib

import torch

from salun_sd.core.denoiser import ConceptData, Denoiser
from salun_sd.core.objectives import Batch


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


def examples(
    data: ConceptData,
    den: Denoiser,
    seed: int,
    stream: str,
    positions: list[int],
    indices: list[int],
    candidates: list[torch.Tensor] | None = None,
    cond_drop_prob: float = 0.0,
) -> Batch:
    """The examples `indices` with the noise, timestep (and misaligned condition c' ≠ c) of their stream positions.

    `candidates[k]` are the c' ids of concept k (data.concept says each example's concept; without it, concept 0).

    With cond_drop_prob, c and c' are each replaced by the null condition with that probability (class dropout
    while unlearning, as the official DDPM code trains in mode="train"), also drawn from the position.
    """
    noises, ts, misaligned, dropped = [], [], [], []
    conds = data.cond[torch.tensor(indices, device=data.cond.device)].tolist()
    concepts = data.concept[torch.tensor(indices, device=data.concept.device)].tolist() if data.concept is not None else [0] * len(indices)
    for p, c, k in zip(positions, conds, concepts):
        gen = generator(seed, stream, "example", p)
        noises.append(torch.randn(data.x0.shape[1:], generator=gen))
        ts.append(den.draw_timestep(gen))
        if candidates is not None:
            allowed = candidates[k][candidates[k] != c]
            if len(allowed) == 0:
                raise ValueError(f"no misaligned condition differs from condition {c}")
            misaligned.append(int(allowed[torch.randint(len(allowed), (1,), generator=gen)]))
        if cond_drop_prob > 0:
            dropped.append(torch.rand(2, generator=gen) < cond_drop_prob)  # for c, and for c'
    device = data.x0.device
    idx = torch.tensor(indices, device=device)
    batch = Batch(
        x0=data.x0[idx],
        cond=data.cond[idx],
        noise=torch.stack(noises).to(device, data.x0.dtype),
        t=torch.tensor(ts, device=device),
        misaligned=torch.tensor(misaligned, device=device) if candidates is not None else None,
        weight=data.weight[idx] if data.weight is not None else None,
    )
    if dropped:
        drop = torch.stack(dropped).to(device)
        batch.cond = batch.cond.masked_fill(drop[:, 0], den.null_cond)
        if batch.misaligned is not None:
            batch.misaligned = batch.misaligned.masked_fill(drop[:, 1], den.null_cond)
    return batch


def draw_batch(
    data: ConceptData,
    den: Denoiser,
    seed: int,
    stream: str,
    micro_step: int,
    global_batch: int,
    rank: int,
    per_rank: int,
    misaligned_candidates: list[torch.Tensor] | None = None,
    cond_drop_prob: float = 0.0,
) -> Batch:
    """This process's share of global micro-batch number `micro_step` of `stream`."""
    start = micro_step * global_batch + rank * per_rank
    positions = torch.arange(start, start + per_rank)
    indices = stream_indices(len(data), positions, seed, stream)
    return examples(data, den, seed, stream, positions.tolist(), indices.tolist(), misaligned_candidates, cond_drop_prob)


def draw_example_noise(data: ConceptData, den: Denoiser, seed: int, indices: list[int]) -> Batch:
    """Noise and timestep per example index, independent of batching (the saliency pass visits each example once)."""
    return examples(data, den, seed, "saliency", indices, indices)
