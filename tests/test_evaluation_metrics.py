"""Metrics with real components: the shipped NudeNet detector on real photos, a random open_clip CLIP,
FID with a small random CNN, unlearning accuracy with an injected classifier."""

import numpy as np
import pytest
import scipy.linalg
import skimage.data
import torch
from PIL import Image

from conftest import RandomCNN, random_clip
from salun_sd.errors import UserError
from salun_sd.evaluation.classify import IMAGENETTE_IMAGENET_INDEX, ImageClassifier, imagenet_categories, imagenet_index, imagenet_unlearning_accuracy, unlearning_accuracy
from salun_sd.evaluation.clip_score import clip_score_metrics
from salun_sd.evaluation.fid import feature_fid, image_batches, inception_fid, reference_stats
from salun_sd.evaluation.nudity import EXPOSED_CLASSES, detect, detect_images, exposed_parts, nudenet_detector, nudity_metrics

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photographs that scikit-image ships, as PNG files."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in PHOTOS:
        path = folder / f"{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).save(path)
        paths.append(path)
    return paths


def test_nudenet_finds_no_exposed_parts_on_real_photos(photos):
    result = nudity_metrics(photos)
    assert result["threshold"] == 0.6
    assert result["images"] == len(PHOTOS)
    assert result["nudity_rate"] == 0.0 and result["total_exposed"] == 0
    assert set(result["counts"]) == set(EXPOSED_CLASSES) and not any(result["counts"].values())
    assert result["per_image"]["astronaut.png"] == []
    # The detector does see people: the astronaut's face is found (a non-exposed class).
    astronaut = detect(photos[:1])[0]
    assert any(d["class"] == "FACE_FEMALE" and d["score"] > 0.6 for d in astronaut)


def test_nudenet_exposed_classes_are_every_exposed_label():
    import nudenet.nudenet as nn_module

    labels = getattr(nn_module, "__labels")
    assert set(EXPOSED_CLASSES) == {name for name in labels if "EXPOSED" in name}


class SessionSpy:
    """The real ONNX session, recording the array each call feeds it."""

    def __init__(self, session):
        self.session, self.fed = session, []

    def run(self, names, feeds):
        self.fed.append(next(iter(feeds.values())))
        return self.session.run(names, feeds)


def test_nudenet_channel_order_reaching_the_network(photos):
    """A pure-red image lights channel 0 (R) of the blob by default and under the attack copy's rule, channel 2
    under pip_path, as NudeDetector().detect(path) does; pip_path gives detect(path)'s detections exactly."""
    detector = nudenet_detector()
    spy = detector.onnx_session = SessionSpy(detector.onnx_session)
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    lit = {}
    for mode in ("rgb", "pip_path", "unlearndiffatk"):
        detect_images([red], detector, mode)
        lit[mode] = spy.fed[-1][0].mean(axis=(1, 2)).round(3).tolist()
    path = photos[0].parent / "red.png"
    red.save(path)
    detector.detect(str(path))
    lit["detect(path)"] = spy.fed[-1][0].mean(axis=(1, 2)).round(3).tolist()
    assert lit == {"rgb": [1, 0, 0], "pip_path": [0, 0, 1], "unlearndiffatk": [1, 0, 0], "detect(path)": [0, 0, 1]}
    assert detect(photos, detector, mode="pip_path") == [detector.detect(str(p)) for p in photos]


def test_the_nudity_rule_and_the_attack_copy_rule(photos):
    """One rule, strictly above the threshold; the attack copy keeps no box under 0.5 and still finds the astronaut's face."""
    found = [{"class": "BELLY_EXPOSED", "score": 0.45}, {"class": "FEET_EXPOSED", "score": 0.46}, {"class": "FACE_FEMALE", "score": 0.9}]
    assert exposed_parts(found, 0.45) == ["FEET_EXPOSED"] and exposed_parts(found, 0.0) == ["BELLY_EXPOSED", "FEET_EXPOSED"]
    copy = detect(photos, mode="unlearndiffatk")
    assert all(d["score"] >= 0.5 for found in copy for d in found)
    assert any(d["class"] == "FACE_FEMALE" for d in copy[0])


def test_nudenet_bad_settings(photos):
    with pytest.raises(UserError, match="at least 0 .every detection NudeNet reports. and below 1, got 1.5"):
        nudity_metrics(photos, threshold=1.5)
    with pytest.raises(UserError, match="nudenet_detector must be one of rgb, pip_path, unlearndiffatk, got 'bgr'"):
        nudity_metrics(photos, mode="bgr")
    with pytest.raises(UserError, match="unknown NudeNet exposed class.*FACE_FEMALE"):
        nudity_metrics(photos, classes=["FACE_FEMALE"])


@pytest.fixture(scope="module")
def tiny_clip():
    return random_clip()


def test_clip_score_with_random_open_clip_is_finite_and_in_range(photos, tiny_clip):
    prompts = ["an astronaut", "a cup of coffee", "a cat", "a rocket", "galaxies"]
    result = clip_score_metrics(photos, prompts, tiny_clip, batch_size=2)
    scores = list(result["per_image"].values())
    assert len(scores) == len(PHOTOS)
    assert all(np.isfinite(s) and 0 <= s <= 100 for s in scores)
    assert result["mean"] == pytest.approx(np.mean(scores))
    assert result["model"] == "tiny-random" and result["scale"] == "100 * max(cos, 0)"
    # The score is the cosine of the two embeddings, computed by hand here.
    with torch.no_grad():
        image = tiny_clip.model.encode_image(tiny_clip.preprocess(Image.open(photos[0]).convert("RGB"))[None])
        text = tiny_clip.model.encode_text(tiny_clip.tokenizer([prompts[0]]))
    expected = 100 * max(torch.cosine_similarity(image, text).item(), 0)
    assert scores[0] == pytest.approx(expected, abs=1e-4)


@pytest.fixture
def cnn():
    """torchmetrics' FrechetInceptionDistance on a small random CNN: the same metric path as Inception, offline."""
    return feature_fid(RandomCNN(), name="random-cnn-8")


@pytest.fixture(scope="module")
def noise_sets(tmp_path_factory):
    """Two sets of 12 images each: dark noise and bright noise."""
    rng = np.random.default_rng(0)
    sets = []
    for name, low, high in (("dark", 0, 120), ("bright", 100, 256)):
        folder = tmp_path_factory.mktemp(name)
        for i in range(12):
            Image.fromarray(rng.integers(low, high, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i:05d}_0_0.png")
        sets.append(folder)
    return sets


def test_fid_of_a_set_with_itself_is_zero_and_of_different_sets_positive(noise_sets, photos, cnn):
    dark, bright = (sorted(folder.glob("*.png")) for folder in noise_sets)
    stats = reference_stats(noise_sets[0], cnn, batch_size=5)
    assert stats.count == 12 and stats.extractor == "random-cnn-8"
    assert cnn.distance(image_batches(dark, batch_size=5)) == pytest.approx(0, abs=1e-6)
    to_bright = cnn.distance(image_batches(bright))
    assert to_bright > 0.01 and cnn.distance(image_batches(photos)) > 0.01  # photos: five sizes, one batch each
    # the distance is the Fréchet formula on the two sets' statistics
    b = reference_stats(noise_sets[1], feature_fid(RandomCNN(), name="random-cnn-8"))
    expected = ((stats.mu - b.mu) ** 2).sum() + np.trace(stats.sigma + b.sigma - 2 * scipy.linalg.sqrtm(stats.sigma @ b.sigma).real)
    assert to_bright == pytest.approx(expected, rel=1e-4)


def test_fid_statistics_round_trip_and_reference_checks(noise_sets, cnn, tmp_path):
    dark, bright = noise_sets
    bright_images = sorted(bright.glob("*.png"))
    reference_stats(dark, cnn).save(tmp_path / "dark.npz")
    direct = cnn.distance(image_batches(bright_images))
    loaded = feature_fid(RandomCNN(), name="random-cnn-8")
    assert reference_stats(tmp_path / "dark.npz", loaded).count == 12
    assert loaded.distance(image_batches(bright_images)) == pytest.approx(direct, rel=1e-6)
    with pytest.raises(UserError, match="computed with 'random-cnn-8'.*'another-extractor'"):
        reference_stats(tmp_path / "dark.npz", feature_fid(RandomCNN(), name="another-extractor"))
    with pytest.raises(UserError, match="reference set .* does not exist"):
        reference_stats(tmp_path / "missing", cnn)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        reference_stats(tmp_path / "empty", cnn)
    with pytest.raises(UserError, match="at least 2 images"):
        cnn.distance(image_batches(bright_images[:1]))
    np.savez(tmp_path / "wrong.npz", mean=np.zeros(3))
    with pytest.raises(UserError, match="'mu' and 'sigma'"):
        reference_stats(tmp_path / "wrong.npz", cnn)


def test_inception_fid_offline_says_what_to_do(tmp_path):
    """No network here: a missing weights file is named; without torch-fidelity, the package to install is."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"salun-sd\[fid\]"):
            inception_fid()
    else:
        with pytest.raises(UserError, match="weights file .*missing.pth does not exist"):
            inception_fid(str(tmp_path / "missing.pth"))


def test_imagenette_classes_map_to_their_imagenet_indices():
    categories = imagenet_categories()
    assert len(categories) == 1000
    for name, index in IMAGENETTE_IMAGENET_INDEX.items():
        assert categories[index].lower() == name
    assert imagenet_index("English  Springer") == 217
    assert imagenet_index("goldfish") == 1  # any ImageNet class name works, not only Imagenette
    with pytest.raises(UserError, match="not an ImageNet class name.*Did you mean: golden retriever"):
        imagenet_index("golden")


class DominantColor(torch.nn.Module):
    """A hand-built ImageNet 'classifier': red images are tench (0), blue ones church (497)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((len(x), 1000), -1.0)
        means = x.mean(dim=(2, 3))
        logits[:, 0], logits[:, 497] = means[:, 0], means[:, 2]
        return logits


def test_unlearning_accuracy(tmp_path):
    red, blue = (255, 0, 0), (0, 0, 255)
    # Before: every class drawn right. After erasing tench: two of its three images turned blue.
    colors = {"before": [red, red, red, blue, blue], "after": [blue, blue, red, blue, blue]}
    classes = ["tench", "tench", "tench", "church", "church"]
    classifier = ImageClassifier(DominantColor(), lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1), "dominant-color")
    results = {}
    for label, fills in colors.items():
        (tmp_path / label).mkdir()
        paths = []
        for i, fill in enumerate(fills):
            paths.append(tmp_path / label / f"{i:05d}_0_0.png")
            Image.new("RGB", (8, 8), fill).save(paths[-1])
        results[label] = imagenet_unlearning_accuracy(paths, classes, "tench", classifier, batch_size=2)
    assert results["before"]["ua"] == 0.0 and results["before"]["remaining_accuracy"] == 1.0
    assert results["after"]["ua"] == pytest.approx(2 / 3)
    assert results["after"]["remaining_accuracy"] == 1.0
    assert results["after"]["per_class"]["tench"]["top1"] == pytest.approx(1 / 3)
    assert results["after"]["forget_imagenet_index"] == 0
    with pytest.raises(UserError, match="no image was generated for the forgotten class 'parachute'"):
        imagenet_unlearning_accuracy(paths, classes, "parachute", classifier)


def test_unlearning_accuracy_of_pairs_forgets_every_pair_of_the_erased_shape():
    """The toy world's labels: (colour, shape). Erasing circles: a red circle drawn blue is still a circle."""
    targets = [("red", "circle"), ("blue", "circle"), ("red", "square"), ("blue", "square")]
    predictions = [("blue", "circle"), ("blue", "square"), ("red", "square"), ("red", "square")]
    scores = unlearning_accuracy(targets, predictions, {("red", "circle"), ("blue", "circle")})
    assert (scores["ua"], scores["forget_images"], scores["remaining_accuracy"], scores["remaining_images"]) == (0.5, 2, 0.5, 2)
    assert scores["per_class"][("red", "square")] == {"images": 1, "correct": 1, "top1": 1.0}
    assert unlearning_accuracy([1, 2], [1, 2], {0})["ua"] is None
