"""UCE on the tiny SD-1.x and SDXL pipelines (CPU): the closed form's keys and values, the weights it may touch, the
erase flow around it (CLI, export, single file), and the families and configs it refuses."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from conftest import FORGET, REMAIN, tiny_config
from ldm_layout import ldm_checkpoint
from salun_sd.cli import main
from salun_sd.config import load_yaml
from salun_sd.core.erase_flow import check_config
from salun_sd.ddpm.config import DDPMConfig
from salun_sd.ddpm.forget import DDPMErase
from salun_sd.errors import UserError
from salun_sd.families.config import EraseConfig, SingleFileConfig, UCEConfig
from salun_sd.families.erase import SDErase, erase
from salun_sd.families.sd_unet import encode_prompts, sdxl_text_states
from salun_sd.families.tiny import tiny_pipeline
from tiny_families import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline
from salun_sd.families.uce import Concept, erase_pair, projections, uce_edit

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "methods" / "uce.yaml"
KEEP = [REMAIN, "a photo of a cat", "clothes"]
UNET = "unet/diffusion_pytorch_model.safetensors"


def is_key_or_value(name: str) -> bool:
    return ".attn2.to_k." in name or ".attn2.to_v." in name


def last_word_states(pipe, text_states, texts: list[str]) -> dict[str, torch.Tensor]:
    """Each text's state at the token before its first end-of-text (the start token for "")."""
    states = text_states(pipe, texts).double()
    ids = torch.tensor(pipe.tokenizer(texts, padding="max_length", max_length=77).input_ids)
    first_end = (ids == pipe.tokenizer.eos_token_id).int().argmax(1)
    return {t: states[i, first_end[i] - 1] for i, t in enumerate(texts)}


def relative_gaps(before: list[torch.Tensor], pipe, c: dict[str, torch.Tensor], word: str, target: str, keep: list[str]) -> tuple[float, list[float]]:
    """Over every projection: the erased token's distance to the target's original key/value (relative to where it started), and each
    preserved token's distance to its own (relative to its size)."""
    erased, kept = [], []
    for W, proj in zip(before, projections(pipe.unet)):
        new = proj.weight.detach().double()
        erased.append(float((new @ c[word] - W @ c[target]).norm() / (W @ c[word] - W @ c[target]).norm()))
        kept.append([float((new @ c[k] - W @ c[k]).norm() / (W @ c[k]).norm()) for k in keep])
    return max(erased), [max(k[i] for k in kept) for i in range(len(keep))]


def edited(pipe, text_states, cfg: UCEConfig, concepts=(Concept(["nude"], [""]),), keep=KEEP):
    pipe = copy.deepcopy(pipe)
    before = [p.weight.detach().double().clone() for p in projections(pipe.unet)]
    uce_edit(pipe, text_states, list(concepts), list(keep), cfg)
    return pipe, before


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_with_little_regularisation_the_erased_token_takes_the_targets_keys_and_values_and_preserved_ones_keep_theirs(pipe):
    c = last_word_states(pipe, encode_prompts, ["nude", "", *KEEP])
    new, before = edited(pipe, encode_prompts, UCEConfig(lamb=1e-3))
    erased, kept = relative_gaps(before, new, c, "nude", "", KEEP)
    assert erased < 1e-3 and max(kept) < 1e-3


def test_at_the_official_lambda_the_edit_is_the_regularised_least_squares_optimum(pipe):
    """The gradient of s_e‖W'c − Wc*‖² + s_p Σ‖W'c_j − Wc_j‖² + λ‖W' − W‖² vanishes at W', and the erased token moved most of the way."""
    cfg = UCEConfig(erase_scale=2.0, preserve_scale=0.7)
    c = last_word_states(pipe, encode_prompts, ["nude", "", *KEEP])
    new, before = edited(pipe, encode_prompts, cfg)
    for W, proj in zip(before, projections(new.unet)):
        Wn = proj.weight.detach().double()
        grad = cfg.erase_scale * torch.outer(Wn @ c["nude"] - W @ c[""], c["nude"]) + cfg.lamb * (Wn - W)
        grad += sum(cfg.preserve_scale * torch.outer(Wn @ c[k] - W @ c[k], c[k]) for k in KEEP)
        assert grad.abs().max() < 1e-5 * W.abs().max()
    erased, kept = relative_gaps(before, new, c, "nude", "", KEEP)
    assert erased < 0.1 and max(kept) < 0.1


def test_a_concept_with_several_targets_goes_to_their_mean(pipe):
    targets = ["a photo of a dog", "a photo of a cat"]
    c = last_word_states(pipe, encode_prompts, ["nude", *targets])
    c["mean"] = (c[targets[0]] + c[targets[1]]) / 2
    new, before = edited(pipe, encode_prompts, UCEConfig(lamb=1e-3), [Concept(["nude"], targets)], keep=[])
    assert relative_gaps(before, new, c, "nude", "mean", [])[0] < 1e-3


def test_several_concepts_are_erased_at_once_each_to_its_own_target(pipe):
    c = last_word_states(pipe, encode_prompts, ["nude", "violence", "", "a photo of a dog", *KEEP])
    concepts = [Concept(["nude"], [""]), Concept(["violence"], ["a photo of a dog"])]
    new, before = edited(pipe, encode_prompts, UCEConfig(lamb=1e-3), concepts)
    nude, kept = relative_gaps(before, new, c, "nude", "", KEEP)
    violence, _ = relative_gaps(before, new, c, "violence", "a photo of a dog", KEEP)
    assert nude < 1e-3 and violence < 1e-3 and max(kept) < 1e-3


def test_trailing_tokens_align_the_last_words_and_preserve_the_empty_prompt_when_nothing_else_is(pipe):
    source, target = torch.arange(77.0)[:, None], 100 + torch.arange(77.0)[:, None]
    rows, to = erase_pair(source, 4, target, 0, "trailing")  # "a photo of a nude" -> "": nude, <end>, padding... -> <start>, <end>, ...
    assert rows.flatten().tolist() == list(range(4, 77)) and to.flatten().tolist() == list(range(100, 173))
    cfg = UCEConfig(tokens="trailing", preserve_scale=0.1)
    none, _ = edited(pipe, encode_prompts, cfg, keep=[])
    empty, _ = edited(pipe, encode_prompts, cfg, keep=[""])
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(projections(none.unet), projections(empty.unet)))


def test_the_cli_erases_with_uce_without_images_and_changes_only_cross_attention_keys_and_values(pipe, tmp_path):
    cfg = tmp_path / "uce.yaml"
    cfg.write_text(f"model: tiny\nconcept: nudity\ndata:\n  forget:\n    - prompt: {FORGET}\n  remain:\n    - prompt: {REMAIN}\n  generation_steps: 2\n  cache_dir: {tmp_path / 'cache'}\n")
    main(["erase", str(cfg), "--method", "uce", "--output_dir", str(tmp_path / "run")])
    run = tmp_path / "run"
    base, new = pipe.unet.state_dict(), load_file(str(run / "pipeline" / UNET))
    assert set(base) == set(new)
    moved = {k for k in base if not torch.equal(base[k], new[k])}
    assert moved == {k for k in base if is_key_or_value(k)} and len(moved) == 8  # 4 cross-attention layers (down, mid, 2 up) x (to_k, to_v)
    assert not (tmp_path / "cache").exists() and not (run / "mask.safetensors").exists() and not (run / "log.jsonl").exists()
    erased = StableDiffusionPipeline.from_pretrained(run / "pipeline")
    for component in ("vae", "text_encoder"):
        assert all(torch.equal(v, getattr(erased, component).state_dict()[k]) for k, v in getattr(pipe, component).state_dict().items())
    card = (run / "pipeline" / "README.md").read_text()
    assert "`uce`" in card and "in closed form" in card and '"nude"' in card and "uce.lamb" in card and "unlearn.learning_rate" not in card
    assert (run / "validation.png").is_file()


def test_an_sdxl_folder_is_edited_on_both_encoders_concatenated_states(tmp_path, data_cache):
    base = tiny_sdxl_pipeline()
    base.save_pretrained(tmp_path / "base")
    cfg = tiny_config(tmp_path / "run", data_cache, method="uce")
    cfg.model, cfg.validation_grid, cfg.uce.lamb = str(tmp_path / "base"), False, 1e-3
    AcceleratorState._reset_state(True)
    erase(cfg, Accelerator(cpu=True), ("erase",))
    erased = StableDiffusionXLPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    before, new = base.unet.state_dict(), erased.unet.state_dict()
    assert all(torch.equal(before[k], new[k]) == (not is_key_or_value(k)) for k in before)
    text_states = lambda p, texts: sdxl_text_states(p, texts)[0]
    c = last_word_states(base, text_states, ["nude", "", REMAIN])
    assert c["nude"].shape == (80,)  # 32 + 48: the two encoders' penultimate states
    erased_gap, kept = relative_gaps([p.weight.detach().double() for p in projections(base.unet)], erased, c, "nude", "", [REMAIN])
    assert erased_gap < 1e-3 and kept[0] < 1e-3


def test_the_single_file_export_holds_the_edited_unet(tmp_path):
    base = tiny_pipeline()
    save_file(ldm_checkpoint(base), str(tmp_path / "tiny.safetensors"))
    tiny_pipeline(seed=1).save_pretrained(tmp_path / "configs")
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache", method="uce")
    cfg.model, cfg.validation_grid = str(tmp_path / "tiny.safetensors"), False
    cfg.single_file = SingleFileConfig(config=str(tmp_path / "configs"), export=True)
    AcceleratorState._reset_state(True)
    out = erase(cfg, Accelerator(cpu=True), ("erase",))
    folder = StableDiffusionPipeline.from_pretrained(out / "pipeline").unet.state_dict()
    single = StableDiffusionPipeline.from_single_file(str(out / "model.safetensors"), config=str(tmp_path / "configs"), safety_checker=None,
                                                      requires_safety_checker=False).unet.state_dict()
    assert all(torch.equal(folder[k], single[k]) for k in folder)
    assert any(not torch.equal(folder[k], v) for k, v in base.unet.state_dict().items())


@pytest.mark.parametrize("build", [tiny_sd3_pipeline, tiny_flux_pipeline], ids=["sd3", "flux"])
def test_joint_attention_families_are_refused_in_one_line_before_the_run_folder_is_claimed(build, tmp_path):
    build().save_pretrained(tmp_path / "base")
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache", method="uce")
    cfg.model = str(tmp_path / "base")
    with pytest.raises(UserError, match="joint attention reads text states that earlier blocks have already transformed") as err:
        check_config(SDErase(cfg))
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: setattr(c.uce, "target", "art"), "uce.target must be one of empty, misaligned"),
    (lambda c: setattr(c.uce, "tokens", "all"), "uce.tokens must be one of last, trailing"),
    (lambda c: setattr(c.uce, "lamb", 0.0), "uce.lamb must be a positive number"),
    (lambda c: setattr(c.uce, "preserve_scale", float("nan")), "uce.preserve_scale must be a non-negative number"),
    (lambda c: (setattr(c.uce, "target", "misaligned"), setattr(c.data, "remain", []), setattr(c.data, "concept_words", ["nude"])), "uce.target=misaligned sends"),
    (lambda c: setattr(c.uce, "preserve", ["nude"]), "uce.preserve names 'nude', a concept word it erases"),
])
def test_bad_uce_settings_are_one_line_errors_before_loading(tmp_path, change, message):
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache", method="uce")
    change(cfg)
    with pytest.raises(UserError, match=message):
        check_config(SDErase(cfg))


def test_the_ddpm_has_no_cross_attention_for_uce(tmp_path):
    cfg = DDPMConfig()
    cfg.unlearn.method = "uce"
    with pytest.raises(UserError, match="edits a text-to-image network's cross-attention in closed form; `salun-sd ddpm` models have none"):
        check_config(DDPMErase(cfg, tmp_path, tmp_path / "out"))


def test_the_method_config_states_uce_sd_erase_defaults():
    cfg = load_yaml(EraseConfig, CONFIG)
    assert cfg.unlearn.method == "uce" and cfg.data.concept() == ["nudity"] and check_config(SDErase(cfg)).closed_form
    u = cfg.uce  # trainscripts/uce_sd_erase.py: erase_scale 1, preserve_scale 1, lamb 0.5, guide "" for non-art concepts, last token
    assert (u.erase_scale, u.preserve_scale, u.lamb, u.target, u.tokens, u.preserve) == (1.0, 1.0, 0.5, "empty", "last", [])


def test_compare_runs_uce_on_the_toy_world_concept_word_with_the_remaining_prompts_preserved(tmp_path):
    from salun_sd.toyworld.compare import METHOD_TRAIN, Case, CompareConfig, erase_config
    from salun_sd.toyworld.world import WorldSpec

    assert "uce" in CompareConfig().methods and METHOD_TRAIN["uce"] == {}
    spec = WorldSpec()
    job = SDErase(erase_config(CompareConfig(), Case("shape", "circle"), "uce", tmp_path, spec))
    assert check_config(job).closed_form
    assert job.uce_concepts()[0].words == ["circle"] and job.uce_concepts()[0].targets == [""]
    assert job.uce_preserve() == Case("shape", "circle").split(spec)[1] and len(job.uce_preserve()) == 12


def test_a_config_with_two_concepts_sends_each_concepts_words_to_its_own_c_prime(pipe, tmp_path):
    cfg = load_yaml(EraseConfig, Path(__file__).resolve().parents[1] / "configs" / "tiny_two_concepts.yaml")
    cfg.output_dir, cfg.validation_grid, cfg.unlearn.method = str(tmp_path / "run"), False, "uce"
    cfg.uce.target, cfg.uce.lamb = "misaligned", 1e-3
    AcceleratorState._reset_state(True)
    erase(cfg, Accelerator(cpu=True), ("erase",))
    erased = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    calm, clothes = "a photo of a calm person", REMAIN
    c = last_word_states(pipe, encode_prompts, ["nude", "violent", calm, clothes])
    before = [p.weight.detach().double() for p in projections(pipe.unet)]
    assert relative_gaps(before, erased, c, "nude", clothes, [calm])[0] < 1e-3
    assert relative_gaps(before, erased, c, "violent", calm, [clothes])[0] < 1e-3
    card = (tmp_path / "run" / "pipeline" / "README.md").read_text()
    assert "nudity" in card and "violence" in card


def test_a_second_uce_step_from_the_first_ones_export_keeps_the_first_concept_erased_and_the_card_lists_both(pipe, tmp_path):
    first = tiny_config(tmp_path / "a", tmp_path / "cache", method="uce")
    first.validation_grid, first.uce.lamb = False, 1e-3
    AcceleratorState._reset_state(True)
    erase(first, Accelerator(cpu=True), ("erase",))
    second = tiny_config(tmp_path / "b", tmp_path / "cache", method="uce")
    second.model, second.concept, second.validation_grid, second.uce.lamb = str(tmp_path / "a" / "pipeline"), "violence", False, 1e-3
    second.data.forget[0].prompt = "a photo of a violent person"
    AcceleratorState._reset_state(True)
    erase(second, Accelerator(cpu=True), ("erase",))
    erased = StableDiffusionPipeline.from_pretrained(tmp_path / "b" / "pipeline")
    c = last_word_states(pipe, encode_prompts, ["nude", "violent", ""])
    base = [p.weight.detach().double() for p in projections(pipe.unet)]
    step1 = [p.weight.detach().double() for p in projections(StableDiffusionPipeline.from_pretrained(tmp_path / "a" / "pipeline").unet)]
    assert relative_gaps(base, erased, c, "nude", "", [])[0] < 1e-3  # the first concept kept where step 1 put it (preserved)
    assert relative_gaps(step1, erased, c, "violent", "", [])[0] < 1e-3  # the second sent to the empty prompt's keys/values of step 1's model
    card = (tmp_path / "b" / "pipeline" / "README.md").read_text()
    assert card.index("nudity") < card.index("violence")
