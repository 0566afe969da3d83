"""SD3 / SD3.5 and FLUX.1 transformers as core denoisers (rectified flow, joint text-image attention).

Each prompt is encoded once, as for SD: SD3 caches CLIP-L + CLIP-G hidden states (and T5's, or the
zeros the pipeline puts there without T5) with the two pooled CLIP outputs; FLUX caches T5 hidden
states and CLIP's pooled output. The latents are kept unpacked ([B, C, H, W], as the VAE gives
them); FLUX packs them into 2×2 patches and back inside `predict`, so x0, noise and target keep
one shape for every family.

Neither family has cross-attention: text and image tokens attend jointly. The "xattn" scope means
the text stream's projections in joint attention (add_q_proj, add_k_proj, add_v_proj, to_add_out):
the weights through which the prompt enters, the analogue of SD's attn2 to_k/to_v that ESD-x and
UCE edit. FLUX's single-stream blocks share one projection between text and image tokens, so there
it covers the double-stream blocks only. (SD3.5's `attn2` is a second image self-attention, not
cross-attention, so SD's rule `.attn2.` must not be used here.)
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from diffusers import FluxPipeline, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from torch import nn

from salun_sd.core.denoiser import FlowMatchDenoiser
from salun_sd.errors import UserError

TEXT_STREAM = (".attn.add_q_proj.", ".attn.add_k_proj.", ".attn.add_v_proj.", ".attn.to_add_out.")
# ESD-u's "noxattn" also leaves out the time (and pooled-text) embedding and the output layers, as the ESD code does for SD.
EMBEDDING_AND_OUTPUT = ("time_text_embed.", "norm_out.", "proj_out.")


def is_text_stream(name: str) -> bool:
    return any(part in name for part in TEXT_STREAM)


FLOW_SCOPES: dict[str, Callable[[str], bool]] = {
    "all": lambda name: True,
    "xattn": is_text_stream,
    "noxattn": lambda name: not is_text_stream(name) and not name.startswith(EMBEDDING_AND_OUTPUT),
}

# diffusers' train_dreambooth_flux.py trains FLUX-dev at this guidance-embedding value (--guidance_scale), FluxPipeline's default too.
FLUX_TRAIN_GUIDANCE = 3.5


class PromptTableFlowDenoiser(FlowMatchDenoiser):
    """A flow transformer whose condition id indexes tensors cached per prompt (prompt 0 is the empty prompt)."""

    scopes = FLOW_SCOPES

    def __init__(self, model: nn.Module, pipe_scheduler_config: dict, prompts: list[str], table: dict[str, torch.Tensor], timestep_scheme: str) -> None:
        # A fresh scheduler from the config: its timesteps/sigmas are the training schedule, untouched by sampling's set_timesteps.
        super().__init__(model, FlowMatchEulerDiscreteScheduler.from_config(pipe_scheduler_config), prompts.index(""), timestep_scheme)
        self.prompts = prompts
        self.table = table

    def to(self, device: torch.device | str) -> "PromptTableFlowDenoiser":
        self.table = {k: v.to(device) for k, v in self.table.items()}
        return self

    def cond_id(self, prompt: str) -> int:
        return self.prompts.index(prompt)

    def with_text(self, text: dict[str, torch.Tensor]) -> "PromptTableFlowDenoiser":
        """A view whose condition id i is the i-th prompt of `text` (the pipeline's encode_prompt outputs, e.g. the
        attack's prefixed prompts with gradients), so a caller uses the same predict and loss as training."""
        view = copy.copy(self)
        view.table = {**self.table, "embeddings": text["prompt_embeds"], "pooled": text["pooled_prompt_embeds"]}
        return view


class SD3Denoiser(PromptTableFlowDenoiser):
    """SD3Transformer2DModel: hidden states of the concatenated text encoders plus their pooled projections.

    Timesteps are drawn logit-normal (mean 0, std 1), train_dreambooth_sd3.py's default.
    """

    family = "the SD3 transformer"

    def __init__(self, transformer: nn.Module, scheduler_config: dict, prompts: list[str], embeddings: torch.Tensor, pooled: torch.Tensor) -> None:
        super().__init__(transformer, scheduler_config, prompts, {"embeddings": embeddings, "pooled": pooled}, "logit_normal")

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return model(
            hidden_states=x_t, timestep=self.model_timestep(t), encoder_hidden_states=self.table["embeddings"][cond], pooled_projections=self.table["pooled"][cond]
        ).sample


class FluxDenoiser(PromptTableFlowDenoiser):
    """FluxTransformer2DModel: T5 hidden states, CLIP's pooled output, position ids, and FLUX-dev's guidance embedding.

    Timesteps are drawn uniformly (train_dreambooth_flux.py's default weighting "none").

    FLUX-dev has no classifier-free guidance: it was distilled to take the guidance scale as an input
    and was never trained to be combined with an empty-prompt prediction. Its guided prediction is
    therefore one forward at guidance embedding 1 + w, the diffusers guidance_scale that SalUn's
    (1+w)·ε(x_t|c) − w·ε(x_t|∅) is (official w = 7.5, i.e. guidance_scale 8.5; w = 2.5 gives FLUX-dev's
    usual 3.5), so the saliency loss measures the prediction the model samples with, as it does
    for SD. FLUX-schnell (no guidance embedding, step-distilled) has no guidance to apply: its
    saliency loss is the conditional diffusion loss. Training forwards use FLUX_TRAIN_GUIDANCE.
    """

    family = "the FLUX transformer"

    def __init__(self, transformer: nn.Module, scheduler_config: dict, prompts: list[str], embeddings: torch.Tensor, pooled: torch.Tensor, text_ids: torch.Tensor) -> None:
        super().__init__(transformer, scheduler_config, prompts, {"embeddings": embeddings, "pooled": pooled, "text_ids": text_ids}, "none")
        self.guidance_embeds = bool(transformer.config.guidance_embeds)

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float = FLUX_TRAIN_GUIDANCE) -> torch.Tensor:
        b, c, h, w = x_t.shape
        if h % 2 or w % 2:
            raise UserError(f"FLUX packs latents in 2x2 patches: the latent size {h}x{w} must be even (choose data.resolution a multiple of 16)")
        out = model(
            hidden_states=pack_flux_latents(x_t),
            timestep=self.model_timestep(t) / 1000,  # FluxTransformer2DModel scales by 1000 itself (training script and pipeline alike)
            guidance=torch.full((b,), guidance, device=x_t.device) if self.guidance_embeds else None,
            pooled_projections=self.table["pooled"][cond],
            encoder_hidden_states=self.table["embeddings"][cond],
            txt_ids=self.table["text_ids"],
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype),
        ).sample
        return FluxPipeline._unpack_latents(out, h, w, vae_scale_factor=1)  # sizes given in latent units

    def guided_prediction(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float) -> torch.Tensor:
        return self.predict(model, x_t, t, cond, guidance=1 + guidance)


def pack_flux_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latents as FluxPipeline takes them: 2x2 patches, [B, h/2 * w/2, 4C]."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def encode_table(prompts: list[str], concept_words: list[str], family: str, encode: Callable[[list[str]], tuple[torch.Tensor, ...]], batch_size: int = 16) -> tuple[list[str], list[torch.Tensor]]:
    """The empty prompt and `prompts`, and each of encode's per-prompt outputs for them, concatenated on the CPU in fp32."""
    if concept_words:
        raise UserError(f"unlearn.method=fmn re-steers cross-attention maps; {family} has joint attention, which attention re-steering does not support")
    table = list(dict.fromkeys(["", *prompts]))
    with torch.no_grad():
        parts = [encode(table[i : i + batch_size]) for i in range(0, len(table), batch_size)]
    return table, [torch.cat([part[k] for part in parts]).float().cpu() for k in range(len(parts[0]))]


def sd3_denoiser(pipe: StableDiffusion3Pipeline, prompts: list[str], concept_words: list[str] = (), resolution: int = 1024) -> SD3Denoiser:
    """A denoiser over `prompts` plus the empty prompt, encoded once by the pipeline's own encode_prompt (no size conditions: `resolution` is unused)."""
    device = pipe.transformer.device
    table, (embeds, pooled) = encode_table(
        prompts, concept_words, SD3Denoiser.family, lambda batch: pipe.encode_prompt(batch, None, None, device=device, do_classifier_free_guidance=False)[::2]
    )
    return SD3Denoiser(pipe.transformer, pipe.scheduler.config, table, embeds, pooled)


def flux_denoiser(pipe: FluxPipeline, prompts: list[str], concept_words: list[str] = (), resolution: int = 1024) -> FluxDenoiser:
    """A denoiser over `prompts` plus the empty prompt, encoded once by the pipeline's own encode_prompt (image position ids are
    made per batch from the latent size, so `resolution` is unused)."""
    device = pipe.transformer.device
    table, (embeds, pooled) = encode_table(prompts, concept_words, FluxDenoiser.family, lambda batch: pipe.encode_prompt(batch, device=device)[:2])
    text_ids = torch.zeros(embeds.shape[1], 3)  # FluxPipeline.encode_prompt's: every text position at (0, 0, 0)
    return FluxDenoiser(pipe.transformer, pipe.scheduler.config, table, embeds, pooled, text_ids)
