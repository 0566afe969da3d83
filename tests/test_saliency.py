import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler

from salun_sd.core.config import MaskConfig
from salun_sd.core.denoiser import ConceptData
from salun_sd.errors import UserError
from salun_sd.core.saliency import _kth_largest, accumulate_saliency, load_mask, make_masks, mask_info, mask_summary, save_mask, saliency_masks
from salun_sd.families.sd_unet import TextConditionedDenoiser
from salun_sd.families.tiny import tiny_pipeline


def scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "down_blocks.0.weight": torch.randn(300, 7, generator=g).abs(),
        "mid_block.bias": torch.randn(50, generator=g).abs() * 1e-6,
        "conv_out.weight": torch.randn(4, 5, 3, 3, generator=g).abs() * 100,
    }


def test_radix_select_finds_the_exact_kth_largest():
    s = scores()
    flat = torch.cat([v.flatten() for v in s.values()])
    for k in (1, 2, 17, len(flat) // 2, len(flat) - 1, len(flat)):
        assert _kth_largest(s.values(), k) == flat.sort(descending=True).values[k - 1].item()


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_global_mask_keeps_the_requested_fraction_of_the_largest(fraction):
    s = scores()
    mask = saliency_masks(s, [fraction])[fraction]
    total = sum(v.numel() for v in s.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(fraction * total)
    kept_min = min(v[m].min() for v, m in zip(s.values(), mask.values()) if m.any())
    dropped_max = max(v[~m].max() for v, m in zip(s.values(), mask.values()) if (~m).any())
    assert kept_min > dropped_max
    assert mask_summary(mask)["total"] == pytest.approx(round(fraction * total) / total)


def test_per_layer_scope_keeps_the_fraction_in_each_tensor_and_several_fractions_nest():
    s = scores()
    masks = saliency_masks(s, [0.3, 0.6], scope="per_layer")
    for name, v in s.items():
        assert int(masks[0.3][name].sum()) == round(0.3 * v.numel())
        assert not (masks[0.3][name] & ~masks[0.6][name]).any()


def test_zero_scores_are_never_kept():
    s = {"a": torch.tensor([0.0, 0.0, 0.0, 1.0])}
    assert saliency_masks(s, [0.75])[0.75]["a"].tolist() == [False, False, False, True]


def test_mask_round_trips_as_bool_safetensors(tmp_path):
    unet = tiny_pipeline().unet
    s = {n: torch.rand_like(p) for n, p in unet.named_parameters()}
    mask = saliency_masks(s, [0.5])[0.5]
    save_mask(mask, tmp_path / "m.safetensors", {"fraction": 0.5})
    back = load_mask(tmp_path / "m.safetensors", unet)
    assert all(back[n].dtype == torch.bool and torch.equal(back[n], mask[n]) for n in mask)
    assert mask_info(tmp_path / "m.safetensors")["info"]["fraction"] == 0.5


def test_mask_from_another_architecture_names_the_parameter_and_both_shapes(tmp_path):
    unet = tiny_pipeline().unet
    name, p = next(iter(unet.named_parameters()))
    bad = {name: torch.ones(3, 3, dtype=torch.bool)}
    save_mask(bad, tmp_path / "other.safetensors", {})
    with pytest.raises(UserError) as err:
        load_mask(tmp_path / "other.safetensors", unet)
    assert name in str(err.value) and "(3, 3)" in str(err.value) and str(tuple(p.shape)) in str(err.value)
    save_mask({"not.in.this.model": torch.ones(2, dtype=torch.bool)}, tmp_path / "names.safetensors", {})
    with pytest.raises(UserError, match="not.in.this.model"):
        load_mask(tmp_path / "names.safetensors", unet)


@pytest.fixture(scope="module")
def tiny_forget():
    """The tiny UNet as a denoiser over random text states, and 8 random latents of condition 1."""
    pipe = tiny_pipeline()
    states = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    den = TextConditionedDenoiser(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), ["", "a photo"], states)
    return den, ConceptData(torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.ones(8, dtype=torch.long))


def test_restricted_training_keeps_the_whole_unet_threshold_inside_the_scope_or_ranks_within_it(tiny_forget, tmp_path):
    """Official SalUn: the top fraction over every weight, intersected with the trainable ones; rank_over=trainable: within them."""
    den, forget = tiny_forget
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    xattn = den.scope("xattn")
    scores = accumulate_saliency(den, forget, accelerator, guidance=7.5, batch_size=4)
    threshold = _kth_largest(scores.values(), round(0.5 * sum(s.numel() for s in scores.values())))
    inside = {n: s for n, s in scores.items() if xattn(n)}
    official = make_masks(den, forget, accelerator, MaskConfig(batch_size=4), tmp_path / "model", 0, xattn, {})
    assert set(official) == set(inside)
    assert all(torch.equal(official[n], s >= threshold) for n, s in inside.items())
    within = make_masks(den, forget, accelerator, MaskConfig(batch_size=4, rank_over="trainable"), tmp_path / "trainable", 0, xattn, {})
    assert all(torch.equal(within[n], m) for n, m in saliency_masks(inside, [0.5])[0.5].items())
    assert mask_summary(within)["total"] == pytest.approx(0.5, abs=1e-4)
    assert mask_summary(official)["total"] != pytest.approx(0.5, abs=0.01)  # the two rules differ on this UNet
    assert mask_info(tmp_path / "model" / "mask.safetensors")["info"]["rank_over"] == "model"


def test_an_unknown_rank_over_is_a_user_error():
    with pytest.raises(UserError, match="mask.rank_over must be one of model, trainable, got 'scope'"):
        MaskConfig(rank_over="scope").check()
