"""UnlearnDiffAtk's search space: k relaxed one-hot vectors over the vocabulary, rounded to real tokens.

As src/attackers/text_grad_.py: start from the uniform distribution, Adam (lr 0.01, weight decay 0.1),
project each row back onto the probability simplex after every step, and in the forward pass
draw one token per row from its distribution with a straight-through gradient (hardtanh of the gradient with
respect to the one-hot). Images are drawn from the argmax tokens. One distribution per slot feeds every CLIP
encoder of the family (SDXL's and SD3's two share the vocabulary), each through its own token table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from salun_sd.attack.target import Slots


def project_simplex(a: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto {p : p >= 0, sum p = 1}: max(a - theta, 0), the row's theta found
    exactly by Michelot's algorithm (Condat 2016, sec. 2) in float64: theta = (sum of the support - 1) / its size,
    the support shrunk to the entries above theta until it holds. text_grad_.py finds the same theta by bisection
    over the whole vocabulary (a quarter of a toy-world attack's time); here after the first pass only the
    entries still above theta are touched (theta only grows)."""
    x = a.double().reshape(-1, a.shape[-1])
    thetas = []
    for row in x:
        v = row[row > (row.sum() - 1) / len(row)]  # the max is above, so never empty
        while True:
            theta = (v.sum() - 1) / len(v)  # below the mean of v, so some entry stays above it
            kept = v[v > theta]
            if len(kept) == len(v):
                break
            v = kept
        thetas.append(theta)
    return (x - torch.stack(thetas)[:, None]).clamp(min=0).reshape(a.shape).to(a.dtype)


class SampleStraightThrough(torch.autograd.Function):
    """Forward: one sampled token per row as a one-hot; backward: the clipped gradient passed straight to the
    distribution (text_grad_.py STERandSelect)."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return F.one_hot(tokens, probs.shape[-1]).to(probs.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.hardtanh(grad), None


def token_slots(tables: list[torch.Tensor], ids: torch.Tensor) -> Slots:
    """The prefix of real tokens `ids` (k,) in every CLIP encoder: what typing those tokens gives."""
    return Slots([table[ids] for table in tables], ids)


class DiscretePrefix:
    """k distributions over the CLIP vocabulary; each encoder's prefix is the rows of its token table they select."""

    def __init__(self, token_tables: list[torch.Tensor], k: int, learning_rate: float, weight_decay: float) -> None:
        self.tables = token_tables
        vocab = token_tables[0].shape[0]
        self.probs = torch.full((k, vocab), 1.0 / vocab, device=token_tables[0].device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.probs], lr=learning_rate, weight_decay=weight_decay)

    def _slots(self, one_hot: torch.Tensor) -> Slots:
        return Slots([one_hot @ table for table in self.tables], one_hot.detach().argmax(dim=-1))

    def prefix(self, generator: torch.Generator) -> Slots:
        return self._slots(SampleStraightThrough.apply(self.probs, generator))

    def after_step(self) -> None:
        with torch.no_grad():
            self.probs.copy_(project_simplex(self.probs))

    def final(self) -> Slots:
        """The argmax tokens (text_grad_.py argmax_project): the prefix images are drawn with."""
        return token_slots(self.tables, self.probs.detach().argmax(dim=-1))
