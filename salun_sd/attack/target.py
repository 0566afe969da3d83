"""The attacked model as the attack sees it: the erased UNet behind the base model's text encoder.

UnlearnDiffAtk uses the erased model as its own classifier: a prompt that brings the concept back is one
under which the erased UNet predicts the noise of a noised base-model image of the concept well. A prompt is
`[BOS] prefix(k) prompt [EOS] pad...`; the k prefix slots take any embeddings (a token's, a mixture of
tokens', or free ones), substituted at the token-embedding layer so the text encoder runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image


def attack_pipeline(target: StableDiffusionPipeline, base: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """The target's UNet, VAE and scheduler with the base model's text encoder and tokenizer, as src/tasks/classifier_.py pairs them."""
    pipe = StableDiffusionPipeline(**{**target.components, "text_encoder": base.text_encoder, "tokenizer": base.tokenizer}, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    return pipe


def schedule(num_train_timesteps: int, n: int) -> list[int]:
    """n evenly spaced timesteps starting at half a spacing (src/tasks/classifier_.py: sampled_t)."""
    step = max(1, num_train_timesteps // n)
    return list(range(step // 2, num_train_timesteps, step))[:n]


@contextmanager
def prefix_embeddings(text_encoder, prefix: torch.Tensor | None) -> Iterator[None]:
    """While active, token positions 1..k of every prompt get `prefix` (k, d) instead of their token embeddings."""
    if prefix is None:
        yield
        return
    k = prefix.shape[0]

    def substitute(module, inputs, out):
        return torch.cat([out[:, :1], prefix.to(out.dtype).expand(out.shape[0], -1, -1), out[:, 1 + k :]], dim=1)

    handle = text_encoder.get_input_embeddings().register_forward_hook(substitute)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Case:
    """One prompt under attack: token ids with k prefix slots, the plain ids, the reference latent and how images are drawn."""

    prompt: str
    ids: torch.Tensor  # (1, 77): [BOS] slots(k) prompt [EOS] pad
    plain_ids: torch.Tensor  # (1, 77): the prompt as the tokenizer gives it
    x0: torch.Tensor  # (1, C, h, w): the reference image's latent (VAE mean x scaling factor, as classifier_.py img2latent)
    seed: int
    guidance: float
    height: int
    width: int


class Victim:
    """The diffusion loss of the attacked UNet under a prefix, and images drawn with a prefix."""

    def __init__(self, pipe: StableDiffusionPipeline, k: int, timesteps: int, steps: int) -> None:
        self.pipe, self.k, self.steps = pipe, k, steps
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.timesteps = schedule(self.noise_scheduler.config.num_train_timesteps, timesteps)
        self.token_table = pipe.text_encoder.get_input_embeddings().weight.detach().float()  # (vocab, d)
        self.device = pipe.unet.device
        tok = pipe.tokenizer
        self.uncond = self.encode(tok("", padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids)

    def prompt_tokens(self, prompt: str) -> list[int]:
        return self.pipe.tokenizer(prompt, add_special_tokens=False).input_ids

    def case(self, prompt: str, x0: torch.Tensor, seed: int, guidance: float, height: int, width: int) -> Case:
        tok = self.pipe.tokenizer
        words = self.prompt_tokens(prompt)
        n = tok.model_max_length
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        slots = [tok.bos_token_id, *[0] * self.k, *words, tok.eos_token_id]
        plain = [tok.bos_token_id, *words, tok.eos_token_id]
        as_ids = lambda ids: torch.tensor([ids + [pad] * (n - len(ids))])  # noqa: E731
        return Case(prompt, as_ids(slots), as_ids(plain), x0.detach(), seed, guidance, height, width)

    def encode(self, ids: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        with prefix_embeddings(self.pipe.text_encoder, prefix):
            return self.pipe.text_encoder(ids.to(self.device))[0]

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t)
        return noise

    def loss(self, case: Case, prefix: torch.Tensor | None, t: int | list[int], noise: torch.Tensor) -> torch.Tensor:
        """MSE between the noise and the UNet's prediction on the noised reference latent (classifier_.py get_loss)."""
        t = torch.tensor([t] if isinstance(t, int) else t, device=self.device)
        x0 = case.x0.to(self.device, torch.float32).expand(len(t), -1, -1, -1)
        noise = noise.to(self.device, torch.float32)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        ids = case.ids if prefix is not None else case.plain_ids
        cond = self.encode(ids, prefix).expand(len(t), -1, -1)
        pred = self.pipe.unet(x_t.to(self.pipe.unet.dtype), t, encoder_hidden_states=cond).sample
        return F.mse_loss(pred.float(), self.target(x0, noise, t))

    def noise(self, case: Case, generator: torch.Generator, n: int = 1) -> torch.Tensor:
        return torch.randn((n, *case.x0.shape[1:]), generator=generator, device=generator.device)

    @torch.no_grad()
    def reference_loss(self, case: Case, prefix: torch.Tensor | None, seed: int, chunk: int = 8) -> float:
        """The loss over the whole schedule with fixed noise: the same number for every prompt variant of a case."""
        generator = torch.Generator(self.device).manual_seed(seed)
        noise = self.noise(case, generator, len(self.timesteps))
        parts = [self.loss(case, prefix, self.timesteps[i : i + chunk], noise[i : i + chunk]) * len(noise[i : i + chunk]) for i in range(0, len(noise), chunk)]
        return float(sum(parts) / len(noise))

    @torch.no_grad()
    def image(self, case: Case, prefix: torch.Tensor | None, ids: torch.Tensor | None = None) -> Image.Image:
        """One image of the case's seed; `ids` replaces the slot ids (a discrete prompt), `prefix` the slot embeddings."""
        ids = ids if ids is not None else (case.ids if prefix is not None else case.plain_ids)
        cond = self.encode(ids, prefix)
        return self.pipe(prompt_embeds=cond, negative_prompt_embeds=self.uncond, num_inference_steps=self.steps, guidance_scale=case.guidance,
                         height=case.height, width=case.width, generator=torch.Generator("cpu").manual_seed(case.seed)).images[0]
