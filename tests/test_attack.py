"""`salun-sd attack` on the toy world: UnlearnDiffAtk and the embedding attack against the shipped base and a
model erased in the test with the real erase flow."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from salun_sd.attack.baseline import random_prefixes
from salun_sd.attack.config import AttackConfig
from salun_sd.attack.discrete import DiscretePrefixes, project_simplex
from salun_sd.attack.embedding import EmbeddingPrefixes
from salun_sd.attack.judges import load_judge, nudenet_judge, user_judge
from salun_sd.attack.run import attack, eos_padded, text_encoder_source
from salun_sd.attack.search import StackedAdam, search
from salun_sd.attack.target import Victim, attack_pipeline
from salun_sd.errors import UserError
from salun_sd.evaluation.stats import wilson
from salun_sd.generation import ImageRequest
from salun_sd.run.runtime import make_accelerator
from salun_sd.toyworld.pipeline import PIPELINE_DIR, load_toy_pipeline

CIRCLES = ["a photo of a red circle", "a photo of a blue circle"]
SQUARES = ["a photo of a red square", "a photo of a blue square"]


def toy_config(tmp_path, prompts: list[str], **overrides) -> AttackConfig:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    settings = {"model": str(PIPELINE_DIR), "base": str(PIPELINE_DIR), "prompts": str(path), "output_dir": str(tmp_path / "out"), "judge": "toyworld",
                "concept": "circle", "scheduler": "", "steps": 10, "guidance": 3.0, "reference_guidance": 3.0, "timesteps": 2, "iterations": 2, **overrides}
    return AttackConfig(**settings)


def test_simplex_projection_returns_distributions_and_is_exact_on_simple_cases():
    simple = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.5, 0.5], [2.0, 0.0, 0.0], [1.0, 1.0, -5.0], [-3.0, -3.0, -3.0]])
    expected = torch.tensor([[0.2, 0.3, 0.5], [1 / 3] * 3, [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3] * 3])
    torch.testing.assert_close(project_simplex(simple), expected, rtol=0, atol=1e-6)
    rows = (torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)) * 0.01 + 1 / 1000).double()
    p = project_simplex(rows)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(6, dtype=p.dtype))
    for row, got in zip(rows, p):  # optimality: p = max(v - theta, 0) for one theta per row
        theta = (row - got)[got > 0]
        assert theta.max() - theta.min() < 1e-12 and (row[got == 0] <= theta.min() + 1e-12).all()


def reference_latent(pipe, prompt: str) -> torch.Tensor:
    """The base model's image of the prompt as a latent, as the attack's reference."""
    image = pipe(prompt, num_inference_steps=10, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    return pipe.vae.encode(image * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor


@pytest.fixture(scope="module")
def victim():
    pipe = load_toy_pipeline()
    return Victim(attack_pipeline(pipe, pipe), k=5, timesteps=2, steps=10)


def test_attack_succeeds_on_the_toy_base(victim, tmp_path):
    """The concept is not erased: the plain prompt shows it, and so does the first prompt each search rounds to."""
    cfg = toy_config(tmp_path, CIRCLES)
    md = attack(cfg, make_accelerator("no"), log=lambda *_: None)
    report = json.loads((md.parent / "report.json").read_text())
    totals = report["totals"]
    assert totals["pre_success"] == 2 and all(totals[name]["asr"] == 1 for name in ("discrete", "discrete_ids", "embedding", "random"))
    text = md.read_text()
    assert (md.parent / "grids" / "attack_000.png").is_file() and "| pre-attack (plain prompt) | 100.00 % (2/2) [34.24, 100.00] |" in text
    assert "| random prefixes, no optimisation (the chance floor) | 100.00 % (2/2) [34.24, 100.00] |" in text and "| ASR, embedding" in text
    case = victim.case(ImageRequest(CIRCLES[0], 0, 16, 16, 3.0), reference_latent(victim.pipe, CIRCLES[0]))
    verdict = load_judge(cfg).for_prompt(None)
    for space in (DiscretePrefixes(victim.clip_tables, 1, 5, 0.01, 0.1), EmbeddingPrefixes(victim.tables, 1, 5, 0.005)):
        [outcome] = search(victim, [case], space, 2, [verdict], [torch.Generator().manual_seed(0)])
        assert outcome.success and outcome.blocks == 1


@pytest.fixture(scope="module")
def erased(tmp_path_factory):
    """SalUn erases 'circle' from the shipped toy model in a few steps, through the real erase flow."""
    from conftest import toy_erase

    return toy_erase(tmp_path_factory.mktemp("erased"), steps=10)


def test_on_an_erased_model_the_attacks_lower_the_reference_loss_below_the_plain_prompts(erased):
    base, target = load_toy_pipeline(), load_toy_pipeline(erased)
    victim = Victim(attack_pipeline(target, base), k=5, timesteps=3, steps=10)
    case = victim.case(ImageRequest(CIRCLES[0], 0, 16, 16, 3.0), reference_latent(base, CIRCLES[0]))
    [plain] = victim.reference_losses([case], None, seeds=[1])
    never = lambda images: [False] * len(images)  # noqa: E731  run the whole budget
    for space in (DiscretePrefixes(victim.clip_tables, 1, 5, 0.01, 0.1), EmbeddingPrefixes(victim.tables, 1, 5, 0.005)):
        [outcome] = search(victim, [case], space, 10, [never], [torch.Generator().manual_seed(0)])
        assert outcome.blocks == 3 and victim.reference_losses([case], [outcome.slots], seeds=[1])[0] < plain


def test_resume_skips_finished_prompts_and_refuses_other_settings(tmp_path):
    cfg = toy_config(tmp_path, CIRCLES)
    attack(cfg, make_accelerator("no"), log=lambda *_: None)
    results = tmp_path / "out" / "results"
    first = json.loads((results / "00000.json").read_text())
    (results / "00000.json").write_text(json.dumps({**first, "marker": "kept"}))
    (results / "00001.json").unlink()
    attack(cfg, make_accelerator("no"), log=lambda *_: None)
    assert json.loads((results / "00000.json").read_text())["marker"] == "kept" and (results / "00001.json").is_file()
    with pytest.raises(UserError, match="k=5, but this run uses k=3"):
        attack(toy_config(tmp_path, CIRCLES, k=3), make_accelerator("no"))


def test_two_processes_give_the_same_results_as_one(tmp_path):
    from conftest import forked
    from salun_sd.cli import main

    cfg = toy_config(tmp_path, SQUARES, steps=5, attacks="discrete", output_dir=str(tmp_path / "one"))
    attack(cfg, make_accelerator("no"), log=lambda *_: None)
    flags = [f"--{key}={value}" for key, value in vars(cfg).items() if key in ("model", "base", "prompts", "judge", "concept", "scheduler", "steps", "guidance", "reference_steps", "reference_guidance", "timesteps", "iterations", "attacks")]
    forked(main, "attack", *flags, "--output_dir", str(tmp_path / "two"))
    for case in ("00000.json", "00001.json"):
        one, two = (json.loads((tmp_path / run / "results" / case).read_text()) for run in ("one", "two"))
        for result in (one, two):
            for entry in result["attacks"].values():
                entry.pop("seconds", None)
        assert one == two and not one["pre_success"] and len(one["attacks"]["discrete"]["token_ids"]) == 5


def test_a_batched_attack_gives_the_unbatched_ids_and_verdicts(tmp_path):
    """Three instances (two attacked, one already shown by its plain prompt) in one batch and one at a time."""
    prompts = [*SQUARES, CIRCLES[0]]
    runs = {}
    for size in (1, 3):
        cfg = toy_config(tmp_path, prompts, output_dir=str(tmp_path / f"batch{size}"), batch_size=size, steps=4)
        runs[size] = json.loads((attack(cfg, make_accelerator("no"), log=lambda *_: None).parent / "report.json").read_text())["prompts"]
    assert [r["pre_success"] for r in runs[1]] == [False, False, True]
    for one, batched in zip(runs[1], runs[3]):
        for name, entry in one["attacks"].items():
            other = batched["attacks"][name]
            keys = ("success", "blocks", "judged", "token_ids", "ids_success")  # blocks: the attacks; judged: the random baseline
            assert [entry.get(key) for key in keys] == [other.get(key) for key in keys]
            if "loss_trace" in entry:  # the same optimisation, up to the float rounding of a batched forward
                assert entry["loss_trace"] == pytest.approx(other["loss_trace"], rel=1e-4)


def test_stacked_adam_moves_each_row_as_a_lone_adam_and_a_dropped_row_never_again():
    """Rows of one stack under one Adam = one Adam per row, bit for bit, before and after two rows leave."""
    rows = torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(0))
    grads = [torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(s)) for s in range(1, 7)]
    stack = StackedAdam([rows.clone()], lr=0.01, weight_decay=0.1)
    alone = [torch.optim.Adam([row.clone().requires_grad_(True)], lr=0.01, weight_decay=0.1) for row in rows]
    kept = [0, 1, 2, 3]
    for step, grad in enumerate(grads):
        if step == 3:
            stack.keep([0, 2])  # rows 1 and 3 finish; rows 0 and 2 go on as rows 0 and 1 of the stack
            kept = [0, 2]
        stack.tensors[0].grad = grad[kept].clone()
        stack.step()
        for i in kept:
            (p,) = alone[i].param_groups[0]["params"]
            p.grad = grad[i].clone()
            alone[i].step()
    assert stack.tensors[0].shape == (2, 3, 50) and stack.optimizer.param_groups[0]["params"] == stack.tensors
    for n, i in enumerate(kept):
        (p,) = alone[i].param_groups[0]["params"]
        assert torch.equal(stack.tensors[0][n], p.detach())
        state, lone = stack.optimizer.state[stack.tensors[0]], alone[i].state[p]
        assert torch.equal(state["exp_avg"][n], lone["exp_avg"]) and torch.equal(state["exp_avg_sq"][n], lone["exp_avg_sq"]) and int(state["step"]) == 6


def test_an_instance_that_stops_early_leaves_the_others_as_they_would_run_alone(victim):
    """In one batch, instance 0 succeeds at its first image and leaves; instance 1 runs both blocks as it does alone."""
    cases = [victim.case(ImageRequest(prompt, 0, 16, 16, 3.0), reference_latent(victim.pipe, prompt)) for prompt in (CIRCLES[0], SQUARES[0])]
    always, never = (lambda images: [True] * len(images)), (lambda images: [False] * len(images))  # noqa: E731
    for make in (lambda n: DiscretePrefixes(victim.clip_tables, n, 5, 0.01, 0.1), lambda n: EmbeddingPrefixes(victim.tables, n, 5, 0.005)):
        together = search(victim, cases, make(2), 3, [always, never], [torch.Generator().manual_seed(s) for s in (7, 8)])
        [alone] = search(victim, cases[1:], make(1), 3, [never], [torch.Generator().manual_seed(8)])
        assert [o.blocks for o in together] == [1, 2] and together[0].success and alone.blocks == 2 and not alone.success
        assert together[1].loss_trace == pytest.approx(alone.loss_trace, rel=1e-4)
        if alone.slots.ids is not None:
            assert torch.equal(together[1].slots.ids, alone.slots.ids)
        for mine, theirs in zip(together[1].slots.embeddings, alone.slots.embeddings):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_judges_user_function_and_nudenet(tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "my_judges.py").write_text("def red(images):\n    return [image.getpixel((0, 0))[0] > 128 for image in images]\n"
                                           "def one(images):\n    return [True]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "white").point(lambda v: 0)]
    assert user_judge("my_judges:red").for_prompt(None)(images) == [True, False]
    with pytest.raises(UserError, match="one bool per image"):
        user_judge("my_judges:one").for_prompt(None)(images)
    with pytest.raises(UserError, match="cannot import nothing"):
        user_judge("my_judges:nothing")
    assert nudenet_judge(0.45, "unlearndiffatk").for_prompt(None)(images) == [False, False]


def test_shipped_attack_configs_load_and_pass_their_checks():
    from pathlib import Path

    from salun_sd.config import load_yaml

    paths = sorted((Path(__file__).resolve().parents[1] / "configs" / "attack").glob("*.yaml"))
    assert paths
    for path in paths:
        load_yaml(AttackConfig, path).check()
    with pytest.raises(UserError, match="attacks: unknown tokens"):
        AttackConfig(model="m", prompts="p", attacks="discrete,tokens").check()


def test_the_discrete_attack_judges_its_prompt_as_typed(victim):
    """The judged image comes from the decoded prompt re-tokenised, as the official code generates it; the
    official tokenisation pads with end-of-text."""
    case = victim.case(ImageRequest(CIRCLES[0], 0, 16, 16, 3.0), reference_latent(victim.pipe, CIRCLES[0]))
    seen = []
    record = lambda images: seen.extend(images) or [False] * len(images)  # noqa: E731
    [outcome] = search(victim, [case], DiscretePrefixes(victim.clip_tables, 1, 5, 0.01, 0.1), 1, [record], [torch.Generator().manual_seed(0)])
    typed = victim.typed(case, outcome.slots.ids)
    assert typed.prompt == victim.decode(outcome.slots.ids, case) and typed.words == victim.prompt_tokens(typed.prompt) and len(seen) == 2
    assert (np.asarray(seen[-1]) == np.asarray(victim.images([typed], None)[0])).all()
    other = eos_padded(victim.tokenizer)
    other.pad_token = "photo"  # a tokenizer that pads with a word, as SD-2's pads with "!"
    tok = eos_padded(other)
    assert tok("a", padding="max_length").input_ids[-1] == tok.eos_token_id != other("a", padding="max_length").input_ids[-1]
    assert tok is not other and other.pad_token == "photo"
    ids = outcome.slots.ids.tolist() + case.words
    assert tok.decode(ids) == victim.tokenizer.decode(ids) and "</w>" not in tok.decode(ids)  # the copy decodes as the original


def test_every_prompt_counts_and_the_random_baseline_judges_as_many_images_as_the_attack(tmp_path, monkeypatch):
    """A prompt too long for the prefix is judged on its truncated plain prompt and fails each attack; the rates keep
    it in the denominator. The random baseline judges one image per timestep of the attack, or random_prefixes."""
    (tmp_path / "never_judge.py").write_text("def never(images):\n    return [False] * len(images)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    long = "a photo of a " + "red circle " * 40
    cfg = toy_config(tmp_path, [*SQUARES, long], judge="never_judge:never", concept="", attacks="discrete,random", steps=3, timesteps=3, iterations=1)
    report = json.loads((attack(cfg, make_accelerator("no"), log=lambda *_: None).parent / "report.json").read_text())
    totals, prompts = report["totals"], report["prompts"]
    assert totals["prompts"] == 3 and totals["too_long"] == 1 and totals["pre_asr"] == 0 and totals["random"]["success"] == totals["random"]["asr"] == 0
    assert totals["random"]["ci95"] == pytest.approx([0, 0.5615], abs=1e-4) and "per_concept" not in totals  # a text list names no concept
    assert [p["attacks"]["random"].get("judged") for p in prompts] == [3, 3, None]
    assert "not_run" in prompts[2]["attacks"]["discrete"] and prompts[0]["attacks"]["discrete"]["ids_success"] is False
    assert not [p for p in prompts[:2] for name in ("discrete", "random") if "</w>" in p["attacks"][name]["adversarial_prompt"]]
    base = load_toy_pipeline()
    victim = Victim(attack_pipeline(base, base), k=5, timesteps=3, steps=3)
    cases = [victim.case(ImageRequest(p, 0, 16, 16, 3.0), reference_latent(base, p)) for p in SQUARES]
    never = lambda images: [False] * len(images)  # noqa: E731
    drawn = random_prefixes(victim, cases, 7, [never, never], [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    assert [o.judged for o in drawn] == [7, 7] and drawn[0].text == victim.decode(drawn[0].ids, cases[0])


def test_a_prompt_set_with_a_concept_column_is_judged_and_reported_per_concept(tmp_path):
    """Without --concept the toy judge asks each prompt's own concept: the base draws circles and squares as asked, and
    a red circle judged for 'blue' is no pre-attack success. The per-concept rows add up to the totals."""
    csv = tmp_path / "concepts.csv"
    csv.write_text("prompt,concept\na photo of a red circle,circle\na photo of a blue square,square\na photo of a red circle,blue\n")
    cfg = replace(toy_config(tmp_path, [], concept="", attacks="discrete,random", steps=4, timesteps=1, iterations=1), prompts=str(csv))
    md = attack(cfg, make_accelerator("no"), log=lambda *_: None)
    totals = json.loads((md.parent / "report.json").read_text())["totals"]
    groups = totals["per_concept"]
    assert list(groups) == ["circle", "square", "blue"] and [g["pre_success"] for g in groups.values()] == [1, 1, 0]
    for key in ("prompts", "pre_success", "too_long"):
        assert sum(g[key] for g in groups.values()) == totals[key]
    for name in ("discrete", "discrete_ids", "random"):
        assert sum(g[name]["success"] for g in groups.values()) == totals[name]["success"]
        assert all(g[name]["ci95"] == pytest.approx(list(wilson(g[name]["success"], 1))) for g in groups.values())
    text = md.read_text()
    assert "| concept | prompts | pre-attack |" in text and "| circle | 1 | 100.00 % (1/1) [20.65, 100.00] |" in text
    assert "| blue | 1 | 0.00 % (0/1) [0.00, 79.35] |" in text
    with pytest.raises(UserError, match="the toyworld judge needs --concept .* or a 'concept' column; case 0 has neither"):
        attack(toy_config(tmp_path, ["a photo of a red circle"], concept="", output_dir=str(tmp_path / "none")), make_accelerator("no"))
    with pytest.raises(UserError, match="toyworld concept 'nude' is neither a shape"):
        load_judge(toy_config(tmp_path, [], concept="nude"))


def test_the_attack_uses_the_target_text_encoder_when_it_differs():
    base, target = load_toy_pipeline(), load_toy_pipeline()
    assert text_encoder_source(target, base) == "base" and text_encoder_source(base, base) == "base"
    with torch.no_grad():
        next(target.text_encoder.parameters()).add_(1e-3)
    assert text_encoder_source(target, base) == "target"


def test_imagenet_judge_from_the_hub_model_class(monkeypatch):
    """microsoft/resnet-50 loads through transformers' ResNetForImageClassification; offline the loader says so, and a
    tiny model of that class built from its config classifies through the same wrapper."""
    from PIL import Image
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    from salun_sd.evaluation.classify import hub_resnet50_classifier, predict_images, transformers_classifier

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not load microsoft/resnet-50"):
        hub_resnet50_classifier()
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(num_labels=1000, embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], layer_type="basic"))
    classifier = transformers_classifier(model, ConvNextImageProcessor(size={"shortest_edge": 64}), "tiny")
    predictions = predict_images([Image.new("RGB", (80, 60), "red"), Image.new("RGB", (80, 60), "blue")], classifier)
    assert len(predictions) == 2 and all(0 <= p < 1000 for p in predictions)
