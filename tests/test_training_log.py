"""The training log: OUTPUT_DIR/log.jsonl holds every optimizer step once, also across a resume, and
unlearn.report_to hands the same values to Accelerate's tracker."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from conftest import FORGET, REMAIN
from salun_sd.core.config import TrainConfig
from salun_sd.core.denoiser import ConceptData
from salun_sd.errors import UserError
from salun_sd.run.runtime import make_accelerator
from salun_sd.families.sd_unet import sd_denoiser
from salun_sd.families.tiny import tiny_pipeline
from salun_sd.core.trainer import unlearn
from salun_sd.run.log import LOG_NAME


def train(run_dir: Path, accelerator: Accelerator | None = None, **cfg) -> None:
    """A few RL steps (the SalUn loss without a mask) of the tiny pipeline's UNet on random latents."""
    den = sd_denoiser(tiny_pipeline(), [FORGET, REMAIN])
    gen = torch.Generator().manual_seed(0)
    forget, remain = (ConceptData(torch.randn(8, 4, 8, 8, generator=gen), torch.full((8,), den.cond_id(p))) for p in (FORGET, REMAIN))
    if accelerator is None:
        AcceleratorState._reset_state(True)
        accelerator = Accelerator(cpu=True)
    cfg = TrainConfig(**{"method": "rl", "batch_size": 2, "learning_rate": 1e-3, "max_steps": 4, **cfg})
    unlearn(den, forget, remain, [[den.cond_id(REMAIN)]], cfg, accelerator, run_dir)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / LOG_NAME).read_text().splitlines()]


def test_every_step_is_logged_once_also_when_a_resumed_run_redoes_steps(tmp_path):
    train(tmp_path, checkpointing_steps=2)
    first = read_log(tmp_path)
    assert [line["step"] for line in first] == [1, 2, 3, 4]
    assert set(first[0]) == {"step", "loss", "forget", "remain"} and first[0]["loss"] > 0
    train(tmp_path, checkpointing_steps=2, resume_from_checkpoint=str(tmp_path / "checkpoints" / "checkpoint-00000002"))
    assert read_log(tmp_path) == first  # steps 3 and 4 replaced, not appended: the same values bit for bit


def test_report_to_tensorboard_receives_the_logged_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    AcceleratorState._reset_state(True)
    accelerator = make_accelerator("no", "tensorboard", str(tmp_path))
    train(tmp_path, accelerator, max_steps=3, report_to="tensorboard")
    accelerator.end_training()
    events = EventAccumulator(str(tmp_path / "salun-sd")).Reload()
    logged = read_log(tmp_path)
    for term in ("loss", "forget", "remain"):
        scalars = events.Scalars(term)
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([line[term] for line in logged], rel=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="checks the message where wandb is not installed")
def test_report_to_a_tracker_that_is_not_installed_says_what_to_install():
    with pytest.raises(UserError, match=r"^report_to=wandb needs the wandb package, which is not installed here: pip install wandb$"):
        make_accelerator("no", "wandb")
