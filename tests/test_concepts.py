"""Several concepts at once (joint) and one after another (sequential) on the offline tiny pipeline (issue 20)."""

import json
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator

from conftest import FORGET, REMAIN, exported_unet, tiny_config
from salun_sd.core.denoiser import ConceptData
from salun_sd.core.draws import draw_batch
from salun_sd.core.objectives import Batch, salun_loss
from salun_sd.core.saliency import load_mask
from salun_sd.errors import UserError
from salun_sd.families.config import ConceptConfig, ImageGroup
from salun_sd.families.erase import erase
from salun_sd.families.sd_unet import sd_denoiser
from salun_sd.families.tiny import tiny_pipeline

VIOLENT = "a photo of a violent person"
MISALIGNED_A, MISALIGNED_B = "a photo of a person wearing clothes", "a photo of a calm person"


def two_concepts(out, cache, **train):
    """The tiny erase with a second concept next to the nudity one, each with its own c'."""
    cfg = tiny_config(out, cache, **train)
    cfg.concept = ""
    cfg.data.concepts = [
        ConceptConfig("nudity", cfg.data.forget, [MISALIGNED_A], ["nude"]),
        ConceptConfig("violence", [ImageGroup(prompt=VIOLENT, generate=8)], [MISALIGNED_B], ["violent"]),
    ]
    cfg.data.forget = []
    cfg.data.remain.append(ImageGroup(prompt=MISALIGNED_B, generate=4))
    return cfg


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda cfg: setattr(cfg.data, "forget", []), "the forget set is empty"),
        (lambda cfg: cfg.data.concepts.append(ConceptConfig("nudity", [ImageGroup(prompt="x", generate=1)])), "two concepts are named 'nudity'"),
        (lambda cfg: cfg.data.concepts.append(ConceptConfig("gore")), "concept 'gore' has no forget data"),
        (lambda cfg: cfg.data.concepts.append(ConceptConfig("gore", [ImageGroup(prompt="gore", generate=1)], ["gore"])), "is the concept itself"),
        (lambda cfg: cfg.data.concepts.append(ConceptConfig("gore", [ImageGroup(prompt="gore", generate=1)], [FORGET])), "forget prompt of concept 'nudity'"),
        (lambda cfg: setattr(cfg.data.concepts[0], "weight", -1.0), "weight must be a non-negative number"),
    ],
    ids=["empty", "duplicate", "no_forget_data", "misaligned_is_itself", "misaligned_is_erased", "negative_weight"],
)
def test_bad_concept_lists_are_one_line_errors_before_anything_loads(tmp_path, data_cache, change, message):
    cfg = two_concepts(tmp_path / "run", data_cache)
    if message == "the forget set is empty":
        cfg = tiny_config(tmp_path / "run", data_cache)
    change(cfg)
    with pytest.raises(UserError, match=message) as err:
        erase(cfg, Accelerator(cpu=True))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before the run folder was claimed or any model loaded


def test_a_concepts_file_is_one_line_of_config(tmp_path):
    rows = "name,forget,misaligned,words\nVan Gogh,a painting by Van Gogh|a landscape by Van Gogh,a painting,\nMonet,a painting by Monet,a painting,monet\n"
    (tmp_path / "artists.csv").write_text(rows)
    cfg = tiny_config(tmp_path / "run", tmp_path)
    cfg.concept, cfg.data.forget, cfg.data.concepts_file, cfg.data.concepts_file_generate = "", [], str(tmp_path / "artists.csv"), 5
    cfg.data.remain = [ImageGroup(prompt="a painting", generate=4)]
    gogh, monet = cfg.data.concept_list()
    assert [g.prompt for g in gogh.forget] == ["a painting by Van Gogh", "a landscape by Van Gogh"] and all(g.generate == 5 for g in gogh.forget)
    assert gogh.misaligned_prompts == ["a painting"] and gogh.concept_words == ["by", "van", "gogh", "landscape"]  # words no remain prompt has
    assert (monet.name, monet.concept_words) == ("Monet", ["monet"])
    (tmp_path / "bad.csv").write_text("name,prompt\nx,y\n")
    cfg.data.concepts_file = str(tmp_path / "bad.csv")
    with pytest.raises(UserError, match="missing 'forget'"):
        cfg.data.concept_list()


def test_one_concept_written_as_a_list_gives_the_same_weights_as_the_old_config(tmp_path, data_cache):
    """data.forget (every config before multi-concept) and the same concept as the one entry of data.concepts
    train the same weights, bit for bit (checked against the code before multi-concept too: docs/RESULTS.md)."""
    old = tiny_config(tmp_path / "old", data_cache, max_steps=2)
    old.validation_grid = False
    new = tiny_config(tmp_path / "new", data_cache, max_steps=2)
    new.validation_grid, new.concept = False, ""
    new.data.concepts, new.data.forget = [ConceptConfig("nudity", new.data.forget)], []
    erase(tiny_config(tmp_path / "warm", data_cache), Accelerator(cpu=True), ("mask",))  # both runs read the images from the cache
    for cfg in (old, new):
        erase(cfg, Accelerator(cpu=True))
    a, b = exported_unet(tmp_path / "old"), exported_unet(tmp_path / "new")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def joint(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("joint") / "two"
    cfg = two_concepts(out, data_cache)
    cfg.validation_grid = False
    erase(cfg, Accelerator(cpu=True))
    return out, cfg


def test_joint_erase_of_two_concepts_keeps_every_weight_outside_the_mask(joint):
    out, _ = joint
    base = dict(tiny_pipeline().unet.named_parameters())
    new = exported_unet(out)
    mask = load_mask(out / "mask.safetensors", tiny_pipeline().unet)
    moved = 0
    for name, m in mask.items():
        assert torch.equal(new[name][~m], base[name].detach()[~m]), name
        moved += int((new[name][m] != base[name].detach()[m]).sum())
    assert moved > 0
    card = (out / "pipeline" / "README.md").read_text()
    assert '"nudity", "violence" erased' in card and MISALIGNED_B in card
    step, = json.loads((out / "pipeline" / "salun_manifest.json").read_text())["erased"]
    assert [c["name"] for c in step["concepts"]] == ["nudity", "violence"] and [c["examples"] for c in step["concepts"]] == [8, 8]


def test_each_forget_example_draws_its_own_concepts_misaligned_prompt():
    den = sd_denoiser(tiny_pipeline(), [FORGET, VIOLENT, MISALIGNED_A, MISALIGNED_B, REMAIN], (), 32)
    ids = {p: den.cond_id(p) for p in (FORGET, VIOLENT, MISALIGNED_A, MISALIGNED_B, REMAIN)}
    data = ConceptData(torch.zeros(8, 4, 4, 4), torch.tensor([ids[FORGET]] * 4 + [ids[VIOLENT]] * 4), torch.tensor([0] * 4 + [1] * 4))
    candidates = [torch.tensor([ids[MISALIGNED_A], ids[REMAIN]]), torch.tensor([ids[MISALIGNED_B]])]
    batch = draw_batch(data, den, 0, "forget", 0, 8, 0, 8, candidates)
    for cond, c in zip(batch.cond.tolist(), batch.misaligned.tolist()):
        assert c in (candidates[0] if cond == ids[FORGET] else candidates[1]).tolist()


def test_a_concepts_weight_scales_its_examples_in_the_forget_term():
    den = sd_denoiser(tiny_pipeline(), [FORGET, VIOLENT, MISALIGNED_A], (), 32)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    both = Batch(x0, torch.tensor([den.cond_id(FORGET), den.cond_id(VIOLENT)]), noise, torch.tensor([10, 500]), torch.tensor([den.cond_id(MISALIGNED_A)] * 2))
    only_a = Batch(x0[:1], both.cond[:1], noise[:1], both.t[:1], both.misaligned[:1])
    cfg = tiny_config("unused", "unused").unlearn
    remain = replace(only_a, cond=torch.tensor([den.cond_id(MISALIGNED_A)]))
    with torch.no_grad():
        _, alone = salun_loss(den, den.model, only_a, remain, cfg, None)
        _, weighted = salun_loss(den, den.model, replace(both, weight=torch.tensor([2.0, 0.0])), remain, cfg, None)
    assert weighted["forget"].item() == pytest.approx(alone["forget"].item(), rel=1e-5)  # (2·l_A + 0·l_B) / 2 = l_A


def test_the_union_mask_is_the_union_of_each_concepts_own_mask(joint, tmp_path, data_cache):
    """mask.per_concept: each concept's top fraction from its own gradient pass, united; each alone is the mask
    a one-concept run of that concept makes."""
    _, cfg = joint
    united = replace(cfg, output_dir=str(tmp_path / "union"), mask=replace(cfg.mask, per_concept=True))
    erase(united, Accelerator(cpu=True), ("mask",))
    alone = []
    for concept in cfg.data.concepts:
        one = tiny_config(tmp_path / concept.name, data_cache)
        one.concept, one.data.forget, one.data.misaligned_prompts = concept.name, concept.forget, concept.misaligned_prompts
        erase(one, Accelerator(cpu=True), ("mask",))
        alone.append(load_mask(tmp_path / concept.name / "mask.safetensors", tiny_pipeline().unet))
    union = load_mask(tmp_path / "union" / "mask.safetensors", tiny_pipeline().unet)
    assert all(torch.equal(union[n], alone[0][n] | alone[1][n]) for n in union)
    kept = sum(int(m.sum()) for m in union.values()) / sum(m.numel() for m in union.values())
    assert 0.5 < kept < 1.0  # each keeps its own half; the halves overlap but are not the same


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, data_cache):
    """Erase nudity from the tiny pipeline, then violence from that export."""
    root = tmp_path_factory.mktemp("sequential")
    first = tiny_config(root / "first", data_cache)
    first.validation_grid = False
    erase(first, Accelerator(cpu=True))
    second = tiny_config(root / "second", data_cache)
    second.model, second.concept, second.validation_grid = str(root / "first" / "pipeline"), "violence", False
    second.data.forget, second.data.misaligned_prompts = [ImageGroup(prompt=VIOLENT, generate=8)], [MISALIGNED_B]
    erase(second, Accelerator(cpu=True))
    return root


def test_a_second_step_starts_from_the_first_export_and_its_card_lists_both(sequential):
    from diffusers import StableDiffusionPipeline

    root = sequential
    card = (root / "second" / "pipeline" / "README.md").read_text()
    assert '"nudity", "violence" erased' in card and "base_model: tiny" in card
    assert card.index("| 1 | nudity |") < card.index("| 2 | violence |") and "### Step 2 (this export): violence" in card
    steps = json.loads((root / "second" / "pipeline" / "salun_manifest.json").read_text())["erased"]
    assert [s["base_model"] for s in steps] == ["tiny", str(root / "first" / "pipeline")]
    assert steps[1]["settings"]["earlier concepts kept in the remain set"] == [FORGET]  # nudity's prompt holds its erased images
    before, after = exported_unet(root / "first"), exported_unet(root / "second")
    mask = load_mask(root / "second" / "mask.safetensors", tiny_pipeline().unet)
    assert all(torch.equal(after[n][~m], before[n][~m]) for n, m in mask.items())  # outside step 2's mask: step 1's weights
    pipe = StableDiffusionPipeline.from_pretrained(root / "second" / "pipeline")
    assert all(torch.equal(p.detach(), after[n]) for n, p in pipe.unet.named_parameters())


def test_single_file_exports_carry_every_step(tmp_path, data_cache):
    """A single-file base erased twice: each step's model.safetensors loads with from_single_file, and the
    second step's file (erased from the first one's) records both concepts."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ldm_layout import ldm_checkpoint
    from salun_sd.families.config import SingleFileConfig

    save_file(ldm_checkpoint(tiny_pipeline()), str(tmp_path / "base.safetensors"))
    tiny_pipeline().save_pretrained(tmp_path / "configs")
    model = str(tmp_path / "base.safetensors")
    for step, (name, prompt) in enumerate([("nudity", FORGET), ("violence", VIOLENT)], 1):
        cfg = tiny_config(tmp_path / name, data_cache, max_steps=1)
        cfg.model, cfg.concept, cfg.validation_grid = model, name, False
        cfg.single_file = SingleFileConfig(config=str(tmp_path / "configs"), export=True)
        cfg.data.forget = [ImageGroup(prompt=prompt, generate=8)]
        erase(cfg, Accelerator(cpu=True))
        model = str(tmp_path / name / "model.safetensors")
        StableDiffusionPipeline.from_single_file(model, config=str(tmp_path / "configs"))
        with safe_open(model, framework="pt") as f:
            steps = json.loads(f.metadata()["salun_sd"])["erased"]
        assert [c["name"] for s in steps for c in s["concepts"]] == ["nudity", "violence"][:step]


def test_an_attack_on_a_prompt_set_with_a_concept_column_reports_each_concept(tmp_path):
    from salun_sd.attack.report import totals
    from salun_sd.evaluation.prompts import load_prompts

    (tmp_path / "p.csv").write_text("prompt,concept\na nude person,nudity\na violent scene,violence\nanother nude person,nudity\n")
    records = load_prompts(str(tmp_path / "p.csv")).records
    assert [r.concept for r in records] == ["nudity", "violence", "nudity"]
    results = [{"concept": r.concept, "pre_success": False, "attacks": {"discrete": {"success": hit}}} for r, hit in zip(records, (True, False, False))]
    summary = totals(results, ["discrete"])
    assert summary["discrete"]["success"] == 1
    assert {c: (t["prompts"], t["discrete"]["success"]) for c, t in summary["per_concept"].items()} == {"nudity": (2, 1), "violence": (1, 0)}
