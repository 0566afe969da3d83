"""Train the toy Stable Diffusion of the toy world and write it as a StableDiffusionPipeline folder.

Stages: (1) a tiny AutoencoderKL (16x16 -> 8x8x4) on drawn images; (2) UNet2DConditionModel and the
CLIP text encoder on cached latents of drawn, captioned images. Every --eval-every steps the EMA
weights are scored by the toy classifier on the pipeline's own samples (DDIM, guidance), and the
folder with the best shape-and-colour accuracy so far is kept in OUT/best.

  python scripts/train_toy_world.py --out /tmp/toyworld/run            # both stages
  python scripts/train_toy_world.py --out DIR --vae-from DIR/vae       # reuse a trained VAE
Copy OUT/best to salun_sd/assets/toyworld/pipeline to ship it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.training_utils import EMAModel, compute_snr
from transformers import CLIPTextModel

from salun_sd.families.tiny import assemble, clip_tokenizer
from salun_sd.toyworld.classifier import load_classifier
from salun_sd.toyworld.pipeline import PIPELINE_DIR, ToySDConfig, build_scheduler, build_text_encoder, build_unet, build_vae
from salun_sd.toyworld.scoring import score
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
    tok = clip_tokenizer()
    return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids


@dataclass
class DiffusionRecipe:
    """The levers of the diffusion stage (the script's --help)."""

    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    text_lr: float = 1e-3  # 0 freezes the text encoder
    uncond_prob: float = 0.1
    min_snr_gamma: float = 5.0  # min-SNR-gamma loss weighting; 0 disables it
    ema_decay: float = 0.999
    warmup: int = 100
    seed: int = 0


def train_diffusion(cfg: ToySDConfig, vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel, latents: torch.Tensor, concept: torch.Tensor,
                    spec: WorldSpec, recipe: DiffusionRecipe, on_eval=None, eval_every: int = 500, time_budget_s: float = math.inf, log=print):
    """Train UNet (and the text encoder when recipe.text_lr > 0); call `on_eval(step, pipeline_of_ema)` every eval_every steps."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    scheduler = build_scheduler(cfg)
    ids = tokenize(prompts(spec) + [""])  # row len(concepts) is the empty prompt
    null = len(ids) - 1
    train_text = recipe.text_lr > 0
    text_encoder.requires_grad_(train_text).train(train_text)
    groups = [{"params": list(unet.parameters()), "lr": recipe.lr}]
    if train_text:
        groups.append({"params": list(text_encoder.parameters()), "lr": recipe.text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup))
    # diffusers' EMA, with its usual decay warm-up min(decay, (1 + step) / (10 + step)); the copies are what is evaluated and saved.
    emas = [(EMAModel(m.parameters(), decay=recipe.ema_decay), copy.deepcopy(m).eval().requires_grad_(False)) for m in (unet, text_encoder)]

    def ema_modules() -> tuple[UNet2DConditionModel, CLIPTextModel]:
        for ema, module in emas:
            ema.copy_to(module.parameters())
        return emas[0][1], emas[1][1]

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
        xt = scheduler.add_noise(x0, noise, t)
        target = noise if cfg.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=emb[c]).sample
        per = (pred - target).pow(2).mean((1, 2, 3))
        if recipe.min_snr_gamma > 0:  # min-SNR-gamma weighting (Hang et al. 2023), as diffusers' training examples apply it
            snr = compute_snr(scheduler, t)
            per = per * snr.clamp(max=recipe.min_snr_gamma) / (snr if cfg.prediction_type == "epsilon" else snr + 1)
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        emas[0][0].step(unet.parameters())
        if train_text:
            emas[1][0].step(text_encoder.parameters())
        if (step + 1) % 50 == 0:
            log(f"step {step + 1} loss {loss.item():.4f} {(step + 1) / (time.time() - start):.2f} it/s")
        last = step + 1 == recipe.steps or time.time() - start > time_budget_s
        if on_eval is not None and ((step + 1) % eval_every == 0 or last):
            on_eval(step + 1, assemble(vae, *reversed(ema_modules()), scheduler))
        if last:
            break
    return ema_modules()



def ship(best: Path, dest: Path, per_prompt: int, guidance: float) -> None:
    """Copy a trained folder into the package, re-measure it as shipped (plain from_pretrained), write a model card."""
    from salun_sd.toyworld.pipeline import load_toy_pipeline

    trained = json.loads((best / "toyworld_eval.json").read_text())
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(best, dest, ignore=shutil.ignore_patterns("toyworld_eval.json"))
    spec = WorldSpec()
    r = score(load_classifier(), load_toy_pipeline(dest), spec, per_prompt, seed=777_000, steps=25, guidance=guidance)
    r.pop("images")
    r.update(samples=per_prompt * len(spec.concepts), guidance=guidance, ddim_steps=25, training={k: trained[k] for k in ("step", "train_minutes", "args")})
    (dest / "toyworld_eval.json").write_text(json.dumps(r, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in {**{f"shape: {s}": a for s, a in r["per_shape"].items()}, **{f"colour: {c}": a for c, a in r["per_colour"].items()}}.items())
    (dest / "README.md").write_text(
        "# Toy-world Stable Diffusion (salun-sd)\n\n"
        "A StableDiffusionPipeline trained by `scripts/train_toy_world.py` on the procedural shapes world "
        "(`salun_sd.toyworld.world`: 16x16, 4 shapes x 4 colours, prompts \"a photo of a {colour} {shape}\").\n\n"
        f"Trained {trained['step']} steps ({trained['train_minutes']} min of diffusion training on a shared 2-core CPU, one thread). "
        f"Scored by the shipped toy classifier on {r['samples']} of its own samples (DDIM 25 steps, guidance {guidance}, seeds from 777000): "
        f"shape {r['shape']:.3f}, colour {r['colour']:.3f}, both {r['both']:.3f}.\n\n| class | accuracy |\n| --- | --- |\n{rows}\n"
    )
    print(json.dumps({k: v for k, v in r.items() if k != "training"}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="run folder (vae/, latest/, best/, log.jsonl)")
    ap.add_argument("--ship", type=Path, help="instead of training: copy this trained folder into the package and measure it")
    ap.add_argument("--ship-per-prompt", type=int, default=64)
    ap.add_argument("--vae-from", type=Path, help="a trained VAE folder (skips stage 1)")
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--vae-only", action="store_true", help="stop after stage 1")
    ap.add_argument("--steps", type=int, default=DiffusionRecipe.steps)
    ap.add_argument("--minutes", type=float, default=float("inf"), help="stop the diffusion stage after this long")
    ap.add_argument("--batch-size", type=int, default=DiffusionRecipe.batch_size)
    ap.add_argument("--lr", type=float, default=DiffusionRecipe.lr)
    ap.add_argument("--text-lr", type=float, default=DiffusionRecipe.text_lr, help="0 freezes the text encoder")
    ap.add_argument("--min-snr", type=float, default=DiffusionRecipe.min_snr_gamma, help="min-SNR loss weighting gamma (0: off)")
    ap.add_argument("--ema", type=float, default=DiffusionRecipe.ema_decay)
    ap.add_argument("--prediction", choices=["epsilon", "v_prediction"], default="epsilon")
    ap.add_argument("--unet-channels", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--layers-per-block", type=int, default=1)
    ap.add_argument("--text-hidden", type=int, default=16)
    ap.add_argument("--text-time", action="store_true", help="also feed the pooled prompt to the time embedding (addition_embed_type='text')")
    ap.add_argument("--latents", type=int, default=16384, help="drawn images cached as latents")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-per-prompt", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--classifier", type=Path, default=None, help="default: the shipped classifier")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.ship:
        ship(args.ship, PIPELINE_DIR, args.ship_per_prompt, args.guidance)
        return
    if args.out is None:
        ap.error("--out is required when training")
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / "log.jsonl").open("a")

    def log(msg: str) -> None:
        print(msg, flush=True)

    cfg = ToySDConfig(unet_channels=args.unet_channels, unet_layers_per_block=args.layers_per_block, text_hidden=args.text_hidden,
                      text_time_embedding=args.text_time, prediction_type=args.prediction)
    spec = WorldSpec(size=cfg.image_size)
    t0 = time.time()
    if args.vae_from:
        vae = AutoencoderKL.from_pretrained(str(args.vae_from)).eval()
    else:
        torch.manual_seed(args.seed)
        vae = train_vae(build_vae(cfg), spec, args.vae_steps, seed=args.seed, log=log)
        vae.save_pretrained(str(args.out / "vae"))
        log(f"vae trained in {time.time() - t0:.0f} s, scaling_factor {vae.config.scaling_factor:.3f}")
    if args.vae_only:
        return
    vae.requires_grad_(False)
    latents, concept = encode_latents(vae, spec, args.latents, seed=1_000 + args.seed)
    classifier = load_classifier(args.classifier)
    torch.manual_seed(args.seed)
    text_encoder, unet = build_text_encoder(cfg), build_unet(cfg)
    log(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M")
    best = {"both": -1.0}
    t1 = time.time()

    def on_eval(step: int, pipe) -> None:
        nonlocal best
        te = time.time()
        r = score(classifier, pipe, spec, args.eval_per_prompt, seed=12345, steps=25, guidance=args.guidance)
        r.pop("images")
        r.update(step=step, train_minutes=round((te - t1) / 60, 2), eval_seconds=round(time.time() - te, 1), args={k: str(v) for k, v in vars(args).items()})
        log(f"EVAL step {step}: shape {r['shape']:.3f} colour {r['colour']:.3f} both {r['both']:.3f} per_shape {r['per_shape']} per_colour {r['per_colour']}")
        log_file.write(json.dumps(r) + "\n")
        log_file.flush()
        pipe.save_pretrained(str(args.out / "latest"))
        if r["both"] >= best["both"]:  # on a tie the later, longer-trained weights
            best = r
            shutil.rmtree(args.out / "best", ignore_errors=True)
            shutil.copytree(args.out / "latest", args.out / "best")
            (args.out / "best" / "toyworld_eval.json").write_text(json.dumps(r, indent=2) + "\n")

    recipe = DiffusionRecipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr, text_lr=args.text_lr,
                             min_snr_gamma=args.min_snr, ema_decay=args.ema, seed=args.seed)
    train_diffusion(cfg, vae, text_encoder, unet, latents, concept, spec, recipe, on_eval=on_eval,
                    eval_every=args.eval_every, time_budget_s=args.minutes * 60, log=log)
    log(f"done: diffusion {(time.time() - t1) / 60:.1f} min, total {(time.time() - t0) / 60:.1f} min; best {best.get('step')} both {best['both']:.3f}")


if __name__ == "__main__":
    main()
