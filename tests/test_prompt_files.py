"""prompts/: every file loads with the evaluation loader, and the configs train on the files' first lines."""

from pathlib import Path

import pytest

from salun_sd.config import load_yaml
from salun_sd.evaluation.classify import imagenet_index
from salun_sd.evaluation.prompts import load_prompts
from salun_sd.families.config import EraseConfig
from salun_sd.toyworld.world import prompts as toyworld_prompts

ROOT = Path(__file__).resolve().parents[1]
PROMPT_FILES = sorted(p for p in (ROOT / "prompts").iterdir() if p.name != "README.md")


def lines(name: str) -> list[str]:
    return [r.prompt for r in load_prompts(str(ROOT / "prompts" / name)).records]


def config(name: str) -> EraseConfig:
    return load_yaml(EraseConfig, ROOT / "configs" / name)


@pytest.mark.parametrize("path", PROMPT_FILES, ids=lambda p: p.name)
def test_every_prompt_file_loads_without_duplicates(path):
    records = load_prompts(str(path)).records
    assert records and len({r.prompt for r in records}) == len(records)


def test_class_prompts_name_imagenette_classes_with_distinct_seeds():
    records = load_prompts(str(ROOT / "prompts" / "imagenette_eval.csv")).records
    assert sorted({imagenet_index(r.class_name) for r in records}) == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    assert len({r.seed for r in records}) == len(records)


def test_toyworld_file_is_the_worlds_captions():
    assert lines("toyworld.txt") == toyworld_prompts()


def test_configs_train_on_the_first_lines_of_the_prompt_files():
    nudity = config("nudity.yaml")
    forget, remain, misaligned = lines("nudity_forget.txt")[0], lines("nudity_remain.txt")[0], lines("nudity_misaligned.txt")[0]
    for cfg in (nudity, config("sdxl_nudity.yaml"), *(config(f"methods/{m}.yaml") for m in ("rl", "ga", "ft", "fmn"))):
        assert [g.prompt for g in cfg.data.forget] == [forget]
        assert [g.prompt for g in cfg.data.remain] in ([remain], [])
    assert nudity.data.misaligned() == config("methods/rl.yaml").data.misaligned() == [misaligned]
    tench = config("imagenette_tench.yaml")
    assert all(lines("imagenette_train.txt")[g.hf_label] == g.prompt for g in tench.data.forget + tench.data.remain)
    style = config("style_van_gogh.yaml")
    assert [g.prompt for g in style.data.forget] == lines("van_gogh_forget.txt")[:2]
    assert [g.prompt for g in style.data.remain] == lines("art_styles_remain.txt")[:4]
