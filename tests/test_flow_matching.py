"""Issue 14 part 3: flow matching on the denoiser interface, SD3 and FLUX conditions, joint-attention scopes."""

import copy

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.training_utils import compute_density_for_timestep_sampling

from salun_sd.core.config import TrainConfig
from salun_sd.core.denoiser import ConceptData
from salun_sd.core.draws import draw_batch, generator
from salun_sd.errors import UserError
from salun_sd.core.objectives import diffusion_loss, guided_forget_loss
from salun_sd.families.sd3_flux import FLOW_SCOPES, SD3Denoiser, flux_denoiser, sd3_denoiser
from tiny_families import tiny_flux_pipeline, tiny_sd3_pipeline
from salun_sd.core.trainer import unlearn

PROMPTS = ["a photo of a nude person", "a photo of a person wearing clothes"]


@pytest.fixture(scope="module")
def sd3():
    return sd3_denoiser(tiny_sd3_pipeline(), PROMPTS)


@pytest.fixture(scope="module")
def flux():
    return flux_denoiser(tiny_flux_pipeline(), PROMPTS)


def test_timesteps_are_drawn_as_diffusers_training_scripts_draw_them(sd3, flux):
    for den, scheme in ((sd3, "logit_normal"), (flux, "none")):  # train_dreambooth_sd3.py / _flux.py defaults
        for p in range(20):
            u = compute_density_for_timestep_sampling(scheme, 1, 0.0, 1.0, 1.29, generator=generator(7, "x", p))
            assert den.draw_timestep(generator(7, "x", p)) == int(u * 1000)
    ts = torch.tensor([sd3.draw_timestep(generator(0, i)) for i in range(400)]).float()
    assert 400 < ts.median() < 600 and ts.std() < 250  # logit-normal piles up mid-schedule; uniform would give std ≈ 289


def test_noising_is_the_rectified_flow_and_the_target_the_velocity(sd3):
    sched = sd3.noise_scheduler
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    sigma = sched.sigmas[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(sd3.add_noise(x0, noise, t), (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(sd3.target(x0, noise, t), noise - x0)
    torch.testing.assert_close(sd3.model_timestep(t), sched.sigmas[t] * 1000)
    s = torch.tensor([1.0, 0.5, 0.001])  # σ before SD3's shift of 3
    torch.testing.assert_close(sched.sigmas[t], 3 * s / (1 + 2 * s))


def test_draws_per_position_do_not_depend_on_the_process_split(flux):
    data = ConceptData(torch.randn(6, 4, 8, 8), torch.ones(6, dtype=torch.long))
    whole = draw_batch(data, flux, 3, "forget", 1, 4, 0, 4)
    halves = [draw_batch(data, flux, 3, "forget", 1, 4, rank, 2) for rank in (0, 1)]
    assert torch.equal(whole.t, torch.cat([h.t for h in halves])) and torch.equal(whole.noise, torch.cat([h.noise for h in halves]))


def test_conditions_are_cached_once_per_prompt_with_the_empty_prompt_first(sd3, flux):
    assert sd3.prompts == flux.prompts == ["", *PROMPTS] and sd3.null_cond == 0
    # SD3 without T5: CLIP-L + CLIP-G states (77 tokens) then T5's 256 positions as zeros, pooled = both CLIP projections
    assert sd3.table["embeddings"].shape == (3, 77 + 256, 96) and sd3.table["pooled"].shape == (3, 64)
    assert sd3.table["embeddings"][:, 77:].abs().sum() == 0
    assert flux.table["embeddings"].shape == (3, 512, 32) and flux.table["pooled"].shape == (3, 32) and flux.table["text_ids"].shape == (512, 3)


def test_flux_guidance_is_the_embedding_and_sd3_guidance_is_classifier_free(sd3, flux):
    torch.manual_seed(0)
    x0, noise, t, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([100, 700]), torch.tensor([1, 2])
    x_t = flux.add_noise(x0, noise, t)
    with torch.no_grad():
        guided = flux.guided_prediction(flux.model, x_t, t, cond, 2.5)
        assert guided.shape == x_t.shape  # unpacked back from 2x2 patches
        torch.testing.assert_close(guided, flux.predict(flux.model, x_t, t, cond, guidance=3.5))
        assert not torch.allclose(guided, flux.predict(flux.model, x_t, t, cond, guidance=1.0))
        c, u = sd3.predict(sd3.model, x_t, t, cond), sd3.predict(sd3.model, x_t, t, torch.zeros_like(cond))
        torch.testing.assert_close(sd3.guided_prediction(sd3.model, x_t, t, cond, 7.5), 8.5 * c - 7.5 * u)
    schnell = flux_denoiser(tiny_flux_pipeline(guidance_embeds=False), PROMPTS)
    batch = draw_batch(ConceptData(x0, cond), schnell, 0, "forget", 0, 2, 0, 2)
    with torch.no_grad():  # no guidance to apply: the saliency loss is the conditional diffusion loss
        torch.testing.assert_close(guided_forget_loss(schnell, schnell.model, batch, 7.5), diffusion_loss(schnell, schnell.model, batch))


def test_cross_attention_scope_is_the_text_stream_of_joint_attention(sd3, flux):
    for den in (sd3, flux):
        names = [n for n, _ in den.model.named_parameters()]
        xattn = [n for n in names if FLOW_SCOPES["xattn"](n)]
        assert xattn and {n.split(".attn.")[1].split(".")[0] for n in xattn} == {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
        rest = [n for n in names if FLOW_SCOPES["noxattn"](n)]
        assert not set(xattn) & set(rest) and not any(n.startswith(("time_text_embed.", "proj_out.", "norm_out.")) for n in rest)
    dual = [n for n, _ in sd3.model.named_parameters() if ".attn2." in n]
    assert dual and not any(FLOW_SCOPES["xattn"](n) for n in dual)  # SD3.5's attn2 is image self-attention
    assert not any(FLOW_SCOPES["xattn"](n) for n, _ in flux.model.named_parameters() if n.startswith("single_transformer_blocks."))


@pytest.mark.parametrize(("method", "scope"), [("esd_x", "xattn"), ("esd_u", "noxattn")])
def test_esd_trains_only_its_scope_of_the_sd3_transformer(sd3, tmp_path, method, scope):
    den = SD3Denoiser(copy.deepcopy(sd3.model), sd3.noise_scheduler.config, sd3.prompts, sd3.table["embeddings"], sd3.table["pooled"])
    before = {n: p.detach().clone() for n, p in den.model.named_parameters()}
    AcceleratorState._reset_state(True)
    cfg = TrainConfig(method=method, batch_size=2, max_steps=2, learning_rate=1e-3)
    forget = ConceptData(torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((4,), den.cond_id(PROMPTS[0])))
    after = dict(unlearn(den, forget, None, [], cfg, Accelerator(cpu=True), tmp_path).named_parameters())
    inside = {n for n in before if FLOW_SCOPES[scope](n)}
    assert all(torch.equal(before[n], after[n]) for n in before if n not in inside)
    assert sum(int((before[n] != after[n]).sum()) for n in inside) > 0.5 * sum(before[n].numel() for n in inside)


def test_attention_resteering_is_refused_in_one_line():
    with pytest.raises(UserError, match="joint attention") as err:
        sd3_denoiser(tiny_sd3_pipeline(), PROMPTS, ["nude"])
    assert "\n" not in str(err.value)
