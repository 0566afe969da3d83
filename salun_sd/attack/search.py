"""The UnlearnDiffAtk schedule, shared by both search spaces: for each timestep of a fixed list, some
optimiser steps on the training loss at that timestep (fresh noise each step), then one image from the
current prompt, judged; stop at the first success (src/attackers/text_grad_.py run, sequential mode).

Many instances (prompt, seed) run together: one forward and backward per step for all that have not yet
succeeded, their search variables stacked under one optimiser. Each has its own generator, the batch's loss is
the sum of the per-instance losses and Adam is elementwise, so an instance's gradients, draws and result are
those it would have alone (up to the float rounding of a batched forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from salun_sd.attack.judges import Verdict
from salun_sd.attack.target import Case, Slots, Victim


class StackedAdam:
    """One Adam over per-instance variables stacked along their first dimension (row n: the n-th active instance).
    Adam works elementwise and every active row has taken every step (one shared step count), so each row moves
    as a lone instance's would; `keep` drops the finished rows with their moments, so they never move again."""

    def __init__(self, tensors: list[torch.Tensor], **settings) -> None:
        self.tensors = [t.requires_grad_(True) for t in tensors]
        self.optimizer = torch.optim.Adam(self.tensors, **settings)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.tensors[0].device)
        kept = [t.detach()[index].requires_grad_(True) for t in self.tensors]
        for old, new in zip(self.tensors, kept):
            state = self.optimizer.state.pop(old, {})
            self.optimizer.state[new] = {name: value[index] if value.shape == old.shape else value for name, value in state.items()}  # the moments; the step count stays
        self.optimizer.param_groups[0]["params"] = kept
        self.tensors = kept


class Prefixes(Protocol):
    """The search variables of a batch of instances, row n for the n-th still active one."""

    def prefixes(self, generators: Sequence[torch.Generator]) -> list[Slots]: ...  # generators[n]: row n's draws

    def step(self) -> None: ...  # after the backward pass: one optimiser step of every row

    def keep(self, rows: list[int]) -> None: ...  # only these rows go on

    def finals(self) -> list[Slots]: ...  # what each row's image is drawn with


@dataclass
class Outcome:
    success: bool
    image: Image.Image
    slots: Slots  # what the image was drawn with (the discrete attack's ids included)
    blocks: int  # timestep blocks run
    loss_trace: list[float]  # mean training loss per block


def search(victim: Victim, cases: Sequence[Case], space: Prefixes, iterations: int, verdicts: Sequence[Verdict],
           generators: Sequence[torch.Generator]) -> list[Outcome]:
    """Attack every case, row i of `space`; `verdicts[i]` judges case i's images, `generators[i]` makes its draws."""
    traces: list[list[float]] = [[] for _ in cases]
    outcomes: list[Outcome | None] = [None] * len(cases)
    active = list(range(len(cases)))
    for block, t in enumerate(victim.timesteps, start=1):
        totals = torch.zeros(len(active), dtype=torch.float64)
        for _ in range(iterations):
            slots = space.prefixes([generators[i] for i in active])  # each generator: its token draw, then its noise, as alone
            noise = torch.cat([victim.noise(cases[i], generators[i]) for i in active])
            losses = victim.losses([cases[i] for i in active], slots, [t] * len(active), noise)
            losses.sum().backward()
            space.step()
            totals += losses.detach().cpu().double()
        finals = space.finals()
        images = victim.judged_images([cases[i] for i in active], finals)
        for n, i in enumerate(active):
            traces[i].append(float(totals[n]) / iterations)
        done, going = judge_round(active, images, verdicts, last=block == len(victim.timesteps))
        for n, i, success in done:
            outcomes[i] = Outcome(success, images[n], finals[n], block, traces[i])
        if not going:
            break
        still = set(going)
        space.keep([n for n, i in enumerate(active) if i in still])
        active = going
    return outcomes  # type: ignore[return-value]


def judge_round(active: list[int], images: Sequence[Image.Image], verdicts: Sequence[Verdict], last: bool) -> tuple[list[tuple[int, int, bool]], list[int]]:
    """Judge each active instance's image (images[n] is instance active[n]'s): (n, instance, success) for those that
    stop, at a success or in the last round, and the instances that go on."""
    verdict = [bool(verdicts[i]([images[n]])[0]) for n, i in enumerate(active)]
    done = [(n, i, ok) for n, (i, ok) in enumerate(zip(active, verdict)) if ok or last]
    return done, [i for i, ok in zip(active, verdict) if not (ok or last)]
