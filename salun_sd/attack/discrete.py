"""UnlearnDiffAtk's search space: k relaxed one-hot vectors over the vocabulary, rounded to real tokens.

As src/attackers/text_grad_.py: start from the uniform distribution, Adam (lr 0.01, weight decay 0.1),
project each row back onto the probability simplex after every step, and in the forward pass
draw one token per row from its distribution with a straight-through gradient (hardtanh of the gradient with
respect to the one-hot). Images are drawn from the argmax tokens. One distribution per slot feeds every CLIP
encoder of the family (SDXL's and SD3's two share the vocabulary), each through its own token table.

Every instance of a batch is one row of an (instances, k, vocabulary) stack: one Adam step, one projection call
and one draw for all of them, each row's numbers those it would have alone (search.StackedAdam).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from salun_sd.attack.search import StackedAdam
from salun_sd.attack.target import Slots


def project_simplex(a: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row (last dimension) onto {p : p >= 0, sum p = 1}: max(a - theta, 0), the row's
    theta found exactly by Michelot's algorithm (Condat 2016, sec. 2) in float64: theta = (sum of the support - 1) /
    its size, the support shrunk to the entries above theta until it holds. text_grad_.py finds the same theta by
    bisection over the whole vocabulary; here after the first pass only the entries still above theta are touched
    (theta only grows). One row at a time, start to end (a row in float64 stays in cache; a whole stack does not):
    each row's result is its own whatever rows share the call. Masked iterations over the whole stack, a full sort
    and a top-m sort were all slower on the toy world's stacks (docs/BENCHMARKS.md)."""
    x = a.reshape(-1, a.shape[-1])
    out = torch.empty_like(x)
    for row, dest in zip(x, out):
        r = row.double()
        v = r[r > (r.sum() - 1) / len(r)]  # the max is above, so never empty
        while True:
            theta = (v.sum() - 1) / len(v)  # below the mean of v, so some entry stays above it
            kept = v[v > theta]
            if len(kept) == len(v):
                break
            v = kept
        dest.copy_((r - theta).clamp_(min=0))
    return out.reshape(a.shape)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (..., V), by inverting its cumulative distribution at `uniforms` (...) in [0, 1):
    index j where cdf[j-1] <= u * total < cdf[j], so a token of probability 0 is never drawn. The distribution of
    text_grad_.py's torch.multinomial(probs, 1), which spends an exponential draw per vocabulary entry (about half
    the discrete step's time on the toy world); this spends one uniform per row."""
    cdf = probs.cumsum(-1)  # each row on its own, in order
    tokens = torch.searchsorted(cdf, (uniforms * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return tokens.clamp(max=probs.shape[-1] - 1)


class SampleStraightThrough(torch.autograd.Function):
    """Forward: one sampled token per row as a one-hot; backward: the clipped gradient passed straight to the
    distribution (text_grad_.py STERandSelect)."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        return F.one_hot(draw(probs, uniforms), probs.shape[-1]).to(probs.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.hardtanh(grad), None


def token_slots(tables: list[torch.Tensor], ids: torch.Tensor) -> Slots:
    """The prefix of real tokens `ids` (k,) in every CLIP encoder: what typing those tokens gives."""
    return Slots([table[ids] for table in tables], ids)


class DiscretePrefixes:
    """Per instance, k distributions over the CLIP vocabulary; each encoder's prefix is the rows of its token table they select."""

    def __init__(self, token_tables: list[torch.Tensor], count: int, k: int, learning_rate: float, weight_decay: float) -> None:
        self.tables, self.k = token_tables, k
        vocab = token_tables[0].shape[0]
        self.adam = StackedAdam([torch.full((count, k, vocab), 1.0 / vocab, device=token_tables[0].device)], lr=learning_rate, weight_decay=weight_decay)

    def prefixes(self, generators: Sequence[torch.Generator]) -> list[Slots]:
        """The active instances' sampled prefixes; generators[n] makes row n's k draws (k uniforms, as alone)."""
        (probs,) = self.adam.tensors
        uniforms = torch.stack([torch.rand(self.k, generator=g, device=g.device) for g in generators]).to(probs.device)
        one_hot = SampleStraightThrough.apply(probs, uniforms)
        embeddings, ids = [one_hot @ table for table in self.tables], one_hot.detach().argmax(dim=-1)
        return [Slots([e[n] for e in embeddings], ids[n]) for n in range(len(ids))]

    def step(self) -> None:
        self.adam.step()
        (probs,) = self.adam.tensors
        with torch.no_grad():
            probs.copy_(project_simplex(probs))

    def keep(self, rows: list[int]) -> None:
        self.adam.keep(rows)

    def finals(self) -> list[Slots]:
        """The argmax tokens (text_grad_.py argmax_project): the prefixes images are drawn with."""
        return [token_slots(self.tables, ids) for ids in self.adam.tensors[0].detach().argmax(dim=-1)]
