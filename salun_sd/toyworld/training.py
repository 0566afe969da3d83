"""Training the toy pipeline: the VAE on drawn images, then UNet (+ text encoder) on cached latents.

Kept out of the script so the pieces (sampling + scoring with the classifier in particular) can be
reused by the comparison and the tests. The diffusion loop draws a fresh subset of its cached
latents each step, drops the prompt for 10 % of examples (classifier-free guidance), and keeps an
EMA of the weights it trains, which is what gets evaluated and saved.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from salun_sd.toyworld.classifier import ToyClassifier
from salun_sd.sd.tiny import assemble
from salun_sd.toyworld.pipeline import ToySDConfig, build_scheduler
from salun_sd.toyworld.world import WorldSpec, prompts, sample, to_tensor


def train_vae(vae: AutoencoderKL, spec: WorldSpec, steps: int, batch_size: int = 64, lr: float = 2e-3, kl_weight: float = 1e-4, seed: int = 0, log=print) -> AutoencoderKL:
    """MSE reconstruction + a small KL on fresh drawn batches; then set scaling_factor so latents have unit std."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    chunk = 16
    for step in range(steps):
        if step % chunk == 0:
            xs = to_tensor(sample(chunk * batch_size, 7_000_000 + seed * 100_003 + step, spec).images)
        x = xs[(step % chunk) * batch_size : (step % chunk + 1) * batch_size]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + kl_weight * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"vae step {step + 1}/{steps} loss {loss.item():.5f}")
    vae.eval()
    with torch.no_grad():
        lat = vae.encode(to_tensor(sample(2048, 99, spec).images)).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    return vae


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, spec: WorldSpec, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latent means of `n` drawn images and each image's concept index into spec.concepts."""
    batch = sample(n, seed, spec)
    x = to_tensor(batch.images)
    lat = torch.cat([vae.encode(x[i : i + 512]).latent_dist.mode() for i in range(0, n, 512)]) * vae.config.scaling_factor
    concept = torch.from_numpy(batch.colour_ids * len(spec.shapes) + batch.shape_ids)
    return lat, concept


def tokenize(texts: list[str]) -> torch.Tensor:
    from salun_sd.sd.tiny import clip_tokenizer

    tok = clip_tokenizer()
    return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids


@dataclass
class DiffusionRecipe:
    """The levers of the diffusion stage (see docs and the script's --help)."""

    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    text_lr: float = 1e-3  # 0 freezes the text encoder
    uncond_prob: float = 0.1
    min_snr_gamma: float = 5.0  # min-SNR-gamma loss weighting; 0 disables it
    ema_decay: float = 0.999
    warmup: int = 100
    seed: int = 0


class EMA:
    """Exponential moving average of a module's float weights, with the usual warm-up of the decay."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p.detach(), 1 - d)


def train_diffusion(cfg: ToySDConfig, vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel, latents: torch.Tensor, concept: torch.Tensor,
                    spec: WorldSpec, recipe: DiffusionRecipe, on_eval=None, eval_every: int = 500, time_budget_s: float = math.inf, log=print):
    """Train UNet (and the text encoder when recipe.text_lr > 0); call `on_eval(step, pipeline_of_ema)` every eval_every steps."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    scheduler = build_scheduler(cfg)
    ac = scheduler.alphas_cumprod
    ids = tokenize(prompts(spec) + [""])  # row len(concepts) is the empty prompt
    null = len(ids) - 1
    train_text = recipe.text_lr > 0
    text_encoder.requires_grad_(train_text).train(train_text)
    groups = [{"params": list(unet.parameters()), "lr": recipe.lr}]
    if train_text:
        groups.append({"params": list(text_encoder.parameters()), "lr": recipe.text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup))
    ema_unet, ema_text = EMA(unet, recipe.ema_decay), EMA(text_encoder, recipe.ema_decay)
    start = time.time()
    unet.train()
    for step in range(recipe.steps):
        idx = torch.randint(0, len(latents), (recipe.batch_size,), generator=gen)
        x0, c = latents[idx], concept[idx].clone()
        c[torch.rand(len(c), generator=gen) < recipe.uncond_prob] = null
        with torch.set_grad_enabled(train_text):
            emb = text_encoder(ids)[0]  # all 17 prompts at once: far cheaper than one per example
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if cfg.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        pred = unet(xt, t, encoder_hidden_states=emb[c]).sample
        per = (pred - target).pow(2).mean((1, 2, 3))
        if recipe.min_snr_gamma > 0:
            snr = a.view(-1) / (1 - a.view(-1))
            w = snr.clamp(max=recipe.min_snr_gamma) / (snr if cfg.prediction_type == "epsilon" else snr + 1)
            per = per * w
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        ema_unet.update(unet)
        if train_text:
            ema_text.update(text_encoder)
        if (step + 1) % 50 == 0:
            log(f"step {step + 1} loss {loss.item():.4f} {(step + 1) / (time.time() - start):.2f} it/s")
        last = step + 1 == recipe.steps or time.time() - start > time_budget_s
        if on_eval is not None and ((step + 1) % eval_every == 0 or last):
            on_eval(step + 1, assemble(vae, ema_text.module, ema_unet.module, scheduler))
        if last:
            break
    return ema_unet.module, ema_text.module


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, texts: list[str], seed: int, steps: int = 25, guidance: float = 3.0, batch_size: int = 128) -> torch.Tensor:
    """Images in [-1, 1] for `texts`, drawn by the pipeline itself (DDIM, classifier-free guidance)."""
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(texts), batch_size):
        g = torch.Generator().manual_seed(seed + i)
        img = pipe(texts[i : i + batch_size], num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="pt").images
        out.append(img * 2 - 1)
    return torch.cat(out)


def score(classifier: ToyClassifier, pipe: StableDiffusionPipeline, spec: WorldSpec, per_prompt: int, seed: int, steps: int = 25, guidance: float = 3.0) -> dict:
    """Classifier accuracy (shape, colour, both) on the pipeline's own samples, overall and per class."""
    concepts = spec.concepts
    texts = [t for t in prompts(spec) for _ in range(per_prompt)]
    images = generate(pipe, texts, seed, steps, guidance)
    s, c = (v.numpy() for v in classifier.predict(images))
    want_s = np.array([spec.shapes.index(sh) for _, sh in concepts]).repeat(per_prompt)
    want_c = np.array([spec.colours.index(co) for co, _ in concepts]).repeat(per_prompt)
    ok_s, ok_c = s == want_s, c == want_c
    return {
        "shape": float(ok_s.mean()),
        "colour": float(ok_c.mean()),
        "both": float((ok_s & ok_c).mean()),
        "per_shape": {sh: float(ok_s[want_s == i].mean()) for i, sh in enumerate(spec.shapes)},
        "per_colour": {co: float(ok_c[want_c == i].mean()) for i, co in enumerate(spec.colours)},
        "images": images,
    }
