"""The comparison's bookkeeping: which prompts are forgotten, and the table it writes."""

import json
from dataclasses import replace

import torch

from salun_sd.toyworld.classifier import load_classifier
from salun_sd.toyworld.compare import Case, CompareConfig, feature_distance, markdown
from salun_sd.toyworld.world import WorldSpec, prompts


def test_cases_split_the_world():
    spec = WorldSpec()
    forget, remain = Case("shape", "circle").split(spec)
    assert forget == [f"a photo of a {c} circle" for c in spec.colours]
    assert sorted(forget + remain) == sorted(prompts(spec)) and not set(forget) & set(remain)
    forget, remain = Case("colour", "red").split(spec)
    assert forget == [f"a photo of a red {s}" for s in spec.shapes] and len(remain) == 12


def test_frechet_distance_in_the_classifier_features_is_zero_on_itself_and_grows_with_shift():
    a = torch.rand(96, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    fd = feature_distance(load_classifier(), a)
    assert fd.distance([a]) < 1e-3
    assert fd.distance([a + 0.2]) > fd.distance([a + 0.05]) > 0


def test_markdown_table_has_a_row_per_method():
    rows = [{"method": m, "UA": 0.5, "remaining_acc": 0.9, "FD": 0.1, "seconds": 3.0} for m in ("base", "salun", "ga")]
    md = markdown({"shape circle": rows}, CompareConfig(methods=["salun", "ga"]))
    assert md.count("\n| salun | 0.500 | 0.900 | 0.10 | 3 |") == 1 and "toyworld-shape-circle.png" in md


def test_grid_has_a_row_per_model_and_a_column_per_prompt(tmp_path):
    import torch
    from PIL import Image

    from salun_sd.toyworld.compare import grid

    texts = ["a photo of a red circle"] * 2 + ["a photo of a blue square"] * 2
    rows = [{"method": m, "images": torch.zeros(4, 3, 16, 16), "texts": texts} for m in ("base", "salun")]
    grid(rows, per_prompt=2, path=tmp_path / "g.png", scale=4)
    w, h = Image.open(tmp_path / "g.png").size
    assert (w - 60, h - 28) == (2 * 64, 2 * 64)


def test_anchor_replaces_the_erased_concept_by_one_neighbour():
    spec = WorldSpec()
    assert Case("shape", "circle").anchor(spec) == [f"a photo of a {c} square" for c in spec.colours]
    assert Case("colour", "red").anchor(spec) == [f"a photo of a green {s}" for s in spec.shapes]


def test_compare_command_parses():
    import argparse

    from salun_sd.toyworld.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    from salun_sd.config import config_from_args

    args = parser.parse_args(["compare", "--methods", "salun", "ft", "--steps", "5", "--attack", "false", "--output_dir", "x"])
    cfg = config_from_args(args)
    assert cfg.methods == ["salun", "ft"] and cfg.steps == 5 and cfg.shape == "circle" and cfg.colour == "red" and not cfg.attack and cfg.output_dir == "x"
    assert all(action.help for action in parser._subparsers._group_actions[0].choices["compare"]._actions)  # every flag has a help line


def test_aggregate_over_seeds_gives_mean_and_std_in_the_table():
    from salun_sd.toyworld.compare import aggregate

    def run(ua):
        return [{"method": "salun", "UA": ua, "remaining_acc": 1.0, "FD": 2.0, "seconds": 10.0, "images": None, "texts": None}]

    rows = aggregate([run(1.0), run(0.5)])
    assert rows[0]["UA"] == 0.75 and rows[0]["UA_std"] == 0.25 and rows[0]["seeds"] == 2
    md = markdown({"shape circle": rows}, CompareConfig(seeds=[0, 1]))
    assert "| salun | 0.750 ± 0.250 | 1.000 ± 0.000 | 2.00 ± 0.00 | 10 ± 0 |" in md and "mean ± std over seeds 0, 1" in md


def test_several_concepts_keep_every_erased_concept_out_of_each_anchor():
    spec = WorldSpec()
    circle, square, red = Case("shape", "circle"), Case("shape", "square"), Case("colour", "red")
    assert circle.anchor(spec, (circle, square)) == [f"a photo of a {c} triangle" for c in spec.colours]  # the next shape not erased
    assert circle.anchor(spec, (circle, red)) == [f"a photo of a {c} square" for c in spec.colours if c != "red"]
    assert Case.named("red", spec) == red


def test_joint_and_sequential_cases_run_on_the_toy_world(tmp_path):
    """Two concepts at once and one after another with SalUn, a few steps: UA per concept so far, the second step
    erased from the first one's export (its card lists both), and the tables."""
    from salun_sd.toyworld.compare import compare

    cfg = CompareConfig(output_dir=str(tmp_path), methods=["salun"], single=False, joint=["circle", "red"], sequential=["circle", "red"], seeds=[0],
                        attack=False, forget_per_prompt=2, remain_per_prompt=1, steps=2, eval_per_prompt=1)
    md = compare(cfg).read_text()
    assert "### Jointly: circle, red" in md and "### One after another: circle, red" in md
    assert "| salun | 1 | " in md and "| salun | 2 | " in md and "| UA circle ↑ | UA red ↑ |" in md
    step2 = tmp_path / "runs" / "seed0" / "sequential-circle-red" / "step2" / "salun" / "pipeline"
    card = (step2 / "README.md").read_text()
    assert '"shape circle", "colour red" erased' in card
    assert card.count("| 1 | shape circle |") == 1 and "earlier concepts kept in the remain set" in card


def test_the_final_model_of_a_sequential_case_is_attacked_per_concept(tmp_path):
    """With `attack`, the base and each method's last-step export are attacked on every concept's prompts; the rates
    land in that step's row and in a table, and the erases are not redone when only the attack settings change."""
    from salun_sd.toyworld.compare import compare

    cfg = CompareConfig(output_dir=str(tmp_path), methods=["salun"], single=False, sequential=["circle", "red"], seeds=[0], attack=False,
                        forget_per_prompt=2, remain_per_prompt=1, steps=2, eval_per_prompt=1, attack_prompts=1, attack_timesteps=1, attack_iterations=1)
    compare(cfg)
    out = tmp_path / "runs" / "seed0" / "sequential-circle-red"
    erased = (out / "rows.pt").stat().st_mtime_ns
    md = compare(replace(cfg, attack=True)).read_text()
    assert (out / "rows.pt").stat().st_mtime_ns == erased  # the erases were reused
    assert "| method | step | circle: pre-ASR / discrete / embedding / random ↓ | red: pre-ASR / discrete / embedding / random ↓ |" in md
    rows = json.loads((tmp_path / "results.json").read_text())["One after another: circle, red"]["per_seed"]["0"]
    final = [r for r in rows if r["method"] == "salun" and r["step"] == 2][0]
    assert {"pre_ASR circle", "ASR_discrete circle", "ASR_embedding circle", "ASR_random red"} <= set(final)
    assert "pre_ASR circle" not in [r for r in rows if r["step"] == 1][0]  # only the final model is attacked
    base = [r for r in rows if r["method"] == "base"][0]
    assert base["pre_ASR circle"] == 1.0 and base["pre_ASR red"] == 1.0  # the base model draws both concepts from the plain prompts
    reports = sorted(p.relative_to(out).as_posix() for p in out.glob("attack/*/*/report.json"))
    assert reports == ["attack/base/colour-red/report.json", "attack/base/shape-circle/report.json",
                       "attack/salun/colour-red/report.json", "attack/salun/shape-circle/report.json"]
