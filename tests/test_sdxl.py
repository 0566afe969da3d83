"""SDXL through the same erase (tiny SDXL built from configs, CPU): the folder's family picks the pipeline, the
added conditions are cached, the export loads with StableDiffusionXLPipeline and AutoPipelineForText2Image,
ESD-x/ESD-u/FMN train their scopes on SDXL's attention layout, and an unsupported family is one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import AutoPipelineForText2Image, StableDiffusionXLPipeline
from safetensors.torch import load_file

from conftest import FORGET, REMAIN, tiny_config
from salun_sd.config import load_yaml
from salun_sd.core.config import TrainConfig
from salun_sd.core.denoiser import ConceptData
from salun_sd.core.erase_flow import check_config
from salun_sd.errors import UserError
from salun_sd.core.saliency import load_mask
from salun_sd.families.sd_unet import SDXLDenoiser, sdxl_denoiser
from salun_sd.families.config import EraseConfig
from salun_sd.families.erase import SDErase, erase
from salun_sd.families.loading import load_pipeline
from tiny_families import tiny_sdxl_pipeline
from salun_sd.core.trainer import unlearn


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl") / "base"
    tiny_sdxl_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(base) -> StableDiffusionXLPipeline:
    return load_pipeline(str(base))


@pytest.fixture(scope="module")
def erased(base, tmp_path_factory, data_cache) -> Path:
    cfg = tiny_config(tmp_path_factory.mktemp("sdxl-run") / "out", data_cache)
    cfg.model = str(base)
    AcceleratorState._reset_state(True)
    return erase(cfg, Accelerator(cpu=True))


def test_an_sdxl_folder_loads_as_sdxl_and_caches_pooled_and_time_conditions(pipe):
    assert isinstance(pipe, StableDiffusionXLPipeline)
    den = sdxl_denoiser(pipe, [FORGET, REMAIN], resolution=32)
    assert den.embeddings.shape == (3, 77, 80) and den.pooled.shape == (3, 32)  # "" + 2 prompts; 32 + 48 hidden
    assert not den.embeddings[0].any() and not den.pooled[0].any()  # force_zeros_for_empty_prompt, as the pipeline does
    assert den.time_ids.tolist() == [32, 32, 0, 0, 32, 32]
    with torch.no_grad():  # the cached conditions give the UNet output the pipeline's own encoding gives
        x_t, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
        embeds, _, pooled, _ = pipe.encode_prompt(FORGET, do_classifier_free_guidance=False)
        direct = pipe.unet(x_t, t, encoder_hidden_states=embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": den.time_ids[None]}).sample
        torch.testing.assert_close(den.predict(pipe.unet, x_t, t, torch.tensor([den.cond_id(FORGET)])), direct)


def test_masked_out_weights_stay_bitwise_and_the_export_loads_with_sdxl_and_auto_pipelines(pipe, erased):
    original = dict(pipe.unet.named_parameters())
    mask = load_mask(erased / "mask.safetensors", pipe.unet)
    new = load_file(str(erased / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(name.startswith("add_embedding.") for name in mask)  # the added-condition weights are part of the mask
    for name, m in mask.items():
        assert torch.equal(new[name][~m], original[name].detach()[~m]), name
    assert sum(int((new[n][m] != original[n].detach()[m]).sum()) for n, m in mask.items()) > 0
    assert isinstance(StableDiffusionXLPipeline.from_pretrained(erased / "pipeline"), StableDiffusionXLPipeline)
    reloaded = AutoPipelineForText2Image.from_pretrained(erased / "pipeline")
    assert isinstance(reloaded, StableDiffusionXLPipeline)
    torch.testing.assert_close(dict(reloaded.unet.named_parameters())["add_embedding.linear_1.weight"], new["add_embedding.linear_1.weight"], rtol=0, atol=0)
    image = reloaded("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    card = (erased / "pipeline" / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained(folder)" in card


@pytest.mark.parametrize(("method", "scope"), [("esd_x", "xattn"), ("esd_u", "noxattn"), ("fmn", "xattn")])
def test_baselines_train_their_scope_on_the_sdxl_unet(pipe, tmp_path, method, scope):
    cached = sdxl_denoiser(pipe, [FORGET, REMAIN], ["nude"], resolution=32)
    den = SDXLDenoiser(copy.deepcopy(pipe.unet), cached.noise_scheduler, cached.prompts, cached.embeddings, cached.pooled, cached.time_ids, cached.concept_tokens)
    before = {n: p.detach().clone() for n, p in den.model.named_parameters()}
    forget = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    AcceleratorState._reset_state(True)
    cfg = TrainConfig(method=method, batch_size=2, max_steps=2, learning_rate=1e-3, trainable="xattn" if method == "fmn" else "all")
    after = dict(unlearn(den, ConceptData(forget, torch.full((4,), den.cond_id(FORGET))), None, [], cfg, Accelerator(cpu=True), tmp_path).named_parameters())
    inside = {n for n in before if den.scope(scope)(n)}
    assert inside and not any(n.startswith(("add_embedding.", "time_embedding.")) for n in inside if scope == "noxattn")
    assert all(torch.equal(before[n], after[n]) for n in before if n not in inside)
    assert sum(int((before[n] != after[n]).sum()) for n in inside) > 0.5 * sum(before[n].numel() for n in inside)


def test_a_folder_of_an_unsupported_family_is_one_line_naming_it(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(UserError) as err:
        load_pipeline(str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "KandinskyV22Pipeline" in message and "StableDiffusionXLPipeline" in message


def test_the_sdxl_nudity_config_is_the_sd14_recipe_at_1024_px():
    cfg = load_yaml(EraseConfig, Path(__file__).resolve().parents[1] / "configs" / "sdxl_nudity.yaml")
    assert check_config(SDErase(cfg)).uses_mask
    assert (cfg.model, cfg.data.resolution, cfg.mask.fraction, cfg.unlearn.learning_rate, cfg.unlearn.alpha) == ("stabilityai/stable-diffusion-xl-base-1.0", 1024, 0.5, 1e-5, 0.1)
    assert cfg.unlearn.batch_size * cfg.unlearn.gradient_accumulation_steps == 8 and cfg.unlearn.total_steps(800, 1) == 100  # the official global batch and steps
