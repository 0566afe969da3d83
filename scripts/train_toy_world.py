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
import json
import shutil
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from salun_sd.toyworld.classifier import load_classifier
from salun_sd.toyworld.pipeline import PIPELINE_DIR, ToySDConfig, build_text_encoder, build_unet, build_vae
from salun_sd.toyworld.training import DiffusionRecipe, encode_latents, score, train_diffusion, train_vae
from salun_sd.toyworld.world import WorldSpec


def ship(best: Path, dest: Path, per_prompt: int, guidance: float) -> None:
    """Copy a trained folder into the package, re-measure it as shipped (plain from_pretrained), write a model card."""
    from salun_sd.toyworld.pipeline import load_toy_pipeline

    trained = json.loads((best / "toyworld_eval.json").read_text())
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(best, dest, ignore=shutil.ignore_patterns("toyworld_eval.json"))
    spec = WorldSpec()
    r = score(load_classifier(), load_toy_pipeline(dest), spec, per_prompt, seed=777_000, guidance=guidance)
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
        r = score(classifier, pipe, spec, args.eval_per_prompt, seed=12345, guidance=args.guidance)
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
