"""The embedding-space attack: k free prefix embeddings in every text encoder (Pham et al., ICLR 2024,
"Circumventing Concept Erasure Methods for Text-to-Image Generative Models").

The same loss and schedule as the discrete attack, but no prompt need exist for the optimum: it is a
per-prompt, per-seed soft-prompt search that asks whether the concept is still reachable through the text
conditioning at all. Pham et al. learn a new word embedding by textual inversion on images of the concept;
here the k prefix embeddings of each encoder (both CLIPs of SDXL / SD3, and T5 where there is one) start at
that encoder's mean token embedding and see the same single reference image, so the two attacks differ only
in their search space.
"""

from __future__ import annotations

import torch

from salun_sd.attack.target import Slots


class EmbeddingPrefix:
    def __init__(self, token_tables: list[torch.Tensor], k: int, learning_rate: float) -> None:
        self.embeddings = [table.mean(dim=0, keepdim=True).repeat(k, 1).requires_grad_(True) for table in token_tables]
        self.optimizer = torch.optim.Adam(self.embeddings, lr=learning_rate)

    def prefix(self, generator: torch.Generator) -> Slots:
        return Slots(self.embeddings)

    def after_step(self) -> None:
        pass

    def final(self) -> Slots:
        return Slots([e.detach() for e in self.embeddings])
