"""The embedding-space attack: k free prefix embeddings in every text encoder (Pham et al., ICLR 2024,
"Circumventing Concept Erasure Methods for Text-to-Image Generative Models").

The same loss and schedule as the discrete attack, but no prompt need exist for the optimum: it is a
per-prompt, per-seed soft-prompt search that asks whether the concept is still reachable through the text
conditioning at all. Pham et al. learn a new word embedding by textual inversion on images of the concept;
here the k prefix embeddings of each encoder (both CLIPs of SDXL / SD3, and T5 where there is one) start at
that encoder's mean token embedding and see the same single reference image, so the two attacks differ only
in their search space. Every instance of a batch is one row of a stack per encoder, under one Adam (search.StackedAdam).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from salun_sd.attack.search import StackedAdam
from salun_sd.attack.target import Slots


class EmbeddingPrefixes:
    def __init__(self, token_tables: list[torch.Tensor], count: int, k: int, learning_rate: float) -> None:
        self.adam = StackedAdam([table.mean(dim=0)[None, None].repeat(count, k, 1) for table in token_tables], lr=learning_rate)

    def prefixes(self, generators: Sequence[torch.Generator]) -> list[Slots]:
        return [Slots([e[n] for e in self.adam.tensors]) for n in range(len(generators))]

    def step(self) -> None:
        self.adam.step()

    def keep(self, rows: list[int]) -> None:
        self.adam.keep(rows)

    def finals(self) -> list[Slots]:
        return [Slots([e[n].detach() for e in self.adam.tensors]) for n in range(len(self.adam.tensors[0]))]
