"""UnlearnDiffAtk's search space: k relaxed one-hot vectors over the vocabulary, rounded to real tokens.

As src/attackers/text_grad_.py: start from the uniform distribution, Adam (lr 0.01, weight decay 0.1),
project each row back onto the probability simplex by bisection after every step, and in the forward pass
draw one token per row from its distribution with a straight-through gradient (hardtanh of the gradient with
respect to the one-hot). Images are drawn from the argmax tokens. One distribution per slot feeds every CLIP
encoder of the family (SDXL's and SD3's two share the vocabulary), each through its own token table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from salun_sd.attack.target import Slots


def project_simplex(a: torch.Tensor, iterations: int = 64) -> torch.Tensor:
    """Euclidean projection of each row onto {p : p >= 0, sum p = 1}: clip(a - mu, 0, 1) with the row's mu
    found by bisection (text_grad_.py bisection with eps=1, ub=1; here all rows at once, in float64)."""
    x = a.double()
    lo = x.min(dim=-1, keepdim=True).values - 1  # sum of clip(a - lo, 0, 1) >= 1 (every entry >= 1)
    hi = x.max(dim=-1, keepdim=True).values  # sum of clip(a - hi, 0, 1) = 0
    for _ in range(iterations):
        mu = (lo + hi) / 2
        above = (x - mu).clamp(0, 1).sum(dim=-1, keepdim=True) > 1
        lo, hi = torch.where(above, mu, lo), torch.where(above, hi, mu)
    p = (x - (lo + hi) / 2).clamp(0, 1)
    return (p / p.sum(dim=-1, keepdim=True)).to(a.dtype)  # the rescale only removes the bisection's last rounding


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
