"""Reading how much a UNet's cross-attention attends to chosen prompt tokens (Forget-Me-Not's signal).

Fused attention kernels never materialise the attention probabilities, so for one forward pass
`concept_attention` puts an explicit-softmax processor on every cross-attention layer (diffusers'
`attn2`), sums the squared probabilities that fall on the concept tokens, and restores the layers'
own processors afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from salun_sd.errors import UserError


class ConceptAttentionProcessor:
    """Cross-attention that also adds Σ p² over heads, queries and the concept tokens, per example, to `total`."""

    def __init__(self, token_mask: torch.Tensor, total: torch.Tensor) -> None:
        self.token_mask = token_mask  # [batch, tokens] bool: which text positions belong to the concept
        self.total = total  # [batch] running sum, shared by every layer of one forward pass

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None or encoder_hidden_states is None:
            raise UserError("attention re-steering supports SD-style cross-attention (3-D tokens, no group or spatial norm)")
        residual = hidden_states
        batch = hidden_states.shape[0]
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # [batch * heads, queries, tokens], batch-major
        on_concept = probs.view(batch, -1, *probs.shape[1:]) * self.token_mask[:, None, None, :]
        self.total += on_concept.float().pow(2).sum((1, 2, 3))
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_layers(model: nn.Module) -> list[Attention]:
    return [m for name, m in model.named_modules() if isinstance(m, Attention) and name.endswith("attn2")]


@contextmanager
def recording(model: nn.Module, token_mask: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield a [batch] tensor that a forward pass of `model` inside the block fills with Σ p² on the concept tokens."""
    if hasattr(model, "_orig_mod"):
        raise UserError("unlearn.method=fmn reads attention maps, which a torch.compile'd UNet hides: set unlearn.compile=false")
    layers = cross_attention_layers(model)
    if not layers:
        raise UserError(f"{type(model).__name__} has no cross-attention layers (attn2) to re-steer")
    total = torch.zeros(len(token_mask), device=token_mask.device)
    originals = [layer.processor for layer in layers]
    for layer in layers:
        layer.set_processor(ConceptAttentionProcessor(token_mask, total))
    try:
        yield total
    finally:
        for layer, processor in zip(layers, originals):
            layer.set_processor(processor)


def concept_token_mask(tokenizer, prompts: list[str], words: list[str]) -> torch.Tensor:
    """[prompts, model_max_length] bool: the positions of `words`' tokens in each tokenized prompt, and the end-of-text ones.

    As the FMN code (`use_pooler: true`), a prompt that names the concept also has every end-of-text
    position steered: the text encoder's summary of the prompt sits there. SD-1.x's tokenizer pads with
    end-of-text, so on SD-1.x that includes the padding, as it does in FMN's code (SD-2's pads with "!").
    A prompt mentioning none of the words gets an all-False row, so attention re-steering leaves it alone.
    """
    ids = torch.tensor(tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids)
    mask = torch.zeros(len(prompts), tokenizer.model_max_length, dtype=torch.bool)
    for word in words:
        pieces = torch.tensor(tokenizer(word, add_special_tokens=False).input_ids)
        for start in range(tokenizer.model_max_length - len(pieces) + 1):
            mask[:, start : start + len(pieces)] |= (ids[:, start : start + len(pieces)] == pieces).all(1, keepdim=True)
    return mask | ((ids == tokenizer.eos_token_id) & mask.any(1, keepdim=True))
