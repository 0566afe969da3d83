"""The training log: OUTPUT_DIR/log.jsonl holds every optimizer step once, also across a resume, and
unlearn.report_to hands the same values to Accelerate's tracker."""

from __future__ import annotations

import importlib.util
import json
import re
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
from safetensors.torch import load_file

from salun_sd.core.trainer import TrainingDiverged, list_checkpoints, unlearn
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


def test_a_diverged_run_keeps_the_checkpoints_whose_weights_gave_a_finite_loss_and_names_the_last(tmp_path):
    uninterrupted, run = tmp_path / "uninterrupted", tmp_path / "run"
    train(uninterrupted, checkpointing_steps=1)
    train(run, checkpointing_steps=1, max_steps=2)
    # Resumed at 1e8 (the config's rate, not the checkpoint's 1e-3): step 3 overflows the weights, step 4's loss is NaN.
    with pytest.raises(TrainingDiverged) as err:
        train(run, checkpointing_steps=1, learning_rate=1e8, resume_from_checkpoint="latest")
    text = str(err.value)
    assert "\n" not in text and re.match(r"the loss became nan at step 4; the last checkpoint whose weights gave a finite loss is \S+checkpoint-00000002 "
                                       r"\(step 2, whose weights gave loss [\d.]+\), and later ones are removed: lower unlearn\.learning_rate", text), text
    kept = list_checkpoints(run / "checkpoints")
    assert [c.name for c in kept] == ["checkpoint-00000002"]  # checkpoint-3 held the weights that gave the NaN
    assert all(torch.isfinite(w).all() for w in load_file(str(kept[0] / "model.safetensors")).values())
    train(run, checkpointing_steps=1, resume_from_checkpoint="latest")  # the advised resume, at the sane rate
    done = [load_file(str(root / "checkpoints" / "checkpoint-00000004" / "model.safetensors")) for root in (uninterrupted, run)]
    assert all(torch.equal(done[0][k], done[1][k]) for k in done[0])  # as if it had never diverged


def test_a_run_diverging_at_lr_1e8_keeps_no_checkpoint_and_says_to_start_again(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"^the loss became nan at step 2; no checkpoint holds weights from before it: lower unlearn\.learning_rate .* and start again$"):
        train(tmp_path, checkpointing_steps=1, learning_rate=1e8)
    assert list_checkpoints(tmp_path / "checkpoints") == []  # checkpoint-1 held the weights that gave the NaN


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
