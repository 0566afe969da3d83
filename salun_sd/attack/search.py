"""The UnlearnDiffAtk schedule, shared by both search spaces: for each timestep of a fixed list, some
optimiser steps on the training loss at that timestep (fresh noise each step), then one image from the
current prompt, judged; stop at the first success (src/attackers/text_grad_.py run, sequential mode).

Many instances (prompt, seed) run together: one forward and backward per step for all that have not yet
succeeded. Each has its own search space, optimiser and generator, and the batch's loss is the sum of the
per-instance losses, so an instance's gradients, draws and result are those it would have alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from salun_sd.attack.judges import Verdict
from salun_sd.attack.target import Case, Slots, Victim


class Prefix(Protocol):
    optimizer: torch.optim.Optimizer

    def prefix(self, generator: torch.Generator) -> Slots: ...

    def after_step(self) -> None: ...

    def final(self) -> Slots: ...


@dataclass
class Outcome:
    success: bool
    image: Image.Image
    slots: Slots  # what the image was drawn with (the discrete attack's ids included)
    blocks: int  # timestep blocks run
    loss_trace: list[float]  # mean training loss per block


def search(victim: Victim, cases: Sequence[Case], spaces: Sequence[Prefix], iterations: int, verdicts: Sequence[Verdict],
           generators: Sequence[torch.Generator]) -> list[Outcome]:
    """Attack every case in its own space; `verdicts[i]` judges case i's images, `generators[i]` makes its draws."""
    traces: list[list[float]] = [[] for _ in cases]
    outcomes: list[Outcome | None] = [None] * len(cases)
    active = list(range(len(cases)))
    for block, t in enumerate(victim.timesteps, start=1):
        totals = [0.0] * len(active)
        for _ in range(iterations):
            slots = [spaces[i].prefix(generators[i]) for i in active]  # each generator: its token draw, then its noise, as alone
            noise = torch.cat([victim.noise(cases[i], generators[i]) for i in active])
            losses = victim.losses([cases[i] for i in active], slots, [t] * len(active), noise)
            for i in active:
                spaces[i].optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            for n, i in enumerate(active):
                spaces[i].optimizer.step()
                spaces[i].after_step()
                totals[n] += losses[n].item()
        finals = [spaces[i].final() for i in active]
        images = victim.judged_images([cases[i] for i in active], finals)
        for n, i in enumerate(active):
            traces[i].append(totals[n] / iterations)
        done, active = judge_round(active, images, verdicts, last=block == len(victim.timesteps))
        for n, i, success in done:
            outcomes[i] = Outcome(success, images[n], finals[n], block, traces[i])
        if not active:
            break
    return outcomes  # type: ignore[return-value]


def judge_round(active: list[int], images: Sequence[Image.Image], verdicts: Sequence[Verdict], last: bool) -> tuple[list[tuple[int, int, bool]], list[int]]:
    """Judge each active instance's image (images[n] is instance active[n]'s): (n, instance, success) for those that
    stop, at a success or in the last round, and the instances that go on."""
    verdict = [bool(verdicts[i]([images[n]])[0]) for n, i in enumerate(active)]
    done = [(n, i, ok) for n, (i, ok) in enumerate(zip(active, verdict)) if ok or last]
    return done, [i for i, ok in zip(active, verdict) if not (ok or last)]
