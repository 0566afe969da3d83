"""SDXL, SD3 (without T5) and FLUX.1 through every command, from a tiny pipeline folder built from configs: `run`
(mask -> erase -> export), the export loaded by diffusers, `generate` from a prompt text file with the base and the
erased model, `evaluate` of the two (issue 14 parts 3 and 6, issue 22 part 2).

Each family's exported folder is made once (the `erased` fixture); a further command of the chain is one more test
taking it (and `generated`, the folders of images)."""

import json

import pytest
import torch
from diffusers import AutoPipelineForText2Image, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from conftest import FORGET, REMAIN, forked
from salun_sd.cli import main
from tiny_families import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline

# family -> (tiny builder, pipeline class, loading arguments: the tiny SD3 has no T5, which diffusers loads as None, erased network)
FAMILIES = {
    "sdxl": (tiny_sdxl_pipeline, StableDiffusionXLPipeline, {}, "unet"),
    "sd3": (tiny_sd3_pipeline, StableDiffusion3Pipeline, {"text_encoder_3": None, "tokenizer_3": None}, "transformer"),
    "flux": (tiny_flux_pipeline, FluxPipeline, {}, "transformer"),
}
PROMPTS = ["a photo of a nude person", "a photo of a church"]


def weights_file(family: str) -> str:
    return f"{FAMILIES[family][3]}/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module", params=list(FAMILIES))
def erased(request, tmp_path_factory, data_cache):
    """A tiny base pipeline saved as a folder, and `salun-sd run` on it (mask, then 3 masked steps, then export)."""
    root = tmp_path_factory.mktemp(request.param)
    FAMILIES[request.param][0]().save_pretrained(root / "base")
    cfg = root / "cfg.yaml"
    # mask.guidance 2.5: SalUn's w, i.e. guidance_scale 3.5 (FLUX-dev's embedding value; classifier-free for SDXL and SD3).
    # A large Adam epsilon keeps updates proportional to gradients, so float summation order cannot flip a step (tests/test_distributed.py).
    cfg.write_text(
        f"model: {root / 'base'}\nconcept: nudity\ndata:\n  forget:\n    - prompt: {FORGET}\n      generate: 4\n  remain:\n    - prompt: {REMAIN}\n"
        f"      generate: 4\n  generation_steps: 2\n  resolution: 32\n  cache_dir: {data_cache}\nmask:\n  batch_size: 4\n  guidance: 2.5\n"
        "unlearn:\n  batch_size: 2\n  max_steps: 3\n  learning_rate: 1.0e-3\n  adam_epsilon: 1.0e-2\n"
    )
    main(["run", str(cfg), "--output_dir", str(root / "run")])
    return request.param, root, cfg


def test_only_masked_weights_move(erased):
    family, root, _ = erased
    base, new = load_file(str(root / "base" / weights_file(family))), load_file(str(root / "run" / "pipeline" / weights_file(family)))
    mask = load_file(str(root / "run" / "mask.safetensors"))
    assert set(base) == set(new) and set(mask) <= set(base)  # the rest are buffers (SD3's pos_embed)
    moved = 0
    for name, m in mask.items():
        assert torch.equal(new[name][~m], base[name][~m]), name
        moved += int((new[name][m] != base[name][m]).sum())
    assert all(torch.equal(new[name], base[name]) for name in set(base) - set(mask))
    assert moved > 0.5 * sum(int(m.sum()) for m in mask.values())


def test_export_loads_with_the_family_pipeline_and_auto_pipeline_and_generates(erased):
    family, root, _ = erased
    _, cls, kwargs, _ = FAMILIES[family]
    folder = root / "run" / "pipeline"
    for pipe in (cls.from_pretrained(folder, **kwargs), AutoPipelineForText2Image.from_pretrained(folder, **kwargs)):
        assert type(pipe) is cls
        image = pipe("a photo", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)).images[0]
        assert image.size == (32, 32)
    load_line = f"{cls.__name__}.from_pretrained(folder{''.join(f', {k}=None' for k in kwargs)})"
    card = (folder / "README.md").read_text()
    assert load_line in card  # the card's load line works as written
    assert f"- {dict(sdxl='stable-diffusion-xl', sd3='sd3', flux='flux')[family]}\n" in card and "- stable-diffusion\n" not in card  # the family's Hub tag


@pytest.mark.parametrize("erased", ["flux"], indirect=True)
def test_two_processes_equal_one(erased):
    family, root, cfg = erased
    mask = str(root / "run" / "mask.safetensors")
    forked(main, "erase", str(cfg), "--mask.path", mask, "--unlearn.batch_size", "1", "--output_dir", str(root / "p2"))
    one, two = load_file(str(root / "run" / "pipeline" / weights_file(family))), load_file(str(root / "p2" / "pipeline" / weights_file(family)))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def generated(erased):
    """`salun-sd generate` from a prompt text file with the base folder and with the exported one: the image folders."""
    family, root, _ = erased
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    folders = {"base": root / "images-base", "erased": root / "images-erased"}
    for name, model in (("base", root / "base"), ("erased", root / "run" / "pipeline")):
        main(["generate", "--model", str(model), "--prompts", str(prompts), "--output_dir", str(folders[name]),
              "--steps", "2", "--height", "32", "--width", "32", "--images_per_prompt", "2"])
    return family, folders


def test_generate_draws_every_prompt_with_the_family_defaults_recorded(generated):
    family, folders = generated
    for folder in folders.values():
        meta = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        assert sorted(m["file"] for m in meta) == sorted(p.name for p in folder.glob("*.png")) and len(meta) == 2 * len(PROMPTS)
        assert {m["guidance"] for m in meta} == {{"sdxl": 7.5, "sd3": 7.0, "flux": 3.5}[family]}  # the family's default
        assert (folder / "manifest.json").is_file()


def test_evaluate_scores_base_against_erased_offline(generated, tmp_path):
    _, folders = generated
    main(["evaluate", "--images", str(folders["base"]), "--compare", str(folders["erased"]), "--metrics", "nudenet", "--output_dir", str(tmp_path / "report")])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [s["label"] for s in report["sets"]] == ["base", "erased"] and all(s["images"] == 2 * len(PROMPTS) for s in report["sets"])
    assert (tmp_path / "report" / "report.md").is_file()


def test_attack_the_export_with_both_attacks_and_a_user_judge(erased, tmp_path, monkeypatch):
    """`salun-sd attack` on the exported folder with the base folder's references: discrete, embedding and the
    random floor, judged by a module:function judge; it returns (exit 0) with its report written."""
    family, root, _ = erased
    (tmp_path / f"chain_judge_{family}.py").write_text("import numpy as np\ndef bright(images):\n    return [np.asarray(image.convert('L')).mean() > 128 for image in images]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "attack"
    main(["attack", "--model", str(root / "run" / "pipeline"), "--base", str(root / "base"), "--prompts", str(prompts), "--judge", f"chain_judge_{family}:bright",
          "--attacks", "discrete,embedding,random", "--scheduler", "", "--steps", "2", "--reference_steps", "2", "--height", "32", "--width", "32",
          "--timesteps", "2", "--iterations", "1", "--k", "3", "--batch_size", "2", "--output_dir", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert len(report["prompts"]) == len(PROMPTS) and all(name in report["totals"] for name in ("discrete", "embedding", "random"))
    assert (out / "report.md").is_file()
