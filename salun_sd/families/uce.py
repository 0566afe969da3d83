"""UCE (Gandikota et al., WACV 2024): erase concepts by a closed-form edit of the UNet's cross-attention key and value projections.

It lives with the families because what it edits is family knowledge: every `attn2.to_k` / `attn2.to_v` of an SD-1/2 or
SDXL UNet reads the text encoder's token states c directly (SDXL: both encoders' states, concatenated), so for each
projection W one regularised least-squares problem says what the concept's tokens should map to:

    W* = argmin_W'  s_e Σ_i ‖W'c_i − W c*_i‖² + s_p Σ_j ‖W'c_j − W c_j‖² + λ‖W' − W‖²
       = W (λI + s_e Σ c*_i c_iᵀ + s_p Σ c_j c_jᵀ)(λI + s_e Σ c_i c_iᵀ + s_p Σ c_j c_jᵀ)⁻¹

with c_i an erased token, c*_i the target token it is sent to (the paper's v*_i = W c*_i: the projections have no bias),
c_j a preserved token. The right-hand factor depends only on the text states, not on the layer, so it is solved once in
float64 and every projection is multiplied by it; the official code inverts the same matrix once per layer in float32.
Nothing else of the UNet changes, and there is no data, mask or training loop.

Source: rohitgandikota/unified-concept-editing, trainscripts/uce_sd_erase.py (HEAD 28c81ed; `uce.tokens last`), and the
paper-era train-scripts/train_erase.py `edit_model` (`uce.tokens trailing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DiffusionPipeline
from torch import nn

from salun_sd.errors import UserError
from salun_sd.families.attention import cross_attention_layers
from salun_sd.families.config import UCEConfig

NO_CROSS_ATTENTION = (
    "method uce edits the cross-attention key/value projections (attn2.to_k/to_v) that read the text encoder's states; {family}'s joint "
    "attention reads text states that earlier blocks have already transformed, so the closed form has no fixed input there"
)


@dataclass
class Concept:
    """One erased concept: the texts whose tokens are edited (its words) and the texts whose original keys/values they take."""

    words: list[str]
    targets: list[str]  # [""]: the empty prompt; several: their average


def projections(unet: nn.Module) -> list[nn.Linear]:
    """What UCE edits: every cross-attention key and value projection."""
    return [proj for layer in cross_attention_layers(unet) for proj in (layer.to_k, layer.to_v)]


def preserved_rows(states: torch.Tensor, last: int, tokens: str) -> torch.Tensor:
    """A preserved text's rows: its last word token (`last`), or with tokens=trailing every token (train_erase.py)."""
    return states[last : last + 1] if tokens == "last" else states


def erase_pair(source: torch.Tensor, source_last: int, target: torch.Tensor, target_last: int, tokens: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The erased rows and the target rows they are sent to: the last word token of each (uce_sd_erase.py), or with
    tokens=trailing every token from it on, the two aligned at their last words and cut to the same length (train_erase.py)."""
    if tokens == "last":
        return source[source_last : source_last + 1], target[target_last : target_last + 1]
    length = len(source) - max(source_last, target_last)
    return source[source_last : source_last + length], target[target_last : target_last + length]


def edit_map(erase: list[tuple[tuple[torch.Tensor, torch.Tensor], float]], preserve: list[torch.Tensor], cfg: UCEConfig, dim: int) -> torch.Tensor:
    """The [dim, dim] factor M = (λI + s_e Σ c* cᵀ + s_p Σ c cᵀ)(λI + s_e Σ c cᵀ + s_p Σ c cᵀ)⁻¹ with W* = W M.

    `erase` holds ((erased rows, target rows), weight), `preserve` preserved rows, each [n, dim]; a concept with k targets
    contributes k pairs at weight 1 / k, i.e. one pair to the mean target."""
    eye = torch.eye(dim, dtype=torch.float64)
    lhs, rhs = cfg.lamb * eye, cfg.lamb * eye
    for (source, target), weight in erase:
        lhs += cfg.erase_scale * weight * target.T @ source
        rhs += cfg.erase_scale * weight * source.T @ source
    for rows in preserve:
        lhs += cfg.preserve_scale * rows.T @ rows
        rhs += cfg.preserve_scale * rows.T @ rows
    return torch.linalg.solve(rhs, lhs.T).T  # lhs · rhs⁻¹ (rhs is symmetric)


@torch.no_grad()
def uce_edit(pipe: DiffusionPipeline, text_states: Callable[..., torch.Tensor], concepts: list[Concept], preserve: list[str], cfg: UCEConfig) -> nn.Module:
    """Edit `pipe.unet`'s cross-attention key/value projections in place and return the UNet.

    `text_states(pipe, texts)` gives the [texts, tokens, dim] states the cross-attention reads; token positions come from
    `pipe.tokenizer` (SDXL: the first one, as UCE's code). With tokens=trailing and nothing preserved, the empty prompt is
    preserved whole, as train_erase.py does."""
    preserve = preserve or ([""] if cfg.tokens == "trailing" else [])
    texts = list(dict.fromkeys([t for c in concepts for t in (*c.words, *c.targets)] + preserve))
    states = text_states(pipe, texts).double().cpu()
    counts = pipe.tokenizer(texts, padding="max_length", max_length=states.shape[1], truncation=True).attention_mask
    last = {text: sum(mask) - 2 for text, mask in zip(texts, counts)}  # the last word's position (the start token's for ""): UCE's attention_mask.sum() - 2
    row = {text: states[i] for i, text in enumerate(texts)}
    erase = [(erase_pair(row[w], last[w], row[t], last[t], cfg.tokens), 1 / len(c.targets)) for c in concepts for w in c.words for t in c.targets]
    kept = [preserved_rows(row[p], last[p], cfg.tokens) for p in preserve]
    layers = projections(pipe.unet)
    if not layers or any(p.in_features != states.shape[-1] for p in layers):
        raise UserError(f"method uce needs cross-attention projections reading the {states.shape[-1]}-dim text states; {type(pipe.unet).__name__} has {len(layers)} that do not all")
    factor = edit_map(erase, kept, cfg, states.shape[-1])
    for proj in layers:
        proj.weight.copy_((proj.weight.double() @ factor.to(proj.weight.device)).to(proj.weight.dtype))
    return pipe.unet
