"""ESD-x, ESD-u and Forget-Me-Not on the core trainer (tiny SD UNet, CPU), their configs and the CLI path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler, StableDiffusionPipeline

from conftest import FORGET, REMAIN, tiny_config
from salun_sd.cli import main
from salun_sd.config import load_yaml
from salun_sd.core.config import TrainConfig
from salun_sd.core.denoiser import ConceptData
from salun_sd.errors import UserError
from salun_sd.core.objectives import Batch, diffusion_loss, esd_loss, per_example_mse
from salun_sd.core.sampling import ddim_partway, ddim_steps_before
from salun_sd.families.sd_unet import TextConditionedDenoiser
from salun_sd.families.attention import concept_token_mask, cross_attention_layers, recording
from salun_sd.families.config import DataConfig, EraseConfig, ImageGroup
from salun_sd.core.erase_flow import check_config
from salun_sd.families.erase import SDErase
from salun_sd.families.sd3_flux import sd3_denoiser
from salun_sd.families.tiny import tiny_pipeline
from tiny_families import tiny_sd3_pipeline
from salun_sd.core.trainer import unlearn

METHOD_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "methods").glob("*.yaml"))
PROMPTS = ["", FORGET, REMAIN]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def denoiser(pipe, unet=None) -> TextConditionedDenoiser:
    """The tiny UNet with random text states for PROMPTS and the real token positions of "nude"."""
    unet = unet or copy.deepcopy(pipe.unet)
    states = torch.randn(len(PROMPTS), 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # as sd_denoiser: SD-1.x's schedule
    return TextConditionedDenoiser(unet, scheduler, PROMPTS, states, concept_token_mask(pipe.tokenizer, PROMPTS, ["nude"]))


def forget_batch(n: int = 4) -> Batch:
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, 4, 8, 8, generator=gen)
    return Batch(x0=x0, cond=torch.full((n,), 1), noise=torch.randn(x0.shape, generator=gen), t=torch.randint(1000, (n,), generator=gen))


def test_concept_tokens_are_the_words_that_only_the_forget_prompt_has_and_the_end_of_text_positions(pipe):
    data = DataConfig(forget=[ImageGroup(prompt=FORGET)], remain=[ImageGroup(prompt=REMAIN)])
    assert data.concept() == ["nude"]
    mask = concept_token_mask(pipe.tokenizer, [FORGET, REMAIN, "Nude, nude!"], data.concept())
    everything_after = lambda last: list(range(last + 1, 77))  # end-of-text, then padding with end-of-text (SD-1.x)
    assert mask[0].nonzero().flatten().tolist() == [5, *everything_after(6)]  # <start> a photo of a nude person
    assert not mask[1].any()
    assert mask[2].nonzero().flatten().tolist() == [1, 3, *everything_after(4)]
    two_piece = concept_token_mask(pipe.tokenizer, ["a painting by van gogh"], ["van gogh"])
    assert two_piece[0].nonzero().flatten().tolist() == [4, 5, *everything_after(5)]  # <start> a painting by van gogh


def test_end_of_text_positions_are_steered_where_they_are_not_padding(pipe):
    """A tokenizer that pads with another token (SD-2's "!") steers only the prompt's own end-of-text."""
    tokenizer = copy.deepcopy(pipe.tokenizer)
    tokenizer.pad_token = "!"
    mask = concept_token_mask(tokenizer, [FORGET], ["nude"])
    assert mask[0].nonzero().flatten().tolist() == [5, 7]


def test_esd_loss_at_the_original_weights_is_the_scaled_guidance_gap(pipe):
    """At θ = θ*, ε_θ(c) − (ε*(∅) − η(ε*(c) − ε*(∅))) = (1+η)(ε(c) − ε(∅)): the target is guided away from c."""
    den, batch = denoiser(pipe), forget_batch()
    eta = 1.5
    with torch.no_grad():
        loss, _ = esd_loss(den, den.model, batch, None, TrainConfig(negative_guidance=eta), copy.deepcopy(den.model))
        x_t = den.add_noise(batch.x0, batch.noise, batch.t)
        gap = per_example_mse(den.predict(den.model, x_t, batch.t, batch.cond), den.predict(den.model, x_t, batch.t, torch.zeros_like(batch.cond)))
    assert loss.item() > 0
    assert loss.item() == pytest.approx((1 + eta) ** 2 * gap.mean().item(), rel=1e-4)


def test_esd_samples_as_many_ddim_steps_as_the_esd_code_before_its_timestep():
    """train-esd.py: DDIM index k = t // 20 of 50, then its loop breaks after index k - 1 (all 50 steps for k = 0)."""
    t = torch.tensor([0, 19, 20, 39, 40, 59, 980, 999])
    assert ddim_steps_before(t, 50, 1000).tolist() == [50, 50, 50, 50, 49, 49, 2, 2]


def test_partway_sampling_follows_the_diffusers_ddim_pipeline_whatever_the_batch(pipe):
    den = denoiser(pipe)
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond, steps = torch.tensor([1, 2, 1]), torch.tensor([0, 2, 5])
    together = ddim_partway(den, den.model, x_T, cond, steps, 5, guidance=2.0)
    alone = torch.cat([ddim_partway(den, den.model, x_T[[i]], cond[[i]], steps[[i]], 5, guidance=2.0) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)  # only float summation order differs
    assert torch.equal(together[0], x_T[0])
    after = {}
    keep = lambda _, i, t, values: after.setdefault(i + 1, values["latents"]) is not None and values
    sd = StableDiffusionPipeline(**{**pipe.components, "unet": den.model})
    sd(prompt_embeds=den.embeddings[cond], negative_prompt_embeds=den.embeddings[[0, 0, 0]], latents=x_T, num_inference_steps=5,
       guidance_scale=3.0, height=32, width=32, output_type="latent", callback_on_step_end=keep)
    torch.testing.assert_close(together[1], after[2][1], rtol=1e-4, atol=1e-5)  # guidance w = 2 is diffusers' scale 3
    torch.testing.assert_close(together[2], after[5][2], rtol=1e-4, atol=1e-5)


def test_sampled_x_t_is_refused_in_one_line_on_a_rectified_flow():
    den = sd3_denoiser(tiny_sd3_pipeline(), [FORGET])
    with pytest.raises(UserError, match="is a rectified flow: use unlearn.esd_x_t=noised$"):
        ddim_partway(den, den.model, torch.zeros(1, 4, 8, 8), torch.tensor([1]), torch.tensor([1]), 5, guidance=2.0)


def test_sampled_esd_trains_and_gives_the_same_update_for_any_batch_split(pipe, tmp_path):
    sampled = {"esd_x_t": "sampled", "esd_sample_steps": 5, "adam_epsilon": 1e-2}  # epsilon: see test_distributed
    den, before, whole = train(pipe, tmp_path, "esd_x", steps=2, **sampled)
    _, _, split = train(pipe, tmp_path, "esd_x", steps=2, **sampled, batch_size=2, gradient_accumulation_steps=2)
    _, _, noised = train(pipe, tmp_path, "esd_x", steps=2, adam_epsilon=1e-2)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7)
    moved = [name for name in whole if not torch.equal(whole[name], before[name])]
    assert moved and all(den.scope("xattn")(name) for name in moved)
    assert any(not torch.equal(whole[name], noised[name]) for name in moved)


def test_recording_keeps_the_unet_output_and_restores_its_attention(pipe):
    den, batch = denoiser(pipe), forget_batch()
    den.model.eval()
    x_t = den.add_noise(batch.x0, batch.noise, batch.t)
    cond = torch.tensor([1, 2, 1, 2])  # forget, remain, forget, remain
    before = [type(layer.processor) for layer in cross_attention_layers(den.model)]
    with torch.no_grad():
        plain = den.predict(den.model, x_t, batch.t, cond)
        with recording(den.model, den.concept_tokens[cond]) as total:
            recorded = den.predict(den.model, x_t, batch.t, cond)
    torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-5)
    assert (total[[0, 2]] > 0).all() and (total[[1, 3]] == 0).all()  # the remain prompt has no concept token
    assert [type(layer.processor) for layer in cross_attention_layers(den.model)] == before


def concept_set(cond: int, seed: int) -> ConceptData:
    return ConceptData(torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(seed)), torch.full((8,), cond))


def train(pipe, tmp_path: Path, method: str, steps: int = 3, remain: ConceptData | None = None, **cfg) -> tuple[TextConditionedDenoiser, dict, dict]:
    """Train a copy of the tiny UNet on a forget set (and a remain set); returns the denoiser and the weights before/after."""
    den = denoiser(pipe)
    before = {n: p.detach().clone() for n, p in den.model.named_parameters()}
    AcceleratorState._reset_state(True)
    cfg = TrainConfig(**{"method": method, "batch_size": 4, "max_steps": steps, "learning_rate": 1e-3, **cfg})
    trained = unlearn(den, concept_set(1, seed=2), remain, [], cfg, Accelerator(cpu=True), tmp_path)
    return den, before, {n: p.detach().clone() for n, p in trained.named_parameters()}


@pytest.mark.parametrize(("method", "scope", "extra"), [("esd_x", "xattn", {}), ("esd_u", "noxattn", {}), ("fmn", "xattn", {"trainable": "xattn"})])
def test_each_baseline_changes_only_its_scope(pipe, tmp_path, method, scope, extra):
    den, before, after = train(pipe, tmp_path, method, **extra)
    inside = [n for n in before if den.scope(scope)(n)]
    assert inside and len(inside) < len(before)
    for name in before:
        if name not in inside:
            assert torch.equal(before[name], after[name]), name
    moved = sum(int((before[n] != after[n]).sum()) for n in inside)
    assert moved > 0.9 * sum(before[n].numel() for n in inside)
    if scope == "noxattn":
        assert not any(n.startswith(("time_embedding.", "conv_out.")) for n in inside)


@pytest.mark.parametrize(("method", "cond", "direction"), [("ga", 1, 1), ("ft", 2, -1)])
def test_ga_raises_the_forget_loss_and_ft_lowers_the_remain_loss(pipe, tmp_path, method, cond, direction):
    """GA ascends the diffusion loss of the forget examples, FT descends that of the remain examples; no mask, every weight trains."""
    den, before, after = train(pipe, tmp_path, method, steps=5, remain=concept_set(2, seed=3), alpha=0.0)
    data = concept_set(cond, seed=2 if cond == 1 else 3)
    gen = torch.Generator().manual_seed(4)
    batch = Batch(x0=data.x0, cond=data.cond, noise=torch.randn(data.x0.shape, generator=gen), t=torch.randint(1000, (len(data),), generator=gen))
    original = denoiser(pipe)
    original.model.load_state_dict(before)
    with torch.no_grad():
        start, end = (diffusion_loss(d, d.model.eval(), batch).mean().item() for d in (original, den))
    assert direction * (end - start) > 0.1 * start  # ga 1.14 -> 2.25, ft 1.14 -> 0.78
    assert sum(int((before[n] != after[n]).sum()) for n in before) > 0.9 * sum(p.numel() for p in before.values())


def test_fmn_steers_attention_away_from_the_concept_tokens(pipe, tmp_path):
    den, before, _ = train(pipe, tmp_path, "fmn", steps=10, trainable="xattn", learning_rate=1e-2)
    batch = forget_batch(8)
    x_t = den.add_noise(batch.x0, batch.noise, batch.t)
    original = denoiser(pipe)
    original.model.load_state_dict(before)
    with torch.no_grad():
        start = original.concept_attention(original.model, x_t, batch.t, batch.cond).mean().item()
        end = den.concept_attention(den.model.eval(), x_t, batch.t, batch.cond).mean().item()
    assert end < 0.95 * start  # 4.70 -> 4.29 in 10 steps at lr 1e-2 (~70 end-of-text positions share the mass)


def test_weights_the_loss_never_reaches_are_left_out_even_with_weight_decay(pipe, tmp_path):
    """FMN on the whole UNet, as its code: nothing after the last cross-attention gets a gradient, so AdamW (and we) leave it."""
    _, before, after = train(pipe, tmp_path, "fmn", steps=2, weight_decay=0.01)
    unreached = [n for n in before if n.startswith(("conv_norm_out.", "conv_out."))]
    assert unreached and all(torch.equal(before[n], after[n]) for n in unreached)
    assert not torch.equal(before["conv_in.weight"], after["conv_in.weight"])


def test_a_scope_that_contradicts_the_method_is_refused(pipe, tmp_path):
    with pytest.raises(UserError, match="esd_u trains 'noxattn'"):
        train(pipe, tmp_path, "esd_u", trainable="xattn")


@pytest.mark.parametrize("path", METHOD_CONFIGS, ids=lambda p: p.name)
def test_each_method_config_passes_the_checks_and_names_its_method(path):
    cfg = load_yaml(EraseConfig, path)
    assert check_config(SDErase(cfg)) and cfg.unlearn.method == path.stem


def test_method_configs_state_the_usual_defaults():
    cfgs = {p.stem: load_yaml(EraseConfig, p) for p in METHOD_CONFIGS}
    assert set(cfgs) == {"esd_x", "esd_u", "fmn", "ga", "rl", "ft", "uce"}  # uce's: tests/test_uce.py
    for name in ("esd_x", "esd_u"):  # train-esd.py: lr 1e-5, batch 1, 1000 iterations, η 1, x_t sampled (DDIM 50 steps, guidance 3)
        t = cfgs[name].unlearn
        assert (t.learning_rate, t.batch_size, t.max_steps, t.negative_guidance) == (1e-5, 1, 1000, 1.0)
        assert (t.esd_x_t, t.esd_sample_steps, t.esd_sample_guidance) == ("sampled", 50, 3.0)
    fmn = cfgs["fmn"].unlearn  # FMN configs/attn.yaml: AdamW lr 2e-6, decay 0.01, clip 1, batch 1, 35 steps, whole UNet
    assert (fmn.learning_rate, fmn.weight_decay, fmn.max_grad_norm, fmn.batch_size, fmn.max_steps, fmn.trainable) == (2e-6, 0.01, 1.0, 1, 35, "all")


@pytest.mark.parametrize(("changes", "message"), [
    ({"method": "esd"}, "unlearn.method must be one of salun, rl, ga, ft, esd_x, esd_u, fmn, uce"),
    ({"method": "rl", "remain": []}, "rl trains on a remain set"),
    ({"method": "fmn", "remain": []}, "give data.concept_words"),
    ({"method": "esd_u", "esd_x_t": "drawn"}, "unlearn.esd_x_t must be one of noised, sampled"),
])
def test_method_requirements_are_checked_before_loading(tmp_path, changes, message):
    cfg = tiny_config(tmp_path, tmp_path)
    cfg.unlearn.method = changes["method"]
    cfg.unlearn.esd_x_t = changes.get("esd_x_t", cfg.unlearn.esd_x_t)
    if "remain" in changes:
        cfg.data.remain = changes["remain"]
    with pytest.raises(UserError, match=message):
        check_config(SDErase(cfg))


def test_cli_method_shorthand_runs_esd_u_without_a_remain_set_or_mask(tmp_path, data_cache):
    config = tmp_path / "esd.yaml"
    config.write_text(f"model: tiny\ndata:\n  forget:\n    - {{prompt: {FORGET}, generate: 8}}\n  generation_steps: 3\n"
                      f"  cache_dir: {data_cache}\nunlearn:\n  batch_size: 2\n  max_steps: 2\n  learning_rate: 1.0e-4\n")
    out = tmp_path / "out"
    main(["run", str(config), "--method", "esd_u", "--output_dir", str(out)])
    assert not (out / "mask.safetensors").exists()
    card = (out / "pipeline" / "README.md").read_text()
    assert "`esd_u` (ESD-u" in card and "| unlearn.negative_guidance | `1.0` |" in card
    reloaded = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert reloaded("a photo", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
