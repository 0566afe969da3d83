"""Issue 14 parts 3 and 6: SD3 and FLUX erased end to end from a pipeline folder (mask -> erase -> export -> load -> generate)."""

import pytest
import torch
from diffusers import AutoPipelineForText2Image, FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

from conftest import FORGET, REMAIN, salun
from salun_sd.cli import main
from salun_sd.families.tiny_flow import tiny_flux_pipeline, tiny_sd3_pipeline

# family -> (tiny builder, pipeline class, loading arguments: the tiny SD3 has no T5, which diffusers loads as None)
FAMILIES = {
    "sd3": (tiny_sd3_pipeline, StableDiffusion3Pipeline, {"text_encoder_3": None, "tokenizer_3": None}),
    "flux": (tiny_flux_pipeline, FluxPipeline, {}),
}
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module", params=list(FAMILIES))
def erased(request, tmp_path_factory, data_cache):
    """A tiny base pipeline saved as a folder, and `salun-sd run` on it (mask, then 3 masked steps, then export)."""
    root = tmp_path_factory.mktemp(request.param)
    FAMILIES[request.param][0]().save_pretrained(root / "base")
    cfg = root / "cfg.yaml"
    # mask.guidance 2.5: SalUn's w, i.e. guidance_scale 3.5 (FLUX-dev's embedding value; classifier-free for SD3).
    # A large Adam epsilon keeps updates proportional to gradients, so float summation order cannot flip a step (tests/test_distributed.py).
    cfg.write_text(
        f"model: {root / 'base'}\nconcept: nudity\ndata:\n  forget:\n    - prompt: {FORGET}\n      generate: 4\n  remain:\n    - prompt: {REMAIN}\n"
        f"      generate: 4\n  generation_steps: 2\n  resolution: 32\n  cache_dir: {data_cache}\nmask:\n  batch_size: 4\n  guidance: 2.5\n"
        "train:\n  batch_size: 2\n  max_steps: 3\n  learning_rate: 1.0e-3\n  adam_epsilon: 1.0e-2\n"
    )
    main(["run", str(cfg), "--output_dir", str(root / "run")])
    return request.param, root, cfg


def test_only_masked_weights_move(erased):
    _, root, _ = erased
    base, new, mask = load_file(str(root / "base" / WEIGHTS)), load_file(str(root / "run" / "pipeline" / WEIGHTS)), load_file(str(root / "run" / "mask.safetensors"))
    assert set(base) == set(new) and set(mask) <= set(base)  # the rest are buffers (SD3's pos_embed)
    moved = 0
    for name, m in mask.items():
        assert torch.equal(new[name][~m], base[name][~m]), name
        moved += int((new[name][m] != base[name][m]).sum())
    assert all(torch.equal(new[name], base[name]) for name in set(base) - set(mask))
    assert moved > 0.5 * sum(int(m.sum()) for m in mask.values())


def test_export_loads_with_the_family_pipeline_and_auto_pipeline_and_generates(erased):
    family, root, _ = erased
    _, cls, kwargs = FAMILIES[family]
    folder = root / "run" / "pipeline"
    for pipe in (cls.from_pretrained(folder, **kwargs), AutoPipelineForText2Image.from_pretrained(folder, **kwargs)):
        assert type(pipe) is cls
        image = pipe("a photo", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)).images[0]
        assert image.size == (32, 32)
    load_line = f"{cls.__name__}.from_pretrained(folder{''.join(f', {k}=None' for k in kwargs)})"
    assert load_line in (folder / "README.md").read_text()  # the card's load line works as written


@pytest.mark.parametrize("erased", ["flux"], indirect=True)
def test_two_processes_equal_one(erased):
    _, root, cfg = erased
    mask = str(root / "run" / "mask.safetensors")
    salun("erase", str(cfg), "--mask.path", mask, "--train.batch_size", "1", "--output_dir", str(root / "p2"), processes=2)
    one, two = load_file(str(root / "run" / "pipeline" / WEIGHTS)), load_file(str(root / "p2" / "pipeline" / WEIGHTS))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7)
