"""Stable Diffusion's UNet (SD-1.x/2.x, SDXL) as a core Denoiser: condition ids index a table of cached text conditions.

Prompts are encoded once, so the text encoders are out of the training step (and off the GPU).
"""

from __future__ import annotations

import copy

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn

from salun_sd.core.denoiser import Denoiser
from salun_sd.errors import UserError
from salun_sd.families.attention import concept_token_mask, recording

# The time conditioning and the output layers: ESD-u leaves them out (ESD code: time_embed, out.).
UNET_TIME_AND_OUTPUT = ("time_embedding.", "add_embedding.", "conv_norm_out.", "conv_out.")


class TextConditionedDenoiser(Denoiser):
    scopes = {
        "all": lambda name: True,
        "xattn": lambda name: ".attn2." in name,  # cross-attention of the UNet's transformer blocks
        "noxattn": lambda name: ".attn2." not in name and not name.startswith(UNET_TIME_AND_OUTPUT),  # ESD-u
    }
    family = "the Stable Diffusion UNet"

    def __init__(self, unet: nn.Module, noise_scheduler, prompts: list[str], embeddings: torch.Tensor, concept_tokens: torch.Tensor | None = None) -> None:
        super().__init__(unet, noise_scheduler, null_cond=prompts.index(""))
        self.prompts = prompts
        self.embeddings = embeddings
        self.concept_tokens = concept_tokens  # [prompts, tokens] bool: where each prompt names the erased concept

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return model(x_t, t, encoder_hidden_states=self.embeddings[cond]).sample

    def set_attention(self, kind: str) -> None:
        """sdpa: torch's fused kernels; eager: materialised softmax, as the official code; xformers: CUDA only."""
        if kind == "xformers":
            try:
                self.model.enable_xformers_memory_efficient_attention()
            except (ImportError, ValueError) as err:
                raise UserError(f"unlearn.attention=xformers is unavailable here ({err}); it needs CUDA and pip install 'salun-sd[xformers]'") from None
            return
        self.model.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())

    def concept_attention(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Per example, the norm of the cross-attention probabilities on its prompt's concept tokens."""
        if self.concept_tokens is None:
            raise UserError("this denoiser was built without concept words (data.concept_words)")
        with recording(model, self.concept_tokens[cond]) as total:
            self.predict(model, x_t, t, cond)
        return total.sqrt()

    def to(self, device: torch.device | str) -> "TextConditionedDenoiser":
        self.embeddings = self.embeddings.to(device)
        if self.concept_tokens is not None:
            self.concept_tokens = self.concept_tokens.to(device)
        return self

    def cond_id(self, prompt: str) -> int:
        return self.prompts.index(prompt)

    def with_text(self, text: dict[str, torch.Tensor]) -> "TextConditionedDenoiser":
        """A view whose condition id i is the i-th prompt of `text` (the pipeline's encode_prompt outputs, e.g. the
        attack's prefixed prompts with gradients), so a caller uses the same predict and loss as training."""
        view = copy.copy(self)
        view.embeddings, view.concept_tokens = text["prompt_embeds"], None
        return view


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Last hidden states of the text encoder for each prompt, as the SD UNet consumes them."""
    tok = pipe.tokenizer
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tok(prompts[i : i + batch_size], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        out.append(pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].float().cpu())
    return torch.cat(out)


def sd_denoiser(pipe: StableDiffusionPipeline, prompts: list[str], concept_words: list[str] = (), resolution: int = 512) -> TextConditionedDenoiser:
    """A denoiser over `prompts` plus the empty prompt (the unconditional branch of guidance).

    With `concept_words`, it also knows which tokens of each prompt name the concept (for attention re-steering).
    SD-1/2 take no size conditions, so `resolution` is unused.
    """
    table = list(dict.fromkeys(["", *prompts]))
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    tokens = concept_token_mask(pipe.tokenizer, table, list(concept_words)) if concept_words else None
    return TextConditionedDenoiser(pipe.unet, noise_scheduler, table, encode_prompts(pipe, table), tokens)


class SDXLDenoiser(TextConditionedDenoiser):
    """SDXL's UNet also takes the pooled text embedding and six size/crop numbers (its "added conditions")."""

    family = "the SDXL UNet"

    def __init__(self, unet: nn.Module, noise_scheduler, prompts: list[str], embeddings: torch.Tensor, pooled: torch.Tensor,
                 time_ids: torch.Tensor, concept_tokens: torch.Tensor | None = None) -> None:
        super().__init__(unet, noise_scheduler, prompts, embeddings, concept_tokens)
        self.pooled = pooled  # [prompts, projection dim]: the second text encoder's pooled output
        self.time_ids = time_ids  # [6]: original size, crop top-left, target size

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        added = {"text_embeds": self.pooled[cond], "time_ids": self.time_ids.expand(len(cond), -1)}
        return model(x_t, t, encoder_hidden_states=self.embeddings[cond], added_cond_kwargs=added).sample

    def with_text(self, text: dict[str, torch.Tensor]) -> "SDXLDenoiser":
        view = super().with_text(text)
        view.pooled = text["pooled_prompt_embeds"]
        return view

    def to(self, device: torch.device | str) -> "SDXLDenoiser":
        super().to(device)
        self.pooled, self.time_ids = self.pooled.to(device), self.time_ids.to(device)
        return self


@torch.no_grad()
def sdxl_text_states(pipe: StableDiffusionXLPipeline, prompts: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own encode_prompt of each prompt: (both encoders' penultimate states concatenated, the second's pooled output)."""
    chunks = [pipe.encode_prompt(prompts[i : i + batch_size], device=pipe.unet.device, do_classifier_free_guidance=False) for i in range(0, len(prompts), batch_size)]
    return torch.cat([c[0] for c in chunks]).float().cpu(), torch.cat([c[2] for c in chunks]).float().cpu()


@torch.no_grad()
def sdxl_denoiser(pipe: StableDiffusionXLPipeline, prompts: list[str], concept_words: list[str] = (), resolution: int = 1024) -> SDXLDenoiser:
    """As sd_denoiser, with both text encoders through the pipeline's own encode_prompt (penultimate states of
    each, concatenated; pooled output of the second).

    The empty prompt is all zeros where the pipeline's force_zeros_for_empty_prompt says so (SDXL base), as the
    pipeline's unconditional branch is at inference. The time ids are what the pipeline passes for a square image
    of `resolution` (original = target size, no crop): every training image is resized and center-cropped to that.
    """
    table = list(dict.fromkeys(["", *prompts]))
    embeddings, pooled = sdxl_text_states(pipe, table)
    if pipe.config.force_zeros_for_empty_prompt:
        embeddings[0], pooled[0] = 0, 0
    time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
    tokens = concept_token_mask(pipe.tokenizer, table, list(concept_words)) if concept_words else None
    return SDXLDenoiser(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), table, embeddings, pooled, time_ids, tokens)
