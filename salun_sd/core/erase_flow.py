"""The one erase every model family runs, top to bottom: check → claim the run folder → load → mask → unlearn → export.

A family (Stable Diffusion and its successors, the class-conditional DDPM) supplies an EraseJob: its
settings, how to load its denoiser and data, and how to write the erased model. Everything else —
which files a run replaces (salun_sd.run.folder.claim: moved aside, back if the run fails), where the mask comes from, the seed of the mask's noise — is decided
here once, so the families cannot drift apart.

A closed-form method (UCE) skips data, mask and loop: the job's edit() hands the edited network to the export.

Run folder layout (`out`):
    manifest.json          resolved config, versions, git revision
    mask.safetensors       the saliency mask used (plus mask-<fraction>.safetensors for extra fractions)
    checkpoints/           resumable training state (unlearn.checkpointing_steps)
    log.jsonl              every optimizer step's loss terms (salun_sd.run.log)
    <job.product>/         the erased model (and the job's other exports: job.also_writes)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from accelerate import Accelerator
from torch import nn

from salun_sd.config import to_dict
from salun_sd.core.config import MaskConfig, TrainConfig
from salun_sd.core.denoiser import ConceptData, Denoiser
from salun_sd.errors import UserError
from salun_sd.run.files import write_json
from salun_sd.run.folder import MANIFEST, claim
from salun_sd.run.manifest import manifest
from salun_sd.core.objectives import Method
from salun_sd.core.saliency import Mask, load_mask, make_masks, mask_info, mask_path
from salun_sd.core.sharding import gather_mask, gather_model
from salun_sd.core.trainer import check_train_config, list_checkpoints, unlearn
from salun_sd.run.log import LOG_NAME


@dataclass
class Loaded:
    """What an erase trains on: the denoiser, D_f, D_r (None when the method has no use for it) and the c' ids of each concept."""

    den: Denoiser
    forget: ConceptData
    remain: ConceptData | None
    misaligned: list[list[int]]  # misaligned[k]: the c' ids of concept k (forget.concept indexes it)


class EraseJob(ABC):
    """One family's part of an erase: its settings, its model and data, and the erased model's format."""

    config: Any  # the whole config dataclass, for the manifest
    train: TrainConfig
    mask: MaskConfig
    out: Path  # the run folder
    overwrite: bool
    model_name: str  # the base model, as the user named it
    product: str  # the folder under `out` that the export writes
    also_writes: ClassVar[tuple[str, ...]] = ()  # the export's other files and folders under `out` (glob patterns)
    command: str  # the CLI prefix of the family's commands ("salun-sd", "salun-sd ddpm"), for hints
    closed_form: ClassVar[bool] = False  # the family implements edit(), for closed-form methods (UCE)

    @abstractmethod
    def check(self, method: Method) -> None:
        """The family's own checks that need no model (data sources, class ids, ...)."""

    @abstractmethod
    def load(self, accelerator: Accelerator, method: Method) -> Loaded:
        """The base model as a denoiser, and the data the method uses."""

    def before_training(self, accelerator: Accelerator) -> None:
        """Anything to take from the base model before unlearning changes it in place (nothing by default)."""

    def edit(self, accelerator: Accelerator, method: Method) -> nn.Module:
        """Load the base network and edit it in closed form (a method with closed_form), for a family with closed_form."""
        raise NotImplementedError

    @abstractmethod
    def export(self, model: nn.Module, mask: Mask | None, num_processes: int) -> Path:
        """Write the erased model to out/product (main process only)."""


def check_config(job: EraseJob) -> Method:
    """Every check that needs no model, so a bad config fails before minutes of loading; returns the method."""
    method = check_train_config(job.train)
    if method.closed_form and not job.closed_form:
        raise UserError(f"method {job.train.method} edits a text-to-image network's cross-attention in closed form; `{job.command}` models have none")
    job.mask.check()
    if job.mask.path:
        mask_info(job.mask.path)  # a missing or broken file fails now, not after loading
    job.check(method)
    return method


def uses_mask(method: Method, steps: tuple[str, ...]) -> bool:
    """The mask step always makes one; an erase only uses one for a method that trains under a mask (SalUn)."""
    return "erase" not in steps or method.uses_mask


def resolve_mask(job: EraseJob, loaded: Loaded, method: Method, steps: tuple[str, ...], accelerator: Accelerator) -> Mask | None:
    """The mask to train under: mask.path, else made now (mask step), else the one an earlier mask step left in the run folder.

    Its noise is drawn from unlearn.seed, the run's seed, whichever family runs it.
    """
    if not uses_mask(method, steps):
        return None  # the baselines train without a saliency mask
    den = loaded.den
    if job.mask.path:
        return load_mask(job.mask.path, den.model)
    here = mask_path(job.out)
    if "mask" in steps and not here.exists():
        info = {"model": job.model_name, "trainable": job.train.trainable}
        return make_masks(den, loaded.forget, accelerator, job.mask, job.out, job.train.seed, den.scope(job.train.trainable), info)
    if not here.exists():
        raise UserError(f"method {job.train.method} trains under a saliency mask and {here} does not exist: run `{job.command} mask` first, or set mask.path")
    return load_mask(here, den.model)


def erase(job: EraseJob, accelerator: Accelerator, steps: tuple[str, ...] = ("mask", "erase")) -> Path:
    """Run the requested steps ("mask", "erase" or both) of one erase; returns the run folder."""
    method = check_config(job)
    training = "erase" in steps
    resuming = training and bool(job.train.resume_from_checkpoint)
    making_mask = "mask" in steps and uses_mask(method, steps) and not resuming
    products = [mask_path(job.out)] if making_mask else []
    products += [job.out / job.product] if training else []
    command = "+".join(steps)
    writes = [MANIFEST, *(["mask*.safetensors"] if making_mask else []),
              *([job.product, *job.also_writes, *([] if resuming else ["checkpoints", LOG_NAME])] if training else [])]

    def blocking() -> list[Path]:  # a resumed run (or a step that does not train) keeps the checkpoints
        return products + (list_checkpoints(job.out / "checkpoints")[:1] if training and not resuming else [])

    with claim(job.out, writes, blocking, job.overwrite, resuming, accelerator, command, "unlearn"):
        if accelerator.is_main_process:
            info = manifest(to_dict(job.config), command, base_model=job.model_name, num_processes=accelerator.num_processes)
            write_json(job.out / MANIFEST, info)

        if training and method.closed_form:  # no data, mask or loop; every process edits (cheap, deterministic), the main one exports
            model, mask = job.edit(accelerator, method), None
        else:
            loaded = job.load(accelerator, method)
            remain = len(loaded.remain) if loaded.remain is not None else "not used"
            accelerator.print(f"forget set: {len(loaded.forget)} examples, remain set: {remain}, method: {job.train.method}")
            mask = resolve_mask(job, loaded, method, steps, accelerator)
            if not training:
                return job.out

            job.before_training(accelerator)
            model = unlearn(loaded.den, loaded.forget, loaded.remain, loaded.misaligned, job.train, accelerator, job.out, mask)
            model = gather_model(model, accelerator.is_main_process)  # under FSDP: whole, on the main process
            mask = gather_mask(mask, accelerator.is_main_process) if mask is not None else None
        if accelerator.is_main_process:
            written = job.export(model.eval(), mask, accelerator.num_processes)
            accelerator.print(f"erased model written to {written}")
        accelerator.wait_for_everyone()
    return job.out
