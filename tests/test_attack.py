"""`salun-sd attack` on the toy world: UnlearnDiffAtk and the embedding attack against the shipped base and a
model erased in the test with the real erase flow."""

import json

import pytest
import torch

from salun_sd.attack.config import AttackConfig
from salun_sd.attack.discrete import DiscretePrefix, project_simplex
from salun_sd.attack.embedding import EmbeddingPrefix
from salun_sd.attack.judges import load_judge, nudenet_judge, user_judge
from salun_sd.attack.run import attack
from salun_sd.attack.search import search
from salun_sd.attack.target import Victim, attack_pipeline
from salun_sd.errors import UserError
from salun_sd.generation import ImageRequest
from salun_sd.run.runtime import make_accelerator
from salun_sd.toyworld.pipeline import PIPELINE_DIR, load_toy_pipeline

CIRCLES = ["a photo of a red circle", "a photo of a blue circle"]
SQUARES = ["a photo of a red square", "a photo of a blue square"]


def toy_config(tmp_path, prompts: list[str], **overrides) -> AttackConfig:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    settings = {"model": str(PIPELINE_DIR), "base": str(PIPELINE_DIR), "prompts": str(path), "output_dir": str(tmp_path / "out"), "judge": "toyworld",
                "concept": "circle", "scheduler": "", "steps": 10, "guidance": 3.0, "timesteps": 2, "iterations": 2, **overrides}
    return AttackConfig(**settings)


def sort_projection(v: torch.Tensor) -> torch.Tensor:
    """The textbook sort-based projection onto the simplex (Duchi et al. 2008), to check the bisection against."""
    u, _ = torch.sort(v, descending=True)
    css = u.cumsum(0) - 1
    rho = (u - css / torch.arange(1, len(v) + 1, dtype=v.dtype) > 0).nonzero().max()
    return (v - css[rho] / (rho + 1)).clamp(min=0)


def test_simplex_projection_returns_distributions_and_is_exact_on_simple_cases():
    simple = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.5, 0.5], [2.0, 0.0, 0.0], [1.0, 1.0, -5.0], [-3.0, -3.0, -3.0]])
    expected = torch.tensor([[0.2, 0.3, 0.5], [1 / 3] * 3, [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3] * 3])
    torch.testing.assert_close(project_simplex(simple), expected, rtol=0, atol=1e-6)
    rows = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)) * 0.01 + 1 / 1000
    p = project_simplex(rows)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(6), atol=1e-6)
    for row, got in zip(rows.double(), p.double()):
        torch.testing.assert_close(got, sort_projection(row), rtol=0, atol=1e-7)


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
    assert report["totals"]["pre_success"] == 2 and report["totals"]["discrete"]["asr"] == 1 and report["totals"]["embedding"]["asr"] == 1
    assert (md.parent / "grids" / "attack_000.png").is_file() and "| pre-attack (plain prompt) | 100.00 % (2/2) |" in md.read_text()
    case = victim.case(ImageRequest(CIRCLES[0], 0, 16, 16, 3.0), reference_latent(victim.pipe, CIRCLES[0]))
    verdict = load_judge(cfg).for_prompt(None)
    for space in (DiscretePrefix(victim.clip_tables, 5, 0.01, 0.1), EmbeddingPrefix(victim.tables, 5, 0.005)):
        [outcome] = search(victim, [case], [space], 2, [verdict], [torch.Generator().manual_seed(0)])
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
    for space in (DiscretePrefix(victim.clip_tables, 5, 0.01, 0.1), EmbeddingPrefix(victim.tables, 5, 0.005)):
        [outcome] = search(victim, [case], [space], 10, [never], [torch.Generator().manual_seed(0)])
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
    from conftest import salun

    cfg = toy_config(tmp_path, SQUARES, steps=5, attacks="discrete", output_dir=str(tmp_path / "one"))
    attack(cfg, make_accelerator("no"), log=lambda *_: None)
    flags = [f"--{key}={value}" for key, value in vars(cfg).items() if key in ("model", "base", "prompts", "judge", "concept", "scheduler", "steps", "guidance", "timesteps", "iterations", "attacks")]
    salun("attack", *flags, "--output_dir", str(tmp_path / "two"), processes=2)
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
            assert (entry["success"], entry["blocks"], entry.get("token_ids")) == (other["success"], other["blocks"], other.get("token_ids"))
            if "loss_trace" in entry:  # the same optimisation, up to the float rounding of a batched forward
                assert entry["loss_trace"] == pytest.approx(other["loss_trace"], rel=1e-4)


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
