"""Every speed/memory lever of the trainer gives the plain path's loss and update, and keeps
masked-out weights bitwise frozen (CPU, tiny SD UNet). The GPU speed of each is measured by
scripts/bench_erase.py."""

from __future__ import annotations

import copy
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler

from salun_sd.core.denoiser import ConceptData
from salun_sd.errors import UserError
from salun_sd.families.sd_unet import TextConditionedDenoiser
from salun_sd.families.tiny import tiny_pipeline
from salun_sd.core.config import TrainConfig
from salun_sd.core.trainer import unlearn

STEPS = 3  # 8-bit Adam's stray moments would move frozen weights from the second step on


@pytest.fixture(scope="module")
def setup():
    """The tiny pipeline's UNet, cached text states for 4 prompts, random latents, a random 50 % mask."""
    unet = tiny_pipeline().unet
    gen = torch.Generator().manual_seed(0)
    embeddings = torch.randn(4, 77, unet.config.cross_attention_dim, generator=gen)
    forget = ConceptData(torch.randn(16, 4, 8, 8, generator=gen), torch.full((16,), 1))
    remain = ConceptData(torch.randn(16, 4, 8, 8, generator=gen), torch.full((16,), 2))
    mask = {n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in unet.named_parameters()}
    return unet, embeddings, forget, remain, mask


def run(setup, tmp_path: Path, mixed_precision: str = "no", scaler: torch.amp.GradScaler | None = None, **levers) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Losses per step, the weights before and the weights after STEPS masked SalUn steps."""
    unet, embeddings, forget, remain, mask = setup
    model = copy.deepcopy(unet)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    den = TextConditionedDenoiser(model, DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), ["", "f", "r", "m"], embeddings)
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    if scaler is not None:  # Accelerate makes its own GradScaler only on GPUs
        accelerator.scaler = scaler
    cfg = TrainConfig(batch_size=4, max_steps=STEPS, learning_rate=1e-3, **levers)
    losses = []
    trained = unlearn(den, forget, remain, [[3]], cfg, accelerator, tmp_path, mask=mask, on_step=lambda step, values: losses.append(values["loss"]))
    return losses, before, {n: p.detach().clone() for n, p in trained.named_parameters()}


@pytest.fixture(scope="module")
def plain(setup, tmp_path_factory):
    return run(setup, tmp_path_factory.mktemp("plain"))


def relative_update_error(before, after, reference_after) -> float:
    """‖Δ − Δ_plain‖ / ‖Δ_plain‖ over all weights, Δ the change the steps made."""
    diff = sum(float((after[n] - reference_after[n]).pow(2).sum()) for n in before)
    ref = sum(float((reference_after[n] - before[n]).pow(2).sum()) for n in before)
    return (diff / ref) ** 0.5


def check_lever(setup, plain, tmp_path, loss_rtol: float, update_tol: float, mixed_precision: str = "no", **levers) -> None:
    plain_losses, before, plain_after = plain
    losses, lever_before, after = run(setup, tmp_path, mixed_precision, **levers)
    assert all(torch.equal(before[n], lever_before[n]) for n in before)
    assert losses == pytest.approx(plain_losses, rel=loss_rtol)
    assert relative_update_error(before, after, plain_after) < update_tol
    mask = setup[4]
    for n in before:
        assert torch.equal(after[n][~mask[n]], before[n][~mask[n]]), f"{n}: a masked-out weight moved"
    assert any(not torch.equal(after[n][mask[n]], before[n][mask[n]]) for n in before), "nothing was trained"


def test_plain_path_trains_masked_weights_only(setup, plain):
    losses, before, after = plain
    mask = setup[4]
    assert len(losses) == STEPS and all(loss > 0 for loss in losses)
    moved = sum(int((after[n] != before[n]).sum()) for n in before)
    trainable = sum(int(m.sum()) for m in mask.values())
    assert 0.9 * trainable < moved <= trainable
    assert all(torch.equal(after[n][~mask[n]], before[n][~mask[n]]) for n in before)


@pytest.mark.parametrize(
    "levers",
    [
        {"optimizer": "adam_fused"},
        {"channels_last": True},
        {"attention": "eager"},
        {"gradient_checkpointing": True},
        {"optimizer": "adam_fused", "channels_last": True, "gradient_checkpointing": True},
    ],
    ids=lambda levers: "+".join(f"{k}={v}" for k, v in levers.items()),
)
def test_fp32_lever_matches_plain(setup, plain, tmp_path, levers):
    check_lever(setup, plain, tmp_path, loss_rtol=1e-5, update_tol=1e-3, **levers)


def test_bf16_autocast_matches_within_bf16_tolerance(setup, plain, tmp_path):
    check_lever(setup, plain, tmp_path, loss_rtol=5e-3, update_tol=0.25, mixed_precision="bf16")


def test_a_step_that_fp16_loss_scaling_skips_applies_no_weight_decay_either(setup, tmp_path):
    """torch's GradScaler, as Accelerate uses it for fp16 on a GPU, here with an infinite scale: every scaled
    gradient overflows, so the scaler skips every step, and the masked weight decay must skip it too."""
    losses, before, after = run(setup, tmp_path, scaler=torch.amp.GradScaler("cpu", init_scale=float("inf")), weight_decay=0.1)
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)  # the loss itself is finite
    assert all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="adam8bit needs bitsandbytes (pip install 'salun-sd[bnb]')")
def test_adam8bit_matches_and_keeps_frozen_weights_bitwise(setup, plain, tmp_path):
    check_lever(setup, plain, tmp_path, loss_rtol=1e-4, update_tol=0.05, optimizer="adam8bit")


@pytest.mark.skipif(not os.environ.get("SALUN_SD_TEST_COMPILE"), reason="torch.compile on CPU takes minutes here; set SALUN_SD_TEST_COMPILE=1")
def test_compiled_unet_matches_plain(setup, plain, tmp_path):
    check_lever(setup, plain, tmp_path, loss_rtol=1e-5, update_tol=1e-3, compile=True)


@pytest.mark.parametrize(("levers", "message"), [({"optimizer": "sgd"}, "optimizer must be one of"), ({"attention": "flash"}, "attention must be one of")])
def test_unknown_lever_value_is_a_user_error(setup, tmp_path, levers, message):
    with pytest.raises(UserError, match=message):
        run(setup, tmp_path, **levers)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_xformers_without_cuda_is_a_clear_user_error(setup, tmp_path):
    with pytest.raises(UserError, match="xformers"):
        run(setup, tmp_path, attention="xformers")
