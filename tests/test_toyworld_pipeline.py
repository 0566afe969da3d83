"""The shipped toy Stable Diffusion: loads with StableDiffusionPipeline.from_pretrained and draws what it is asked."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from salun_sd.toyworld.pipeline import PIPELINE_DIR, ToySDConfig, build_text_encoder, build_unet, build_vae, load_toy_pipeline
from salun_sd.toyworld.world import WorldSpec

shipped = pytest.mark.skipif(not (PIPELINE_DIR / "model_index.json").is_file(), reason="toy pipeline weights not shipped")


def test_components_fit_the_world():
    cfg = ToySDConfig()
    vae, unet, text = build_vae(cfg), build_unet(cfg), build_text_encoder(cfg)
    x = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
    z = vae.encode(x).latent_dist.mode()
    assert z.shape == (1, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    emb = text(torch.zeros(1, 77, dtype=torch.long))[0]
    assert unet(z, 10, encoder_hidden_states=emb).sample.shape == z.shape


@shipped
def test_shipped_pipeline_loads_with_plain_from_pretrained():
    pipe = StableDiffusionPipeline.from_pretrained(str(PIPELINE_DIR))
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == WorldSpec().size
    assert pipe.tokenizer("a photo of a red circle").input_ids[0] == 49406  # the real CLIP tokenizer


@shipped
def test_shipped_pipeline_draws_the_asked_shape_and_colour():
    """A few samples per prompt, judged by the shipped classifier (measured numbers: docs/RESULTS.md)."""
    from salun_sd.toyworld.classifier import load_classifier
    from salun_sd.toyworld.scoring import score

    r = score(load_classifier(), load_toy_pipeline(), WorldSpec(), per_prompt=4, seed=2024, steps=20)
    assert r["colour"] >= 0.9 and r["shape"] >= 0.9, r  # shipped: 1.000 / 1.000 on 1024 samples
