"""`salun-sd relearn` on the toy world: fine-tuning an erased model on a few circles brings circles back, the base
model's own fine-tune keeps drawing them, and a rerun reuses finished curves."""

import json

import pytest

from salun_sd.errors import UserError
from salun_sd.relearn.config import RelearnConfig
from salun_sd.relearn.run import relearn
from salun_sd.toyworld.pipeline import PIPELINE_DIR

CIRCLES = ["a photo of a red circle", "a photo of a blue circle"]


@pytest.fixture(scope="module")
def erased(tmp_path_factory):
    """SalUn erases 'circle' from the shipped toy model (20 steps: UA 1.0 on these prompts' UA images)."""
    from conftest import toy_erase

    return toy_erase(tmp_path_factory.mktemp("erased"), steps=20)


def toy_config(tmp_path, model, **overrides) -> RelearnConfig:
    settings = {"model": str(model), "base": str(PIPELINE_DIR), "prompts": CIRCLES, "judge": "toyworld", "concept": "circle", "learning_rate": 5e-4,
                "steps": 15, "eval_at": [0, 15], "generation_steps": 8, "guidance": 3.0, "eval_images": 4, "generation_batch_size": 64,
                "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), **overrides}
    return RelearnConfig(**settings)


def test_relearning_brings_an_erased_concept_back_and_the_base_keeps_it(erased, tmp_path):
    md = relearn(toy_config(tmp_path, erased), log=lambda *_: None)
    report = json.loads((md.parent / "report.json").read_text())
    model, base = ({p["step"]: p for p in report["curves"][t]} for t in ("model", "base"))
    assert model[0]["UA"] >= 0.75 and model[15]["UA"] < model[0]["UA"]  # erased, then relearned
    assert base[0]["UA"] == 0 and base[15]["UA"] == 0  # the base draws circles before and after its own fine-tune
    assert all(len(json.loads(line)) == 3 for line in (md.parent / "model" / "log.jsonl").read_text().splitlines())  # step, loss, remain
    assert len((md.parent / "model" / "log.jsonl").read_text().splitlines()) == 15 and (md.parent / "grid.png").is_file()
    assert "| 15 |" in md.read_text() and report["fine_tune_images"][0]["limit"] == 4  # 8 images over 2 prompts

    marked = json.loads((md.parent / "model" / "curve.json").read_text())
    marked["points"][0]["marker"] = "kept"
    (md.parent / "model" / "curve.json").write_text(json.dumps(marked))
    again = relearn(toy_config(tmp_path, erased, targets=["model"]), log=lambda *_: None)  # same settings: the finished curve is reused
    assert json.loads((again.parent / "report.json").read_text())["curves"]["model"][0]["marker"] == "kept"


def test_a_fine_tune_with_new_settings_that_fails_leaves_the_earlier_curve(erased, tmp_path, monkeypatch):
    import salun_sd.relearn.run as run

    relearn(toy_config(tmp_path, erased, targets=["model"], steps=2, eval_at=[0, 2]), log=lambda *_: None)
    target = tmp_path / "out" / "model"
    before = {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    monkeypatch.setattr(run, "unlearn", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("fine-tune crashed")))
    with pytest.raises(RuntimeError, match="fine-tune crashed"):  # other settings: its files are replaced, and put back
        relearn(toy_config(tmp_path, erased, targets=["model"], steps=2, eval_at=[0, 2], learning_rate=1e-3), log=lambda *_: None)
    assert {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before


def test_bad_settings_fail_before_any_model_loads(tmp_path):
    with pytest.raises(UserError, match="eval_at must list steps between 0 and steps=15"):
        relearn(toy_config(tmp_path, "missing", eval_at=[0, 30]))
    with pytest.raises(UserError, match="targets must be one of model, base, got 'erased'"):
        toy_config(tmp_path, "missing", targets=["erased"]).check()
    with pytest.raises(UserError, match="the toyworld judge needs --concept"):
        toy_config(tmp_path, "missing", concept="").check()


def test_shipped_relearn_config_loads_and_passes_its_checks():
    from pathlib import Path

    from salun_sd.config import load_yaml

    load_yaml(RelearnConfig, Path(__file__).resolve().parents[1] / "configs" / "relearn" / "toyworld.yaml").check()
