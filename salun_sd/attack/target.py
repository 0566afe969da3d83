"""The attacked model as the attack sees it: the erased network behind the base model's text encoders, scored
by the core's denoiser with the family's own training loss.

UnlearnDiffAtk uses the erased model as its own classifier: a prompt that brings the concept back is one
under which the erased network denoises a noised base-model image of the concept well. The loss is
`core.objectives.diffusion_loss` on the family's denoiser (ε, v, x0 or flow-matching target; the family's
noising at the index t of its training schedule; SDXL's pooled embedding and time ids, FLUX's guidance
embedding and packed latents), so it is the loss the erase trained and cannot drift from it.

A prompt under attack is `[BOS] prefix(k) prompt [EOS] pad...` in every CLIP encoder: the prompt is encoded
behind k placeholder words by the pipeline's own `encode_prompt`, and a hook on each encoder's token-embedding
layer puts the prefix in those slots. One relaxed one-hot per slot feeds every CLIP encoder (they share the
vocabulary; each through its own token table). T5 (SD3, FLUX) is outside that vocabulary: for the discrete
attack it reads the prefix as text (the decoded tokens before the prompt, re-encoded at every step, no gradient
through T5), so a typed prompt `<prefix text> <prompt>` gives T5 exactly what the search saw; the embedding
attack puts its own free prefix in front of T5's tokens. Many (prompt, seed) instances run as one batch:
their optimisations are independent (the loss is a sum of per-instance losses, each with its own draws).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from torch import nn

from salun_sd.core.objectives import Batch, diffusion_loss
from salun_sd.errors import UserError
from salun_sd.families.loading import family_of
from salun_sd.generation import ImageRequest, draw_images

TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
PLACEHOLDER = "x"  # one CLIP token per word; its embeddings are replaced by the prefix


def attack_pipeline(target: DiffusionPipeline, base: DiffusionPipeline) -> DiffusionPipeline:
    """The target's network, VAE and scheduler with the base model's text encoders and tokenizers, as
    src/tasks/classifier_.py pairs them (the target pipeline object is reused)."""
    if type(target) is not type(base):
        raise UserError(f"the attacked model is a {family_of(target).name} pipeline but the base is a {family_of(base).name} one")
    target.register_modules(**{name: getattr(base, name) for name in TEXT_COMPONENTS if name in target.components})
    target.set_progress_bar_config(disable=True)
    for module in target.components.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False).eval()
    return target


def schedule(num_train_timesteps: int, n: int) -> list[int]:
    """n evenly spaced indices into the training schedule starting at half a spacing (src/tasks/classifier_.py:
    sampled_t 10, 30, ..., 990 for DDPM); for SD3/FLUX the index selects the flow schedule's σ as training does."""
    step = max(1, num_train_timesteps // n)
    return list(range(step // 2, num_train_timesteps, step))[:n]


Encode = Callable[[DiffusionPipeline, list[str], list[str], torch.device], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class TextStreams:
    """A family's text encoders as the attack sees them, and its `encode_prompt` call. The returned keys are
    the pipeline's own call arguments (prompt_embeds, pooled_prompt_embeds)."""

    clip: tuple[str, ...]  # CLIP encoders: the discrete attack's vocabulary, prefix after BOS
    t5: str | None  # the T5 encoder, if the family has one
    encode: Encode  # (pipe, prompts for CLIP, prompts for T5, device) -> conditions


def _sd(pipe, clip: list[str], t5: list[str], device) -> dict[str, torch.Tensor]:
    return {"prompt_embeds": pipe.encode_prompt(clip, device, 1, False)[0]}


def _sdxl(pipe, clip: list[str], t5: list[str], device) -> dict[str, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(clip, clip, device, 1, False)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _sd3(pipe, clip: list[str], t5: list[str], device) -> dict[str, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(clip, clip, t5, device=device, do_classifier_free_guidance=False)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _flux(pipe, clip: list[str], t5: list[str], device) -> dict[str, torch.Tensor]:
    embeds, pooled, _ = pipe.encode_prompt(clip, t5, device=device)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


STREAMS = {
    "SD-1.x/2.x": TextStreams(("text_encoder",), None, _sd),
    "SDXL": TextStreams(("text_encoder", "text_encoder_2"), None, _sdxl),
    "SD3": TextStreams(("text_encoder", "text_encoder_2"), "text_encoder_3", _sd3),
    "FLUX.1": TextStreams(("text_encoder",), "text_encoder_2", _flux),
}


@dataclass
class Slots:
    """One instance's prefix: an embedding (k, d) per prefixed encoder, and for the discrete attack its token ids (k,)."""

    embeddings: list[torch.Tensor]
    ids: torch.Tensor | None = None


@contextmanager
def prefix_hook(encoder: nn.Module, prefix: torch.Tensor, start: int) -> Iterator[None]:
    """While active, the encoder's token embeddings get `prefix` (B, k, d): CLIP's placeholders at positions
    start..start+k are replaced (its pooled output reads the EOS position from the ids, which must not move);
    at start 0 (T5, no BOS, no pooling) the prefix is put in front and the last k positions (padding) dropped."""
    k = prefix.shape[1]

    def substitute(module, inputs, out):
        p = prefix.to(out.dtype)
        return torch.cat([out[:, :start], p, out[:, start + k :]] if start else [p, out[:, :-k]], dim=1)

    handle = encoder.get_input_embeddings().register_forward_hook(substitute)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Case:
    """One instance under attack: a prompt and image seed, the base model's reference latent, how images are drawn."""

    prompt: str
    words: list[int]  # the prompt's CLIP token ids, without BOS / EOS
    x0: torch.Tensor  # (1, C, h, w): the reference image's latent (VAE mean, the family's shift and scale; classifier_.py img2latent)
    request: ImageRequest  # how its images are drawn: seed, size, guidance (the generation layer's key)


class Victim:
    """The training loss of the attacked network under prefixes, and images drawn with them, for a batch of cases."""

    def __init__(self, pipe: DiffusionPipeline, k: int, timesteps: int, steps: int, resolution: int | None = None) -> None:
        family = family_of(pipe)
        self.pipe, self.k, self.steps = pipe, k, steps
        self.streams = STREAMS[family.name]
        self.network = family.network_of(pipe)
        self.device = self.network.device
        size = resolution or family.default_size(pipe)
        self.denoiser = family.denoiser(pipe, [], resolution=size).to(self.device)  # SDXL's time ids are those of training at this size
        self.timesteps = schedule(self.denoiser.num_train_timesteps, timesteps)
        self.clip = [getattr(pipe, name) for name in self.streams.clip if getattr(pipe, name, None) is not None]
        self.t5 = getattr(pipe, self.streams.t5, None) if self.streams.t5 else None
        # the discrete attack's token tables (one per CLIP encoder, same vocabulary) and every prefixed encoder's, for the embedding attack
        self.clip_tables = [e.get_input_embeddings().weight.detach().float() for e in self.clip]
        self.tables = self.clip_tables + ([self.t5.get_input_embeddings().weight.detach().float()] if self.t5 is not None else [])
        self.placeholders = " ".join([PLACEHOLDER] * k)

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    def prompt_tokens(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False).input_ids

    def case(self, request: ImageRequest, x0: torch.Tensor) -> Case:
        prompt = request.prompt
        words = self.prompt_tokens(prompt)
        slotted = self.tokenizer(f"{self.placeholders} {prompt}").input_ids
        if slotted[1 : 1 + self.k] != self.prompt_tokens(" ".join([PLACEHOLDER] * self.k)) or slotted[1 + self.k : -1] != words:
            raise AssertionError(f"the placeholders do not tokenise to {self.k} slots before {prompt!r}")
        return Case(prompt, words, x0.detach(), request)

    def text(self, cases: Sequence[Case], slots: Sequence[Slots] | None) -> dict[str, torch.Tensor]:
        """The family's conditions for each case under its prefix (None: the plain prompts), with gradients to the prefix."""
        plain = [c.prompt for c in cases]
        if slots is None:
            return self.streams.encode(self.pipe, plain, plain, self.device)
        clip = [f"{self.placeholders} {c.prompt}" for c in cases]
        # T5 reads the discrete prefix as text; the embedding prefix enters through its own slots
        t5 = [self.decode(s.ids, c) for s, c in zip(slots, cases)] if slots[0].ids is not None else plain
        prefixed = self.clip + ([self.t5] if self.t5 is not None and slots[0].ids is None else [])
        with ExitStack() as stack:
            for i, encoder in enumerate(prefixed):
                prefix = torch.stack([s.embeddings[i] for s in slots]).to(self.device)
                stack.enter_context(prefix_hook(encoder, prefix, start=1 if i < len(self.clip) else 0))
            return self.streams.encode(self.pipe, clip, t5, self.device)

    def decode(self, ids: torch.Tensor, case: Case) -> str:
        """The prompt with the prefix tokens as text, end-of-text tokens left out (text_grad_.py): the adversarial prompt a user would type."""
        eos = self.tokenizer.eos_token_id
        return self.tokenizer.decode([i for i in ids.tolist() + case.words if i != eos])

    def typed(self, case: Case, ids: torch.Tensor) -> Case:
        """The case with its prompt replaced by the prefix's prompt as typed: drawn from it, the pipeline re-tokenises the text."""
        text = self.decode(ids, case)
        return replace(case, prompt=text, words=self.prompt_tokens(text))

    def judged_images(self, cases: Sequence[Case], slots: Sequence[Slots]) -> list[Image.Image]:
        """The images an attack is judged on: the discrete prefix's prompt as typed, decoded and re-tokenised
        (text_grad_.py -> classifier_.py eval generate from the text); the embedding prefix's own embeddings."""
        if slots[0].ids is None:
            return self.images(cases, slots)
        return self.images([self.typed(c, s.ids) for c, s in zip(cases, slots)], None)

    def losses(self, cases: Sequence[Case], slots: Sequence[Slots] | None, t: Sequence[int], noise: torch.Tensor) -> torch.Tensor:
        """Per case, the family's training loss (core.objectives.diffusion_loss) of the reference latent at timestep index t."""
        dtype = self.network.dtype
        x0 = torch.cat([c.x0 for c in cases]).to(self.device, dtype)
        den = self.denoiser.with_text(self.text(cases, slots))
        batch = Batch(x0, torch.arange(len(cases), device=self.device), noise.to(self.device, dtype), torch.tensor(list(t), device=self.device))
        return diffusion_loss(den, self.network, batch)

    def noise(self, case: Case, generator: torch.Generator, n: int = 1) -> torch.Tensor:
        return torch.randn((n, *case.x0.shape[1:]), generator=generator, device=generator.device)

    @torch.no_grad()
    def reference_losses(self, cases: Sequence[Case], slots: Sequence[Slots] | None, seeds: Sequence[int], chunk: int = 8) -> list[float]:
        """Per case, the loss over the whole schedule with noise fixed by its seed: the same number for every prompt variant of a case."""
        out = []
        for i, case in enumerate(cases):
            noise = self.noise(case, torch.Generator(self.device).manual_seed(seeds[i]), len(self.timesteps))
            parts = []
            for j in range(0, len(noise), chunk):
                n = len(noise[j : j + chunk])
                parts.append(self.losses([case] * n, None if slots is None else [slots[i]] * n, self.timesteps[j : j + chunk], noise[j : j + chunk]))
            out.append(float(torch.cat(parts).mean()))
        return out

    def images(self, cases: Sequence[Case], slots: Sequence[Slots] | None) -> list[Image.Image]:
        """One image per case (its request's seed, size and guidance) under its prefix (None: the plain prompts), through the generation layer."""
        requests = [replace(c.request) for c in cases]  # distinct objects: a batch's requests name their cases
        position = {id(r): i for i, r in enumerate(requests)}

        def prompt_inputs(batch: list[ImageRequest]) -> dict[str, torch.Tensor]:
            members = [position[id(r)] for r in batch]
            return self.text([cases[i] for i in members], None if slots is None else [slots[i] for i in members])

        return draw_images(self.pipe, requests, self.steps, batch_size=len(cases), prompt_inputs=prompt_inputs)
