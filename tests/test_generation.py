"""The one generation layer: every family's images depend on their request alone, not on the batch they were drawn in."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler

from salun_sd.errors import UserError
from salun_sd.families.config import DataConfig, ImageGroup
from salun_sd.families.data import generated_images, image_key
from salun_sd.families.loading import family_of, model_identity
from salun_sd.families.tiny import tiny_pipeline
from tiny_families import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline
from salun_sd.generation import ImageRequest, draw_images, starting_noise, use_scheduler

BUILDERS = {"sd": tiny_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


@pytest.fixture(scope="module")
def pipes() -> dict:
    """One tiny pipeline per family, built once for the module."""
    built = {}
    for name, build in BUILDERS.items():
        built[name] = build()
        built[name].set_progress_bar_config(disable=True)
    return built


REQUESTS = [ImageRequest(f"a photo of thing {i}", seed=10 + i, height=32, width=32, guidance=4.0) for i in range(4)]


@pytest.mark.parametrize("family", BUILDERS)
def test_an_image_is_the_same_in_a_batch_of_one_and_of_four(pipes, family):
    """Batched pipeline calls with per-image noise: batch 1 and batch 4 give the same images (float rounding of
    batched kernels apart: < 1e-5 in [0, 1], under half a level of an 8-bit PNG), and image (seed, draw 0) is the
    image of the plain one-image call with a CPU generator seeded with the seed (FLUX: packed latents, guidance embedding)."""
    pipe = pipes[family]
    one = np.stack(draw_images(pipe, REQUESTS, steps=2, batch_size=1, output_type="np"))
    four = np.stack(draw_images(pipe, REQUESTS, steps=2, batch_size=4, output_type="np"))
    assert np.abs(one - four).max() < 1e-5
    plain = pipe(REQUESTS[2].prompt, num_inference_steps=2, guidance_scale=4.0, height=32, width=32,
                 generator=torch.Generator().manual_seed(REQUESTS[2].seed), output_type="np").images[0]
    assert np.array_equal(one[2], plain)
    assert np.abs(one[0] - one[1]).mean() > 1e-3  # different seeds, different images


def test_a_stochastic_sampler_takes_its_step_noise_from_the_image_key():
    """Ancestral Euler draws noise at every step: it comes from the image's own generator, so batching still does not matter."""
    pipe = use_scheduler(tiny_pipeline(), "EulerAncestralDiscreteScheduler")
    assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
    pipe.set_progress_bar_config(disable=True)
    one = np.stack(draw_images(pipe, REQUESTS[:3], steps=3, batch_size=1, output_type="np"))
    three = np.stack(draw_images(pipe, REQUESTS[:3], steps=3, batch_size=3, output_type="np"))
    assert np.abs(one - three).max() < 1e-5
    plain = pipe(REQUESTS[1].prompt, num_inference_steps=3, guidance_scale=4.0, height=32, width=32,
                 generator=torch.Generator().manual_seed(REQUESTS[1].seed), output_type="np").images[0]
    assert np.array_equal(one[1], plain)


def test_noise_draws_of_one_seed_are_the_images_of_one_batched_plain_call():
    """Draw k of seed s is image k of pipe(prompt, num_images_per_prompt=k + 1, generator seeded with s)."""
    generator = torch.Generator().manual_seed(3)
    batched = torch.randn((3, 4, 8, 8), generator=generator)
    for k in range(3):
        assert torch.equal(starting_noise(ImageRequest("x", 3, 32, 32, 7.5, draw=k), 4, 4)[0], batched[k])


def test_families_know_their_size_rule_and_sampling_defaults(pipes):
    sd, flux, sd3 = pipes["sd"], pipes["flux"], pipes["sd3"]
    # 8, not the tiny VAE's 4: StableDiffusionPipeline.check_inputs asks multiples of 8 whatever the VAE
    assert (family_of(sd).size_multiple(sd), family_of(sd).default_size(sd), family_of(sd).steps, family_of(sd).guidance) == (8, 32, 50, 7.5)
    assert family_of(flux).size_multiple(flux) == 8 and family_of(flux).guidance == 3.5  # 2x2 packing on top of the VAE's 4
    assert family_of(sd3).size_multiple(sd3) == 8 and family_of(sd3).default_size(sd3) == 32  # patch size 2
    with pytest.raises(UserError, match="multiples of 8; 36x32"):
        draw_images(flux, [ImageRequest("x", 0, 32, 36, 3.5)], steps=1)


def test_the_data_cache_key_names_everything_the_generated_images_depend_on(tmp_path):
    """Forget/remain images are cached under a key of the model, prompt, sampler (class and config), its steps and
    guidance, size, seed, network dtype, device and library versions: changing any of them draws new images."""
    pipe, group, data = tiny_pipeline(), ImageGroup(prompt="a photo of a nude person", generate=2), DataConfig(cache_dir=str(tmp_path))
    model = model_identity(pipe, "tiny")
    key = image_key(pipe, model, group, data, 32)
    assert {"model", "prompt", "steps", "guidance", "resolution", "seed", "noise", "scheduler", "dtype", "device", "versions"} <= set(key)
    assert (key["device"], key["dtype"], key["scheduler"]["class"]) == ("cpu", "torch.float32", "DDIMScheduler")
    variants = [
        image_key(pipe, model_identity(tiny_pipeline(seed=1), "tiny"), group, data, 32),
        image_key(pipe, model, ImageGroup(prompt="a photo of a person", generate=2), data, 32),
        image_key(pipe, model, group, replace(data, generation_steps=7), 32),
        image_key(pipe, model, group, replace(data, generation_guidance=2.0), 32),
        image_key(pipe, model, group, replace(data, seed=1), 32),
        image_key(pipe, model, group, data, 64),
        image_key(use_scheduler(tiny_pipeline(), "EulerDiscreteScheduler"), model, group, data, 32),
        image_key(tiny_pipeline().to(dtype=torch.bfloat16), model, group, data, 32),
    ]
    assert len({json.dumps(k, sort_keys=True, default=str) for k in [key, *variants]}) == len(variants) + 1
    paths = generated_images(pipe, model, group, replace(data, generation_steps=1), 32)
    assert json.loads((paths[0].parent / "key.json").read_text())["steps"] == 1 and all(p.is_file() for p in paths)
