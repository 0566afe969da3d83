"""The text-to-image families' part of an erase (salun_sd.core.erase_flow runs it): data groups → denoiser, and the pipeline export.

Every family of families/loading.FAMILIES (SD-1.x/2.x, SDXL, SD3 / SD3.5, FLUX.1) runs through here. The erased model is
OUTPUT_DIR/pipeline, loaded by the family's pipeline class or AutoPipelineForText2Image.from_pretrained;
with single_file.export also OUTPUT_DIR/model.safetensors, in the layout of the single file it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator
from torch import nn

from salun_sd.core import erase_flow
from salun_sd.config import check_settings, to_dict
from salun_sd.core.erase_flow import EraseJob, Loaded
from salun_sd.errors import UserError
from salun_sd.run.manifest import manifest
from salun_sd.core.objectives import Method, get_method
from salun_sd.core.saliency import Mask, mask_summary
from salun_sd.families.config import ConceptConfig, EraseConfig, ImageGroup
from salun_sd.families.data import check_sources, concept_data, forget_set, generate_share
from salun_sd.families.export import earlier_erasures, export, export_single_file, kept_erased_groups, model_card
from salun_sd.families.loading import Family, check_model, configured_size_multiple, family_of, is_single_file, load_pipeline, model_identity
from salun_sd.families.uce import NO_CROSS_ATTENTION, Concept, uce_edit
from salun_sd.families.validation import GRID_NAME, draw_validation, write_validation_grid


class SDErase(EraseJob):
    product = "pipeline"
    also_writes = ("model.safetensors", GRID_NAME)
    command = "salun-sd"
    closed_form = True  # UCE on SD-1/2 and SDXL (SD3 and FLUX are refused: refuse_closed_form)

    def __init__(self, cfg: EraseConfig) -> None:
        self.config, self.train, self.mask = cfg, cfg.unlearn, cfg.mask
        self.out, self.overwrite, self.model_name = Path(cfg.output_dir), cfg.overwrite, cfg.model
        self.pipe = None  # the base pipeline, once loaded: the export reuses its other components
        self.identity: dict[str, object] = {}  # what the base model is (loading.model_identity), once loaded: keys the cached images and latents
        self.resolution = 0  # of the training images and the validation grid, once the pipeline is loaded
        self.base_images = []  # the validation prompts drawn by the base model
        self.concepts: list[ConceptConfig] = []  # the concepts to erase (check)
        self.earlier: list[dict] = []  # the erase steps already made on the base model, when it is a salun-sd export (check)
        self.kept_erased: list[ImageGroup] = []  # their forget prompts, as remain groups drawn by the base model (check)
        self.examples: list[int] = []  # D_f examples per concept (load)


    def check(self, method: Method) -> None:
        data, name = self.config.data, self.train.method
        check_settings(self.config)  # every choice and range of a config built in code (the CLI's were checked at the flags)
        family = check_model(self.config.model)
        multiple = configured_size_multiple(self.config.model, family) if family is not None and data.resolution else None
        if multiple:  # else load_base checks it, once the model shows its VAE
            family.check_size(data.resolution, multiple, "data.resolution")
        if self.config.single_file.export and not is_single_file(self.config.model):
            raise UserError(f"single_file.export writes the layout of a single-file base model; --model {self.config.model} is not a .safetensors/.ckpt file")
        self.concepts = data.concept_list(self.config.concept, method.uses_misaligned)
        self.earlier = earlier_erasures(self.config.model)
        erasing = {g.prompt for c in self.concepts for g in c.forget}  # a prompt erased again now is no remain prompt
        self.kept_erased = [g for g in kept_erased_groups(self.earlier) if g.prompt not in erasing] if data.keep_erased and method.uses_remain else []
        if method.closed_form:
            self.check_uce(family)
        else:
            check_sources([g for c in self.concepts for g in c.forget] + data.remain, data.max_image_pixels)
        if method.uses_remain and not data.remain:
            raise UserError(f"method {name} trains on a remain set: give data.remain at least one group")
        for c in self.concepts:
            if method.uses_misaligned and not c.misaligned_prompts:
                raise UserError(f"method {name} needs misaligned prompts c' for concept {c.name!r}: give data.misaligned_prompts or data.remain groups")
            if (method.uses_concept_tokens or method.closed_form) and not c.concept_words:
                raise UserError(f"method {name} needs to know which words name concept {c.name!r}: give data.concept_words (e.g. [nude])")

    def check_uce(self, family: Family | None) -> None:
        """UCE reads prompts only (no images): the concept words, the target, the preserved texts; and a family with cross-attention."""
        uce = self.config.uce
        if family is not None:
            refuse_closed_form(family)
        lacking = next((c.name for c in self.concepts if not c.misaligned_prompts), None)
        if uce.target == "misaligned" and lacking is not None:
            raise UserError(f"uce.target=misaligned sends each concept to its c': give data.misaligned_prompts or data.remain groups (concept {lacking!r} has none)")
        erased = {w for c in self.concepts for w in c.concept_words}
        clash = next((p for p in self.uce_preserve() if p in erased), None)
        if clash is not None:
            raise UserError(f"uce.preserve names {clash!r}, a concept word it erases")

    def uce_concepts(self) -> list[Concept]:
        """Each concept's words, sent to the empty prompt or to its own c' prompts (uce.target)."""
        return [Concept(c.concept_words, [""] if self.config.uce.target == "empty" else c.misaligned_prompts) for c in self.concepts]

    def uce_preserve(self) -> list[str]:
        """uce.preserve (default: the remain prompts) and, when --model is an export (data.keep_erased), the words and forget
        prompts of the concepts it erased: kept at their erased keys/values, else the new edit can bring them back."""
        erasing = {w for c in self.concepts for w in c.concept_words}
        earlier = [t for step in self.earlier for c in step["concepts"] for t in (*c.get("words", []), *(g["prompt"] for g in c["forget"]))]
        kept = [t for t in earlier if t not in erasing] if self.config.data.keep_erased else []
        return list(dict.fromkeys([*(self.config.uce.preserve or [g.prompt for g in self.config.data.remain]), *kept]))

    def load_base(self) -> Family:
        """The base pipeline (kept for the export) and the training resolution; returns its family."""
        pipe = self.pipe = load_pipeline(self.config.model, single_file=self.config.single_file)
        self.identity = model_identity(pipe, self.config.model, self.config.single_file)
        family = family_of(pipe)
        self.resolution = self.config.data.resolution or family.default_size(pipe)
        family.check_size(self.resolution, family.size_multiple(pipe), "data.resolution")
        return family

    def edit(self, accelerator: Accelerator, method: Method) -> nn.Module:
        """UCE: the base UNet with its cross-attention key/value projections edited in closed form."""
        family = self.load_base()
        refuse_closed_form(family)  # a single file or Hub ID shows its family only now
        self.pipe.to(accelerator.device)
        self.before_training(accelerator)
        return uce_edit(self.pipe, family.text_states, self.uce_concepts(), self.uce_preserve(), self.config.uce)

    def load(self, accelerator: Accelerator, method: Method) -> Loaded:
        """Load the base pipeline and build D_f (every concept's forget data), D_r and the denoiser over every prompt they use.

        Every process draws its share of the images to generate; the main process then encodes and caches the latents.
        """
        data, concepts = self.config.data, self.concepts
        misaligned = [c.misaligned_prompts for c in concepts] if method.uses_misaligned else []
        concept_words = list(dict.fromkeys(w for c in concepts for w in c.concept_words)) if method.uses_concept_tokens else []  # FMN: every concept's tokens
        family = self.load_base()
        pipe, network, resolution = self.pipe, family.network_of(self.pipe), self.resolution
        forget_groups = [g for c in concepts for g in c.forget]
        remain_groups = data.remain + self.kept_erased if method.uses_remain else []
        prompts = [g.prompt for g in forget_groups + remain_groups] + [p for ps in misaligned for p in ps]
        pipe.to(accelerator.device)
        den = family.denoiser(pipe, prompts, concept_words, resolution)
        cond_of = {p: den.cond_id(p) for p in prompts}
        generate_share(pipe, self.identity, forget_groups + remain_groups, data, resolution, accelerator.process_index, accelerator.num_processes)
        accelerator.wait_for_everyone()
        with accelerator.main_process_first():  # the main process encodes and caches the latents; the others read them
            forget = forget_set(pipe, self.identity, concepts, cond_of, data, resolution)
            remain = concept_data(pipe, self.identity, remain_groups, cond_of, data, resolution, "remain") if method.uses_remain else None
        self.examples = [int((forget.concept == k).sum()) for k in range(len(concepts))]
        if method.uses_concept_tokens:
            missing = [(c.name, g.prompt) for c in concepts for g in c.forget if not den.concept_tokens[cond_of[g.prompt]].any()]
            if missing:
                raise UserError(f"forget prompt {missing[0][1]!r} of concept {missing[0][0]!r} contains none of the concept words {concept_words}: set its concept_words")
        for component in pipe.components.values():  # conditions and latents are cached: the step needs only the network
            if isinstance(component, nn.Module) and component is not network:
                component.to("cpu")
        return Loaded(den, forget, remain, [[cond_of[p] for p in ps] for ps in misaligned])

    def before_training(self, accelerator: Accelerator) -> None:
        if self.config.validation_grid and accelerator.is_main_process:
            self.base_images = draw_validation(self.pipe, self.config.data, self.resolution)

    def export(self, model: nn.Module, mask: Mask | None, num_processes: int) -> Path:
        if self.base_images:  # the erased row while the network is still on the device
            setattr(self.pipe, family_of(self.pipe).network, model)
            write_validation_grid(self.base_images, draw_validation(self.pipe, self.config.data, self.resolution), self.out)
        cfg, method = self.config, get_method(self.train.method)
        settings = {
            "method": self.train.method,
            "remain prompts": [g.prompt for g in cfg.data.remain],
            **({"earlier concepts kept in the remain set": sorted({g.prompt for g in self.kept_erased})} if self.kept_erased else {}),
            **({"uce targets": [c.targets for c in self.uce_concepts()], "uce preserved": self.uce_preserve(), **{f"uce.{k}": v for k, v in to_dict(cfg.uce).items()}}
               if method.closed_form else {f"unlearn.{k}": v for k, v in to_dict(self.train).items() if k not in ("resume_from_checkpoint",)}),
            **({f"mask.{k}": v for k, v in to_dict(self.mask).items()} if mask is not None else {}),
            "num_processes": num_processes,
        }
        kept = mask_summary(mask)["total"] if mask is not None else None
        concepts = [
            {"name": c.name, "forget": [{"prompt": g.prompt, "images": g.generate} for g in c.forget],  # 0: a folder's or dataset's (or UCE's: none)
             **({"misaligned": c.misaligned_prompts} if method.uses_misaligned else {}),
             **({"words": c.concept_words} if method.uses_concept_tokens or method.closed_form else {}), "weight": c.weight, "examples": n}
            for c, n in zip(self.concepts, self.examples or [0] * len(self.concepts))  # no examples: UCE reads no images
        ]
        step = {"base_model": cfg.model, "concepts": concepts, "method": self.train.method, "mask_kept": kept, "settings": {"concepts": concepts, **settings}}
        steps = [*self.earlier, step]
        family = family_of(self.pipe)
        network = family.network
        loader = type(model).__name__ if cfg.export_network_only else type(self.pipe).__name__
        optional = type(self.pipe)._optional_components
        absent = [] if cfg.export_network_only else [k for k, v in self.pipe.components.items() if v is None and k not in optional]
        card = model_card(steps, loader, network, absent, family.hub_tag)
        info = manifest(to_dict(cfg), "erase", mask_kept_fraction=kept, num_processes=num_processes, erased=steps)
        written = export(self.pipe.to("cpu"), network, model, self.out / self.product, card, info, cfg.export_network_only)
        if cfg.single_file.export:
            summary = {"base_model": steps[0]["base_model"], "concept": ", ".join(c.name for c in self.concepts), "method": self.train.method, "mask_kept": str(kept), "erased": steps}
            export_single_file(cfg.model, model, self.out / "model.safetensors", {"salun_sd": json.dumps(summary)})
        return written


def refuse_closed_form(family: Family) -> None:
    if family.text_states is None:
        raise UserError(NO_CROSS_ATTENTION.format(family=family.name))


def erase(cfg: EraseConfig, accelerator: Accelerator, steps: tuple[str, ...] = ("mask", "erase")) -> Path:
    """One SD erase (`salun-sd mask | erase | run`); returns the run folder."""
    return erase_flow.erase(SDErase(cfg), accelerator, steps)
