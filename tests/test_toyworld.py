"""The toy world: deterministic drawing, captions, and the shipped classifier on freshly drawn images."""

import numpy as np
import pytest
import torch

from salun_sd.toyworld import ASSETS
from salun_sd.toyworld.world import WorldSpec, caption, parse_caption, prompts, sample, to_tensor


def test_same_seed_same_bytes_and_other_seed_differs():
    a, b, c = sample(64, 3), sample(64, 3), sample(64, 4)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert not np.array_equal(a.images, c.images)


def test_balanced_and_captions_match_labels():
    spec = WorldSpec()
    batch = sample(160, 0, spec)
    assert batch.images.shape == (160, spec.size, spec.size, 3) and batch.images.dtype == np.uint8
    counts = np.bincount(batch.colour_ids * len(spec.shapes) + batch.shape_ids, minlength=len(spec.concepts))
    assert (counts == 10).all()
    for text, s, c in zip(batch.captions, batch.shape_ids, batch.colour_ids):
        assert text == caption(spec.colours[c], spec.shapes[s]) == f"a photo of a {spec.colours[c]} {spec.shapes[s]}"
        assert parse_caption(text, spec) == (spec.colours[c], spec.shapes[s])


def test_shape_is_drawn_in_its_colour():
    """The pixels furthest from the background are the named colour: the caption describes the image."""
    spec = WorldSpec()
    batch = sample(64, 5, spec)
    from salun_sd.toyworld.world import COLOURS

    palette = np.array([COLOURS[c] for c in spec.colours], dtype=float)
    for img, cid in zip(batch.images.astype(float), batch.colour_ids):
        centre_free = img.reshape(-1, 3)
        sat = centre_free.max(1) - centre_free.min(1)
        pix = centre_free[sat.argmax()]
        assert np.linalg.norm(palette - pix, axis=1).argmin() == cid


def test_concept_subset_and_prompts():
    spec = WorldSpec()
    only = [("red", "circle")]
    batch = sample(8, 1, spec, concepts=only)
    assert set(batch.captions) == {"a photo of a red circle"}
    assert len(prompts(spec)) == len(spec.shapes) * len(spec.colours) and len(set(prompts(spec))) == len(prompts(spec))
    x = to_tensor(batch.images)
    assert x.shape == (8, 3, spec.size, spec.size) and x.min() >= -1 and x.max() <= 1


@pytest.mark.skipif(not (ASSETS / "classifier.safetensors").is_file(), reason="classifier weights not shipped")
def test_shipped_classifier_recognises_fresh_drawings_even_noisy():
    from torchvision.transforms.functional import gaussian_blur

    from salun_sd.toyworld.classifier import accuracy_on_drawn, load_classifier

    model = load_classifier()
    acc = accuracy_on_drawn(model, 512, seed=777)  # seeds never used in training
    assert acc["shape"] >= 0.99 and acc["colour"] >= 0.99
    batch = sample(512, 778, model.cfg.spec())
    x = gaussian_blur(to_tensor(batch.images), 5, 0.7) + 0.2 * torch.randn(512, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    s, c = model.predict(x)
    assert (s.numpy() == batch.shape_ids).mean() >= 0.97 and (c.numpy() == batch.colour_ids).mean() >= 0.97
    assert model.features(x[:4]).shape == (4, model.cfg.widths[-1])
