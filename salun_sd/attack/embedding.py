"""The embedding-space attack: k free prefix embeddings (Pham et al., ICLR 2024, "Circumventing Concept
Erasure Methods for Text-to-Image Generative Models").

The same loss and schedule as the discrete attack, but no prompt need exist for the optimum: it asks whether
the concept is still inside the UNet at all, so its success rate is an upper bound on any prompt's. Pham et
al. learn a new word embedding by textual inversion on images of the concept; here the k prefix embeddings
start where the discrete attack starts (the mean token embedding) and see the same single reference image,
so the two attacks differ only in their search space.
"""

from __future__ import annotations

import torch


class EmbeddingPrefix:
    def __init__(self, token_table: torch.Tensor, k: int, learning_rate: float) -> None:
        self.embeddings = token_table.mean(dim=0, keepdim=True).repeat(k, 1).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.embeddings], lr=learning_rate)

    def prefix(self, generator: torch.Generator) -> torch.Tensor:
        return self.embeddings

    def after_step(self) -> None:
        pass

    def final(self) -> tuple[torch.Tensor, None]:
        return self.embeddings.detach(), None
