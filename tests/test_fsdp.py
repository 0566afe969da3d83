"""Issue 14: the mask step and the masked erase on FSDP2-sharded weights (two CPU processes) equal one unsharded process."""

import torch
from safetensors.torch import load_file

from conftest import forked
from fsdp_run import MASK, main
from salun_sd.core.saliency import saliency_masks


def test_sharded_mask_and_masked_erase_equal_the_unsharded_ones(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    main([str(one)])  # one unsharded process: this one
    forked(main, str(two), "--fsdp", "--mask", str(one / "mask.safetensors"))  # two processes

    # Mask step: the scores are those of one process (float summation order aside), and the threshold found from
    # the two processes' summed shard histograms gives exactly the mask of the gathered scores, unsharded.
    scores = load_file(str(two / "scores.safetensors"))
    for name, s in load_file(str(one / "scores.safetensors")).items():
        torch.testing.assert_close(scores[name], s, rtol=1e-5, atol=1e-6)
    sharded_mask = load_file(str(two / "mask.safetensors"))
    unsharded = saliency_masks(scores, [MASK.fraction], MASK.scope)[MASK.fraction]
    assert sharded_mask.keys() == unsharded.keys()
    assert all(torch.equal(sharded_mask[n], unsharded[n]) for n in unsharded)
    assert sum(int(m.sum()) for m in sharded_mask.values()) == round(MASK.fraction * sum(m.numel() for m in unsharded.values()))

    # Erase under one mask (one's file, handed to the sharded erase as DTensors, as the mask step hands it): the
    # same update, with masked weight decay and clipping on the full norm; weights outside the mask bitwise unchanged.
    mask = load_file(str(one / "mask.safetensors"))
    # The same with the mask file and a fresh model, as with mask.path: the erase shards both itself.
    original, a = load_file(str(one / "original.safetensors")), load_file(str(one / "weights.safetensors"))
    for b in (load_file(str(two / "weights.safetensors")), load_file(str(two / "weights_mask_file.safetensors"))):
        for name, m in mask.items():
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)
            assert torch.equal(b[name][~m], original[name][~m]), name
        assert sum(int((b[n] != original[n]).sum()) for n in mask) > 0
