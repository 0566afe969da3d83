"""Prompt sets: the full I2P CSV, the Imagenette class CSV, text lists, filters and bad input."""

import sys
from pathlib import Path

import pytest

from salun_sd.errors import UserError
from salun_sd.evaluation.prompts import filter_prompts, load_prompts

OFFICIAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "salun-official"
I2P_CSV = OFFICIAL / "unsafe-prompts4703.csv"
IMAGENETTE_CSV = OFFICIAL / "imagenette.csv"
needs_shared = pytest.mark.skipif(not I2P_CSV.is_file(), reason="../shared (official SalUn data files) is not present")


@needs_shared
def test_full_i2p_csv_parses_with_per_prompt_settings():
    prompts = load_prompts(str(I2P_CSV))
    records = prompts.records
    assert len(records) == 4703
    assert [r.case_number for r in records] == list(range(4703))
    first = records[0]
    assert first.prompt.startswith("weird and disturbing portrait of todd solondz")
    assert (first.seed, first.guidance, first.width, first.height) == (4261553411, 13.0, 512, 512)
    assert first.categories == ("violence", "self-harm")
    assert first.nudity_percentage == 0.0
    assert all(r.seed is not None and r.guidance is not None for r in records)
    # 55 prompts ask for a size other than 512x512; the default honours them.
    assert sum((r.width, r.height) != (512, 512) for r in records) == 55


@needs_shared
def test_i2p_filters_by_category_and_nudity():
    prompts = load_prompts(str(I2P_CSV))
    sexual = filter_prompts(prompts, categories=["sexual"])
    assert len(sexual.records) == 931
    assert all("sexual" in r.categories for r in sexual.records)
    assert len(filter_prompts(prompts, min_nudity=50).records) == 134
    assert len(filter_prompts(prompts, min_nudity=1e-9).records) == 854  # nudity_percentage > 0
    both = filter_prompts(prompts, categories=["SEXUAL"], min_nudity=50, limit=5).records
    assert len(both) == 5 and all(r.nudity_percentage >= 50 and "sexual" in r.categories for r in both)
    with pytest.raises(UserError, match="unknown category nudity.*sexual"):
        filter_prompts(prompts, categories=["nudity"])


@needs_shared
def test_imagenette_class_csv_with_bom():
    records = load_prompts(str(IMAGENETTE_CSV)).records
    assert len(records) == 10
    assert (records[0].case_number, records[0].prompt, records[0].seed, records[0].class_name) == (0, "Image of tench", 4889, "tench")
    assert records[1].class_name == "english springer"
    assert records[0].guidance is None and records[0].width is None


def test_text_list_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red apple\n\n  a blue car  \na church\n", encoding="utf-8")
    prompts = load_prompts(str(path))
    assert [(r.case_number, r.prompt) for r in prompts.records] == [(0, "a red apple"), (1, "a blue car"), (2, "a church")]
    assert prompts.records[0].seed is None
    with pytest.raises(UserError, match="'categories' column"):
        filter_prompts(prompts, categories=["sexual"])
    with pytest.raises(UserError, match="'nudity_percentage' column"):
        filter_prompts(prompts, min_nudity=50)


def test_hf_i2p_column_names_are_understood(tmp_path):
    """The Hugging Face I2P table names the seed and guidance columns sd_seed / sd_guidance_scale."""
    path = tmp_path / "hf.csv"
    path.write_text("prompt,categories,nudity_percentage,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height\nx,sexual,60.0,7,9,512,384\n")
    record = load_prompts(str(path)).records[0]
    assert (record.case_number, record.seed, record.guidance, record.width, record.height) == (0, 7, 9.0, 512, 384)


@pytest.mark.parametrize(
    "content, message",
    [
        ("text,seed\nhello,1\n", r"no 'prompt' column \(columns found: text, seed\)"),
        ("prompt,evaluation_seed\nhello,abc\n", r"row 1: column 'evaluation_seed' should hold a number, found 'abc'"),
        ("case_number,prompt\n3,a\n3,b\n", "case_number 3 appears in rows 1 and 2"),
        ("prompt,categories\n", "a header but no rows"),
    ],
)
def test_bad_csv_names_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_prompts(str(path))


def test_missing_or_empty_sources(tmp_path):
    with pytest.raises(UserError, match="is not a file"):
        load_prompts(str(tmp_path / "nope.csv"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="holds no prompts"):
        load_prompts(str(empty))


def test_hf_i2p_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` sees when it is not installed
    with pytest.raises(UserError, match="pip install datasets"):
        load_prompts("i2p")
