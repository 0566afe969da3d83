import pytest
import torch

from salun_sd.errors import UserError
from salun_sd.saliency import _kth_largest, load_mask, mask_info, mask_summary, save_mask, saliency_masks
from salun_sd.sd.tiny import tiny_pipeline


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
