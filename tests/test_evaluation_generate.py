"""Batch generation with the offline tiny pipeline: files, metadata, resume, per-prompt settings, processes."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import forked
from salun_sd.cli import main
from salun_sd.errors import UserError
from salun_sd.evaluation.config import GenerateConfig
from salun_sd.evaluation.generate import generate_images, plan_jobs
from salun_sd.evaluation.imagefiles import read_metadata
from salun_sd.evaluation.prompts import PromptRecord
from salun_sd.families.tiny import tiny_pipeline
from salun_sd.generation import batches, starting_noise

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    PromptRecord(0, "a red apple", seed=11, guidance=7.0),
    PromptRecord(7, "a church", seed=22, guidance=9.0, width=40, height=32),
    PromptRecord(12, "a nude painting", categories=("sexual",), nudity_percentage=80.0),
]
STEPS = 2


def run(out, **settings) -> GenerateConfig:
    return GenerateConfig(model="tiny", output_dir=str(out), **{"steps": STEPS, **settings}).resolve()


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


def test_plan_honours_per_prompt_settings_and_overrides():
    jobs = plan_jobs(RECORDS, GenerateConfig(images_per_prompt=2), default_size=(32, 32))
    assert [j.file for j in jobs] == [
        "00000_11_0.png", "00000_12_1.png", "00007_22_0.png", "00007_23_1.png", "00012_0_0.png", "00012_1_1.png",
    ]
    church = jobs[2]
    assert (church.guidance, church.height, church.width) == (9.0, 32, 40)
    assert (jobs[4].guidance, jobs[4].height) == (7.5, 32)  # no values in the set: defaults
    forced = plan_jobs(RECORDS, GenerateConfig(seed=5, guidance=3.0, height=24, width=24), default_size=(32, 32))
    assert {(j.seed, j.guidance, j.height, j.width) for j in forced} == {(5, 3.0, 24, 24)}
    # One pipeline call needs one guidance and size: batches never mix them.
    requests = [job.request for job in plan_jobs(RECORDS, GenerateConfig(images_per_prompt=3), (32, 32))]
    for batch in batches(requests, batch_size=4):
        assert len({(requests[i].guidance, requests[i].height, requests[i].width) for i in batch}) == 1


def test_plan_rejects_sizes_the_vae_cannot_take():
    with pytest.raises(UserError, match="30x32 is not a multiple of 8, which the model needs"):
        plan_jobs([PromptRecord(0, "x", width=30)], GenerateConfig(), default_size=(32, 32))


def test_generate_writes_traceable_files_and_resumes(pipe, tmp_path):
    jobs = plan_jobs(RECORDS, GenerateConfig(images_per_prompt=2), default_size=(32, 32))
    first = generate_images(pipe, jobs, run(tmp_path, batch_size=3))
    assert (first.planned, first.already_done, first.generated_here) == (6, 0, 6)
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == sorted(j.file for j in jobs)
    assert Image.open(tmp_path / "00007_22_0.png").size == (40, 32)
    meta = read_metadata(tmp_path)
    assert meta["00012_1_1.png"]["prompt"] == "a nude painting"
    assert meta["00012_1_1.png"]["categories"] == ["sexual"]
    assert (meta["00007_23_1.png"]["seed"], meta["00007_23_1.png"]["guidance"], meta["00007_23_1.png"]["steps"]) == (23, 9.0, STEPS)

    # A killed run: one image lost. The restart makes only that one and leaves the others untouched.
    (tmp_path / "00000_12_1.png").unlink()
    kept = (tmp_path / "00007_22_0.png").stat().st_mtime_ns
    second = generate_images(pipe, jobs, run(tmp_path, batch_size=3))
    assert (second.already_done, second.generated_here) == (5, 1)
    assert (tmp_path / "00000_12_1.png").is_file()
    assert (tmp_path / "00007_22_0.png").stat().st_mtime_ns == kept
    assert not list(tmp_path.glob(".*.tmp"))

    with pytest.raises(UserError, match="steps=2.*steps=3.*new --output_dir"):
        generate_images(pipe, jobs, run(tmp_path, steps=3))


def test_image_zero_is_the_plain_one_image_call(pipe, tmp_path):
    """Batching does not change an image: file k=0 equals pipe(prompt, generator seeded with the seed)."""
    jobs = plan_jobs(RECORDS[:2], GenerateConfig(guidance=7.0, height=32, width=32), default_size=(32, 32))
    generate_images(pipe, jobs, run(tmp_path, batch_size=2))
    with torch.inference_mode():
        alone = pipe("a church", num_inference_steps=STEPS, guidance_scale=7.0, height=32, width=32, generator=torch.Generator().manual_seed(22)).images[0]
    saved = np.asarray(Image.open(tmp_path / "00007_22_0.png"), dtype=np.int16)
    assert np.abs(saved - np.asarray(alone, dtype=np.int16)).max() <= 1


def test_cli_generate_text_list_in_two_processes_splits_the_work_and_makes_the_one_process_images(tmp_path):
    """Two CPU processes (torchrun's environment): every image once, metadata for all, nothing left over, the images of one process."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(5)))
    out = tmp_path / "out"
    log = forked(main, "generate", "--model", "tiny", "--prompts", str(prompts), "--output_dir", str(out), "--steps", "2", "--images_per_prompt", "2", "--batch_size", "2")
    assert "(process 0 of 2)" in log
    assert len(list(out.glob("*.png"))) == 10
    lines = (out / "metadata.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["file"] for line in lines) == sorted(p.name for p in out.glob("*.png"))
    # The same images as one process drawing batches of 4 (an image depends on its seed alone; float rounding of
    # batched kernels apart, at most one level of 8 bits).
    main(["generate", "--model", "tiny", "--prompts", str(prompts), "--output_dir", str(tmp_path / "one"), "--steps", "2", "--images_per_prompt", "2", "--batch_size", "4"])
    for path in out.glob("*.png"):
        assert np.abs(np.asarray(Image.open(path), dtype=np.int16) - np.asarray(Image.open(tmp_path / "one" / path.name), dtype=np.int16)).max() <= 1


def test_bench_script_tiny_mode_reports_images_per_second(monkeypatch, capsys):
    script = ROOT / "scripts" / "bench_generate.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--tiny", "--steps", "2", "--batch-size", "2", "--repeats", "1"])
    runpy.run_path(str(script), run_name="__main__")
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["device"].startswith(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU") and figures["pipeline"] == "tiny"
    assert (figures["size"], figures["steps"], figures["images_timed"]) == ("32x32", 2, 2)
    assert figures["images_per_s"] > 0


def test_per_prompt_seeding_draws_the_images_of_a_prompt_from_one_generator():
    """The official scripts' loop: one generator per prompt, seeded with its seed, whose successive draws start each image."""
    jobs = plan_jobs(RECORDS[:1], GenerateConfig(images_per_prompt=3, seeding="per_prompt"), default_size=(32, 32))
    assert [j.file for j in jobs] == ["00000_11_0.png", "00000_11_1.png", "00000_11_2.png"]
    generator = torch.Generator().manual_seed(11)
    official = [torch.randn((1, 4, 4, 4), generator=generator)[0] for _ in range(3)]
    for job, noise in zip(jobs, official):
        assert torch.equal(starting_noise(job.request, channels=4, scale_factor=8)[0], noise)


def test_protocol_fills_only_what_the_user_left_empty():
    cfg = GenerateConfig(protocol="salun", height=32, width=32).resolve()
    assert (cfg.scheduler, cfg.steps, cfg.guidance, cfg.dtype, cfg.seeding) == ("LMSDiscreteScheduler", 100, 7.5, "fp32", "per_prompt")
    assert (cfg.height, cfg.width) == (32, 32)
    plain = GenerateConfig().resolve()
    assert (plain.scheduler, plain.steps, plain.guidance, plain.dtype, plain.seeding) == ("", None, None, "auto", "per_image")  # steps: the family's
    with pytest.raises(UserError, match="unknown protocol 'sd'; choose from salun, unlearndiffatk, mace"):
        GenerateConfig(protocol="sd").resolve()
