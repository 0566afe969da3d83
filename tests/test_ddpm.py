"""The DDPM companion on scikit-learn's digits with a small model: every command runs, and does what it says.

One module fixture trains a base model long enough to draw recognisable digits (and the judging
classifier); the forgetting test erases class 0 from it and checks the samples, not just the loss. The
tests train the config's UNet at half its width (SMALL: a quarter of the compute per step), which draws
digits as well for these checks.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import UNet2DModel
from safetensors.torch import load_file

from conftest import forked
from salun_sd.cli import main as cli
from salun_sd.config import load_yaml
from salun_sd.ddpm.adapter import ClassConditionedDenoiser
from salun_sd.ddpm.config import DataConfig, DDPMConfig, SampleConfig
from salun_sd.ddpm.data import load_split, split_by_class
from salun_sd.ddpm.forget import forget_data
from salun_sd.ddpm.model import build_scheduler, build_unet, load_denoiser
from salun_sd.ddpm.sample import inference_scheduler, load_samples, sample
from salun_sd.core.denoiser import ConceptData
from salun_sd.core.draws import draw_batch, draw_example_noise
from salun_sd.core.objectives import Batch, salun_loss
from salun_sd.core.saliency import accumulate_saliency, load_mask, saliency_masks
from salun_sd.core.trainer import unlearn

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DIGITS = str(CONFIGS / "ddpm_digits.yaml")
QUICK = ["--unlearn.checkpointing_steps", "0", "--train.checkpointing_steps", "0"]
SMALL = ["--model.block_out_channels", "16", "32"]
BASE_STEPS = 600


def run(work_dir: Path, *argv: str) -> None:
    command, *rest = argv
    cli(["ddpm", command, DIGITS, "--work_dir", str(work_dir), *rest])


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """A base digits model (SMALL, BASE_STEPS steps at twice the config's learning rate, ~80 s of CPU) and its
    classifier, for this module's tests. Measured: the base drew 85 % zeros, 120 erase steps left UA 1.0, 94 % remaining accuracy."""
    work = tmp_path_factory.mktemp("ddpm-digits")
    run(work, "train", "--train.max_steps", str(BASE_STEPS), "--train.batch_size", "64", "--train.learning_rate", "2e-3", *SMALL, *QUICK)
    run(work, "classifier", "--classifier.epochs", "15")
    return work


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_configs_build_the_official_and_the_small_model():
    cifar = load_yaml(DDPMConfig, CONFIGS / "ddpm_cifar10.yaml")
    unet = build_unet(cifar.model)
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(35.7e6, rel=0.01)  # the official model's size
    assert unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")  # attention at 16x16
    assert unet.config.num_class_embeds == 11 and unet.config.dropout == 0.1
    unlearn = cifar.unlearn
    assert (unlearn.learning_rate, unlearn.max_steps, unlearn.batch_size, unlearn.max_grad_norm, unlearn.clip_before_mask, unlearn.cond_drop_prob) == (1e-4, 1000, 128, 1.0, True, 0.1)
    # The official α 1e-3 and clip norms 1.0 act on losses summed over 3·32·32 values; ours are means over them.
    assert unlearn.alpha == pytest.approx(1e-3 * 3072) and cifar.mask.max_grad_norm == pytest.approx(1 / 3072) and cifar.train.max_grad_norm == pytest.approx(1 / 3072)
    assert (cifar.mask.guidance, cifar.mask.fraction, cifar.train.cond_drop_prob, cifar.misaligned, cifar.weights) == (2.0, 0.5, 0.1, "next", "raw")
    assert (cifar.sample.scheduler, cifar.sample.num_inference_steps, cifar.sample.eta) == ("ddim", 1000, 1.0)  # generalized_steps, eta 1
    defaults = DDPMConfig()
    assert (defaults.unlearn.alpha, defaults.mask.max_grad_norm, defaults.sample.num_inference_steps) == pytest.approx((unlearn.alpha, cifar.mask.max_grad_norm, 1000))
    digits = load_yaml(DDPMConfig, DIGITS)
    assert sum(p.numel() for p in build_unet(digits.model).parameters()) < 1e6
    assert digits.unlearn.alpha == pytest.approx(1e-3 * 64) and digits.mask.max_grad_norm == pytest.approx(1 / 64)


def test_digits_data_are_real_split_and_scaled():
    cfg = DataConfig(dataset="digits")
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert len(train) + len(test) == 1797 and train.x0.shape[1:] == (1, 8, 8)
    assert train.x0.min() == -1 and train.x0.max() == 1
    assert not any(torch.equal(a, b) for a in test.x0[:20] for b in train.x0)  # held-out images are not training images
    assert load_split(DataConfig(dataset="digits", image_size=16), "test").x0.shape[1:] == (1, 16, 16)
    forget, remain = split_by_class(train, 3)
    assert (forget.cond == 3).all() and (remain.cond != 3).all() and len(forget) + len(remain) == len(train)
    assert (load_split(cfg, "train", exclude_class=3).cond != 3).all()


def test_train_writes_a_loadable_model_and_a_manifest(digits):
    unet = UNet2DModel.from_pretrained(digits / "base" / "unet")
    assert unet.config.num_class_embeds == 11
    raw, ema = (dict(load_denoiser(digits / "base", w).model.named_parameters()) for w in ("raw", "ema"))  # both are kept
    assert torch.equal(raw["conv_in.weight"], unet.conv_in.weight) and not torch.equal(raw["conv_in.weight"], ema["conv_in.weight"])
    info = json.loads((digits / "base" / "manifest.json").read_text())
    assert info["config"]["train"]["max_steps"] == BASE_STEPS and info["train_seconds"] > 0
    log = [json.loads(line) for line in (digits / "base" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, BASE_STEPS + 1)) and all(entry["loss"] > 0 for entry in log)
    classifier = json.loads((digits / "classifier" / "classifier.json").read_text())
    assert classifier["test_accuracy"] > 0.9  # on real held-out digits


def test_resume_continues_exactly(tmp_path):
    flags = ["--train.batch_size", "8", "--train.checkpointing_steps", "2"]
    run(tmp_path / "a", "train", "--train.max_steps", "4", *flags)
    run(tmp_path / "b", "train", "--train.max_steps", "2", *flags)
    run(tmp_path / "b", "train", "--train.max_steps", "4", "--train.resume_from_checkpoint", "latest", "--overwrite", *flags)
    a, b = unet_weights(tmp_path / "a" / "base"), unet_weights(tmp_path / "b" / "base")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):  # an existing model is not replaced silently
        run(tmp_path / "a", "train", "--train.max_steps", "4", *flags)


def test_retrain_is_one_command_and_leaves_the_class_out(tmp_path):
    run(tmp_path, "retrain", "--forget_class", "7", "--train.max_steps", "2", "--train.batch_size", "8", *QUICK)
    info = json.loads((tmp_path / "retrain-class7" / "manifest.json").read_text())
    assert info["exclude_class"] == 7
    assert info["train_examples"] == len(load_split(DataConfig(dataset="digits"), "train", exclude_class=7))


def test_sampling_is_seeded_per_image(digits):
    run(digits, "sample", "--sample.per_class", "2", "--sample.num_inference_steps", "10", "--output_dir", str(digits / "s1"))
    images, labels = load_samples(digits / "s1")
    assert images.shape == (20, 1, 8, 8) and images.dtype == torch.uint8 and labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert (digits / "s1" / "grid.png").is_file()
    den = load_denoiser(digits / "base")
    cfg = SampleConfig(num_inference_steps=10, eta=0.0, batch_size=3)
    some = sample(den, torch.tensor([4, 4, 9]), cfg)  # image i of class c is the same whatever else is drawn with it
    alone = sample(den, torch.tensor([9, 4, 4, 4]), SampleConfig(num_inference_steps=10, eta=0.0, batch_size=1))
    torch.testing.assert_close(some, alone[[1, 2, 0]])
    assert torch.equal(some, sample(den, torch.tensor([4, 4, 9]), cfg))


def test_erase_forgets_the_class_and_keeps_masked_out_weights(digits):
    run(digits, "mask")
    mask = load_mask(digits / "salun-class0" / "mask.safetensors", load_denoiser(digits / "base").model)
    kept = sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    assert kept == pytest.approx(0.5, abs=0.01)
    # A short run at 3x the learning rate needs a heavier remain term than the official α (0.064 here): with it,
    # 120 steps left UA 0.75 and 81 % remaining accuracy, 240 steps UA 1.0 but 42 % (measured on a
    # full-width base trained 500 steps; on this one 120 steps left UA 1.0 and 94 %).
    run(digits, "erase", "--unlearn.max_steps", "120", "--unlearn.batch_size", "32", "--unlearn.learning_rate", "3e-4", "--unlearn.alpha", "0.5", *QUICK)
    before, after = unet_weights(digits / "base"), unet_weights(digits / "salun-class0")
    assert all(torch.equal(before[k][~mask[k]], after[k][~mask[k]]) for k in mask)  # frozen weights: bitwise equal
    assert any(not torch.equal(before[k], after[k]) for k in mask)

    run(digits, "evaluate", "--evaluate.samples_per_class", "20", "--sample.num_inference_steps", "20", "--model_dir", str(digits / "base"), str(digits / "salun-class0"))
    base = json.loads((digits / "base" / "eval.json").read_text())
    erased = json.loads((digits / "salun-class0" / "eval.json").read_text())
    print(base, erased)
    assert base["per_class_accuracy"]["0"] >= 0.7 and base["ua"] <= 0.3  # the base model draws zeros ...
    assert erased["ua"] >= 0.8  # ... the erased one does not
    assert erased["remaining_accuracy"] >= 0.6 and erased["fid"] > 0


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # A large Adam epsilon keeps updates proportional to gradients, so float summation order cannot flip a step;
    # a large learning rate makes the updates big enough that different data or noise would show.
    flags = [DIGITS, "--train.adam_epsilon", "1e-2", "--train.learning_rate", "0.05", "--train.warmup_steps", "0", *SMALL, *QUICK]
    run(tmp_path / "one", "train", *flags[1:], "--train.max_steps", "3", "--train.batch_size", "8")  # one process: this one
    forked(cli, "ddpm", "train", *flags, "--train.max_steps", "3", "--work_dir", str(tmp_path / "two"), "--train.batch_size", "4")  # two processes
    run(tmp_path / "init", "train", *flags[1:], "--train.max_steps", "0")
    one, two, init = (unet_weights(tmp_path / d / "base") for d in ("one", "two", "init"))
    assert max((one[k] - init[k]).abs().max().item() for k in one) > 1e-3
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-5)

    # The mask pass clips each batch's gradient (digits config): the batches, split over processes, stay the same.
    run(tmp_path / "one", "mask", "--mask.batch_size", "16", "--output_dir", str(tmp_path / "mask1"))
    forked(cli, "ddpm", "mask", DIGITS, "--work_dir", str(tmp_path / "one"), "--mask.batch_size", "16", "--output_dir", str(tmp_path / "mask2"))
    a, b = (load_file(str(tmp_path / m / "mask.safetensors")) for m in ("mask1", "mask2"))
    assert sum(int((a[k] != b[k]).sum()) for k in a) <= 1e-4 * sum(v.numel() for v in a.values())  # float summation order only


# The official SalUn DDPM code, re-derived from its formulas (DDPM/functions/losses.py, runners/diffusion.py):
# losses SUM squared errors over C·H·W and average over the batch, except the forget term, an MSELoss mean.


def random_digits_model() -> tuple[DDPMConfig, ClassConditionedDenoiser]:
    cfg = load_yaml(DDPMConfig, DIGITS)
    torch.manual_seed(0)
    return cfg, ClassConditionedDenoiser(build_unet(cfg.model), build_scheduler(cfg.model))


def official_noised(den: ClassConditionedDenoiser, b: Batch) -> torch.Tensor:
    a = den.noise_scheduler.alphas_cumprod.index_select(0, b.t).view(-1, 1, 1, 1)
    return b.x0 * a.sqrt() + b.noise * (1.0 - a).sqrt()


def official_unlearning_loss(unet: UNet2DModel, den: ClassConditionedDenoiser, forget: Batch, remain: Batch, alpha: float = 1e-3) -> torch.Tensor:
    """forget_loss + α·remain_loss of saliency_unlearn (method rl), on classes already dropped to the null class."""
    x = official_noised(den, forget)
    output = unet(x, forget.t, class_labels=forget.cond).sample
    pseudo = unet(x, forget.t, class_labels=forget.misaligned).sample.detach()
    forget_loss = torch.nn.MSELoss()(pseudo, output)
    remain_loss = (remain.noise - unet(official_noised(den, remain), remain.t, class_labels=remain.cond).sample).square().sum(dim=(1, 2, 3)).mean(dim=0)
    return forget_loss + alpha * remain_loss


def draw_pair(cfg: DDPMConfig, den: ClassConditionedDenoiser, forget: ConceptData, remain: ConceptData, misaligned: list[list[int]], step: int, size: int, drop: float, rank: int = 0, per_rank: int = 0):
    per_rank = per_rank or size
    f = draw_batch(forget, den, cfg.unlearn.seed, "forget", step, size, rank, per_rank, [torch.tensor(ids) for ids in misaligned], drop)
    r = draw_batch(remain, den, cfg.unlearn.seed, "remain", step, size, rank, per_rank, cond_drop_prob=drop)
    return f, r


def test_salun_loss_is_the_official_loss_on_a_fixed_batch():
    cfg, den = random_digits_model()
    forget, remain, misaligned = forget_data(cfg)
    assert misaligned == [[1]] and forget_data(replace(cfg, forget_class=9))[2] == [[0]]  # c' = (k + 1) mod 10
    assert len(forget_data(replace(cfg, misaligned="random"))[2][0]) == 9
    f, r = draw_pair(cfg, den, forget, remain, misaligned, 0, 16, drop=0.3)
    null = den.null_cond
    assert (f.cond == null).any() and (f.misaligned == null).any() and (r.cond == null).any()  # class dropout on every term ...
    assert not torch.equal(f.cond == null, f.misaligned == null)  # ... drawn separately for c and c'
    assert set(f.misaligned.tolist()) == {1, null}
    halves = [draw_pair(cfg, den, forget, remain, misaligned, 0, 16, 0.3, rank, 8) for rank in (0, 1)]  # two processes
    assert torch.equal(torch.cat([h[0].cond for h in halves]), f.cond) and torch.equal(torch.cat([h[0].misaligned for h in halves]), f.misaligned)
    assert torch.equal(torch.cat([h[1].cond for h in halves]), r.cond)
    ours, _ = salun_loss(den, den.model, f, r, cfg.unlearn, None)
    torch.testing.assert_close(ours, official_unlearning_loss(den.model, den, f, r), rtol=1e-5, atol=0)
    assert cfg.unlearn.alpha == 1e-3 * 64  # the official α, on our per-pixel mean


def test_saliency_clips_each_batch_like_the_official_mask_pass():
    cfg, den = random_digits_model()
    forget = ConceptData(*(t[:10] for t in (forget_data(cfg)[0].x0, forget_data(cfg)[0].cond)))
    scores = accumulate_saliency(den, forget, Accelerator(cpu=True), cfg.mask.guidance, 4, max_grad_norm=cfg.mask.max_grad_norm)
    unet, w = den.model.requires_grad_(True), cfg.mask.guidance
    total, norms = {n: torch.zeros_like(p) for n, p in unet.named_parameters()}, []
    for start in range(0, 10, 4):  # generate_mask: batches of the forget set, each gradient clipped to 1.0, then summed
        b = draw_example_noise(forget, den, 0, list(range(start, min(start + 4, 10))))
        x = official_noised(den, b)
        output = (1 + w) * unet(x, b.t, class_labels=b.cond).sample - w * unet(x, b.t, class_labels=torch.full_like(b.cond, den.null_cond)).sample
        unet.zero_grad()
        (b.noise - output).square().sum(dim=(1, 2, 3)).mean(dim=0).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)))
        for n, p in unet.named_parameters():
            total[n] += p.grad
    assert min(norms) > 1  # the clip acted on every batch
    for n in total:
        torch.testing.assert_close(scores[n] / cfg.mask.max_grad_norm, total[n].abs(), rtol=1e-4, atol=1e-6)
    ours, official = saliency_masks(scores, [0.5])[0.5], saliency_masks({n: g.abs() for n, g in total.items()}, [0.5])[0.5]
    agree = sum(int((ours[n] == official[n]).sum()) for n in ours) / sum(m.numel() for m in ours.values())
    assert agree > 0.999  # only float ties at the threshold may differ


def test_unlearning_clips_the_whole_gradient_before_the_mask_as_the_official_loop(tmp_path):
    cfg, den = random_digits_model()
    forget, remain, misaligned = forget_data(cfg)
    steps = replace(cfg.unlearn, batch_size=8, max_steps=3, checkpointing_steps=0, max_grad_norm=0.05)  # a norm small enough to act
    gen = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in den.model.named_parameters()}
    mask["conv_in.bias"][:] = False  # a wholly frozen tensor still counts in the official norm
    original = copy.deepcopy(den.model)

    official = copy.deepcopy(original).train().requires_grad_(True)
    optimizer = torch.optim.Adam(official.parameters(), lr=steps.learning_rate)
    for step in range(steps.max_steps):
        f, r = draw_pair(cfg, den, forget, remain, misaligned, step, steps.batch_size, steps.cond_drop_prob)
        optimizer.zero_grad()
        official_unlearning_loss(official, den, f, r).backward()
        torch.nn.utils.clip_grad_norm_(official.parameters(), steps.max_grad_norm)
        for n, p in official.named_parameters():
            p.grad *= mask[n]
        optimizer.step()

    def ours(clip_before_mask: bool) -> dict[str, torch.Tensor]:
        d = ClassConditionedDenoiser(copy.deepcopy(original), den.noise_scheduler)
        return dict(unlearn(d, forget, remain, misaligned, replace(steps, clip_before_mask=clip_before_mask), Accelerator(cpu=True), tmp_path, mask).named_parameters())

    def gap(weights: dict[str, torch.Tensor]) -> float:
        return max((weights[n] - p).abs().max().item() for n, p in official.named_parameters())

    before, after = ours(True), ours(False)
    assert gap(before) < 1e-6 and gap(after) > 1e-5  # masking first (the SD default) makes another update
    assert all(torch.equal(before[n][~mask[n]], p[~mask[n]]) for n, p in original.named_parameters())


def test_official_sampler_is_ddim_with_eta_1_over_every_step():
    _, den = random_digits_model()
    scheduler = inference_scheduler(den, SampleConfig())
    assert scheduler.timesteps.tolist() == list(range(999, -1, -1))
    alpha = den.noise_scheduler.alphas_cumprod
    for t in (999, 500, 0):  # generalized_steps with eta 1
        x, e = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
        ours = scheduler.step(e, t, x, eta=1.0, generator=torch.Generator().manual_seed(t)).prev_sample
        at, at_next = alpha[t], alpha[t - 1] if t > 0 else torch.tensor(1.0)
        x0 = (x - e * (1 - at).sqrt()) / at.sqrt()
        c1 = ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
        c2 = ((1 - at_next) - c1**2).sqrt()
        torch.testing.assert_close(ours, at_next.sqrt() * x0 + c1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(t)) + c2 * e)
