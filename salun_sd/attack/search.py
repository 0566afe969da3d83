"""The UnlearnDiffAtk schedule, shared by both search spaces: for each timestep of a fixed list, some
optimiser steps on the diffusion loss at that timestep (fresh noise each step), then one image from the
current prompt, judged; stop at the first success (src/attackers/text_grad_.py run, sequential mode)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from salun_sd.attack.target import Case, Victim


class Prefix(Protocol):
    optimizer: torch.optim.Optimizer

    def prefix(self, generator: torch.Generator) -> torch.Tensor: ...

    def after_step(self) -> None: ...

    def final(self) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass
class Outcome:
    success: bool
    image: Image.Image
    prefix: torch.Tensor  # (k, d): what the image was drawn with
    ids: torch.Tensor | None  # (k,) token ids for the discrete attack
    blocks: int  # timestep blocks run
    loss_trace: list[float]  # mean training loss per block


def search(victim: Victim, case: Case, space: Prefix, iterations: int, judge: Callable[[list[Image.Image]], list[bool]], generator: torch.Generator) -> Outcome:
    trace: list[float] = []
    for block, t in enumerate(victim.timesteps, start=1):
        total = 0.0
        for _ in range(iterations):
            loss = victim.loss(case, space.prefix(generator), t, victim.noise(case, generator))
            space.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            space.optimizer.step()
            space.after_step()
            total += loss.item()
        trace.append(total / iterations)
        prefix, ids = space.final()
        image = victim.image(case, prefix, None if ids is None else with_slots(case.ids, ids))
        success = judge([image])[0]
        if success or block == len(victim.timesteps):
            return Outcome(bool(success), image, prefix, ids, block, trace)
    raise AssertionError("the schedule has at least one timestep")


def with_slots(ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The case's ids with the k slots after BOS set to `tokens`."""
    out = ids.clone()
    out[0, 1 : 1 + len(tokens)] = tokens.to(out.device)
    return out
