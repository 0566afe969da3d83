"""One mask step and one masked erase of a tiny class-conditional UNet, for tests/test_fsdp.py.

`python fsdp_run.py OUT [--mask PATH] [--fsdp]`, under `accelerate launch` for two processes (the test forks
them from its own process, conftest.forked, with the environment the launcher gives; main([OUT]) there for one). With
--fsdp the Accelerator is switched to FSDP2 by hand, as `accelerate launch --use_fsdp --fsdp_version 2`
does on GPUs: Accelerate 1.15 enables FSDP only for GPU process groups, but its FSDP2 path (fully_shard)
runs on CPU processes over gloo. Writes OUT/mask.safetensors, OUT/scores.safetensors (the saliency,
gathered), OUT/original.safetensors and OUT/weights.safetensors (the erased model as the export gets it), from
the main process; with --mask also OUT/weights_mask_file.safetensors, the erase of a fresh model under that file.
"""

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from diffusers import UNet2DModel
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from salun_sd.run import runtime
from salun_sd.core.config import MaskConfig, TrainConfig
from salun_sd.ddpm.adapter import ClassConditionedDenoiser
from salun_sd.ddpm.config import ModelConfig
from salun_sd.ddpm.model import build_scheduler, build_unet
from salun_sd.core.denoiser import ConceptData
from salun_sd.core.saliency import accumulate_saliency, load_mask, make_masks
from salun_sd.core.sharding import gather_model
from salun_sd.core.trainer import unlearn

MASK = MaskConfig(fraction=0.3, batch_size=2, guidance=2.0)
TRAIN = TrainConfig(method="salun", learning_rate=1e-3, adam_epsilon=1e-2, batch_size=2, max_steps=3, weight_decay=0.1, max_grad_norm=0.05)


def whole(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor whole on every process (sharded ones gathered), copied to the CPU."""
    return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu", copy=True).contiguous() for n, t in tensors.items()}


def tiny_denoiser() -> ClassConditionedDenoiser:
    cfg = ModelConfig(sample_size=8, channels=1, num_classes=3, block_out_channels=[8, 16], layers_per_block=1,
                      attention_resolutions=[4], norm_num_groups=4, dropout=0.0, num_train_timesteps=100)
    torch.manual_seed(0)
    return ClassConditionedDenoiser(build_unet(cfg), build_scheduler(cfg))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--mask", default="")
    parser.add_argument("--fsdp", action="store_true")
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=True)
    if args.fsdp:
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        for state in (accelerator.state, PartialState()):  # AcceleratorState() copies PartialState's type each time
            state.distributed_type = DistributedType.FSDP
    den = tiny_denoiser()
    original = whole(dict(den.model.named_parameters()))
    g = torch.Generator().manual_seed(1)
    forget = ConceptData(torch.randn(8, 1, 8, 8, generator=g), torch.zeros(8, dtype=torch.long))
    remain = ConceptData(torch.randn(8, 1, 8, 8, generator=g), torch.tensor([1, 2] * 4))

    scores = whole(accumulate_saliency(den, forget, accelerator, MASK.guidance, MASK.batch_size, include=lambda name: True))
    made = make_masks(den, forget, accelerator, MASK, args.out, 0, lambda name: True, {})
    assert all(isinstance(m, DTensor) for m in made.values()) == args.fsdp
    mask = load_mask(args.mask, den.model) if args.mask else made
    if args.fsdp:  # sharded like each weight, as the mask step hands it to the erase
        params = dict(den.model.named_parameters())
        mask = {n: distribute_tensor(m, params[n].device_mesh, params[n].placements, src_data_rank=None) for n, m in mask.items()}
    train = replace(TRAIN, batch_size=TRAIN.batch_size // accelerator.num_processes)  # the same global batch

    def erase(den: ClassConditionedDenoiser, mask: dict[str, torch.Tensor], name: str) -> None:
        model = gather_model(unlearn(den, forget, remain, [[1, 2]], train, accelerator, args.out / name, mask), accelerator.is_main_process)
        if accelerator.is_main_process:
            assert type(model) is UNet2DModel  # what the export saves: the model's own class, whole
            save_file(whole(dict(model.named_parameters())), str(args.out / f"{name}.safetensors"))

    erase(den, mask, "weights")
    if args.mask:  # as with mask.path: an unsharded model and the mask file, both sharded by the erase itself
        fresh = tiny_denoiser()
        erase(fresh, load_mask(args.mask, fresh.model), "weights_mask_file")
    if accelerator.is_main_process:
        save_file(original, str(args.out / "original.safetensors"))
        save_file(scores, str(args.out / "scores.safetensors"))
    runtime.finish(accelerator)


if __name__ == "__main__":
    main()
