"""Erase one concept of the toy world with every method from the same base and seeds, and measure it.

For each method: UA (share of forget-prompt samples the classifier no longer sees as the erased
concept), accuracy on the remaining prompts (shape and colour both right), a Fréchet distance in the
classifier's feature space between the erased and the base model's samples of the remaining prompts,
and the erase's wall time (mask included for SalUn; the shared forget/remain images are generated
once, before any timing). Everything goes through the real erase flow (`salun_sd.families.erase.erase`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw

from salun_sd.attack.config import AttackConfig
from salun_sd.evaluation.classify import unlearning_accuracy
from salun_sd.evaluation.fid import ClassifierFeatures, FidMetric, feature_fid
from salun_sd.config import setting
from salun_sd.core.config import MaskConfig, MethodName, TrainConfig
from salun_sd.errors import UserError
from salun_sd.families.config import ConceptConfig, DataConfig, EraseConfig, ImageGroup
from salun_sd.run.files import atomic, save_image, write_json, write_text
from salun_sd.toyworld.classifier import ToyClassifier, load_classifier
from salun_sd.toyworld.pipeline import PIPELINE_DIR, SAMPLE_STEPS, load_toy_pipeline
from salun_sd.toyworld.scoring import generate
from salun_sd.toyworld.world import WorldSpec, caption, prompts

FEATURES = "toyworld-classifier"


@dataclass(frozen=True)
class Case:
    """What to erase: one shape (every colour of it) or one colour (every shape in it)."""

    kind: str  # "shape" | "colour"
    value: str

    def split(self, spec: WorldSpec) -> tuple[list[str], list[str]]:
        """(forget prompts, remaining prompts)."""
        hit = [(c, s) for c, s in spec.concepts if (s if self.kind == "shape" else c) == self.value]
        return [caption(c, s) for c, s in hit], [caption(c, s) for c, s in spec.concepts if (c, s) not in hit]

    def anchor(self, spec: WorldSpec, erased: tuple["Case", ...] = ()) -> list[str]:
        """Misaligned prompts c' that keep one replacement concept (circle -> square, red -> green), as SalUn's
        nudity run maps "nude person" to "person wearing clothes"; the remaining prompts at random average
        into blobs that the judge may still read as the erased shape. With several concepts erased, the
        replacement is the next one not erased, and prompts that show an erased concept are left out."""
        names = spec.shapes if self.kind == "shape" else spec.colours
        taken = {c.value for c in erased if c.kind == self.kind} | {self.value}
        other = next(names[(names.index(self.value) + i) % len(names)] for i in range(1, len(names) + 1) if names[(names.index(self.value) + i) % len(names)] not in taken)
        pairs = [(c, other) for c in spec.colours] if self.kind == "shape" else [(other, s) for s in spec.shapes]
        return [caption(c, s) for c, s in pairs if not any(e.hits(c, s) for e in erased)]

    def hits(self, colour: str, shape: str) -> bool:
        return (shape if self.kind == "shape" else colour) == self.value

    @property
    def name(self) -> str:
        return f"{self.kind} {self.value}"

    @staticmethod
    def named(value: str, spec: WorldSpec) -> "Case":
        """The case erasing a shape or a colour, by its name alone ("circle", "red")."""
        if value in spec.shapes:
            return Case("shape", value)
        if value in spec.colours:
            return Case("colour", value)
        raise UserError(f"{value!r} is neither a shape ({', '.join(spec.shapes)}) nor a colour ({', '.join(spec.colours)}) of the toy world")


def none_of(cases: list[Case], spec: WorldSpec) -> list[str]:
    """The prompts that show none of the cases' concepts."""
    return [caption(c, s) for c, s in spec.concepts if not any(case.hits(c, s) for case in cases)]


# Settings per method on the toy world (1 M-parameter UNet): the same data, batch (8), steps (200) and seeds
# for all; alpha 0.5 as on digits (docs/RESULTS.md: 1e-3 collapsed that model). Measured on erasing "circle":
# with random remaining prompts as c', SalUn at lr 1e-4 reached only UA 0.19 in 200 steps and at 1e-3 UA
# 0.76-0.88; the anchor c' (squares) gives UA 1.00. lr 1e-3 was unstable across seeds (SalUn's remaining
# accuracy 0.99 / 0.87 / 0.59 on seeds 0 / 1 / 2; RL 0.98 / 0.67 / 0.67); lr 5e-4 kept UA 1.00 with 1.00
# remaining on seeds 0 and 1. GA at 1e-3 destroyed the model, so GA keeps its usual small rate.
# ESD-x, ESD-u and FMN (η = 1; FMN on cross-attention; its code trains the whole UNet): lr picked from
# {1e-4, 3e-4, 5e-4, 1e-3} by UA + remaining accuracy on "circle", seed 0. UA / remaining accuracy:
#   esd_x 0.00/0.99, 0.67/0.92, 0.98/0.68, 0.98/0.16; esd_u 0.48/0.77, 0.64/0.67, 0.72/0.61, 0.66/0.49;
#   fmn 0.00/1.00, 0.30/0.93, 0.69/0.84, 0.80/0.71 (fmn on every weight at 3e-4: 0.91/0.12).
# UCE has no training settings: it runs with its official ones (uce.* defaults: the concept word's last token to
# the empty prompt's, the remaining prompts preserved, λ 0.5); docs/RESULTS.md has the variants tried.
METHOD_TRAIN: dict[str, dict] = {
    "salun": {"learning_rate": 5e-4, "alpha": 0.5},
    "rl": {"learning_rate": 5e-4, "alpha": 0.5},
    "ga": {"learning_rate": 1e-5, "alpha": 0.5},
    "ft": {"learning_rate": 5e-4, "alpha": 0.5},
    "esd_x": {"learning_rate": 5e-4, "negative_guidance": 1.0},
    "esd_u": {"learning_rate": 5e-4, "negative_guidance": 1.0},
    "fmn": {"learning_rate": 5e-4, "trainable": "xattn"},
    "uce": {},
}


@dataclass
class CompareConfig:
    """`salun-sd compare`: every method erases a shape and a colour of the toy world, from the same base and seeds."""

    output_dir: str = setting("outputs/compare", "RESULTS.md, results.json, grids, and runs/seed*/ with every erased model")
    base: str = setting(str(PIPELINE_DIR), "toy pipeline folder to erase from (default: the shipped one)")
    methods: list[MethodName] = setting(factory=lambda: list(METHOD_TRAIN), doc="erasing methods, each with its METHOD_TRAIN settings")
    shape: str = setting("circle", "the shape erased in the first case")
    colour: str = setting("red", "the colour erased in the second case")
    forget_per_prompt: int = setting(32, "base-model images per forget prompt (D_f)", at_least=1)
    remain_per_prompt: int = setting(16, "base-model images per remaining prompt (D_r)", at_least=1)
    steps: int = setting(200, "optimiser steps of every erase", at_least=1)
    batch_size: int = setting(8, "erase batch size", at_least=1)
    mask_fraction: float = setting(0.5, "SalUn's saliency mask fraction", above=0, at_most=1)
    mask_guidance: float = setting(3.0, "the guidance the toy model samples with", at_least=0)
    eval_per_prompt: int = setting(32, "samples per prompt for UA, remaining accuracy and FD", at_least=1)
    guidance: float = setting(3.0, "guidance scale of every sample", at_least=0)
    sample_steps: int = setting(SAMPLE_STEPS, "DDIM steps of every sample: D_f / D_r, evaluation and attack images", at_least=1)
    misaligned: Literal["anchor", "remaining"] = setting("anchor", "anchor: one replacement concept (Case.anchor) | remaining: any remaining prompt at random")
    seed: int = setting(0, "data, training and evaluation draws of one run (compare() sets it from seeds)", at_least=0)
    seeds: list[int] = setting(factory=lambda: [0, 1, 2], doc="every run is repeated per seed; the table shows mean ± std", at_least=0)
    attack: bool = setting(True, "attack every model (base included) with both attacks of `salun-sd attack`: pre-ASR and ASR columns, grids of attacked samples")
    attack_prompts: int = setting(2, "forget prompts attacked per model (the first N of the case; 4 is all)", at_least=1)
    attack_timesteps: int = setting(4, "timesteps of the attack schedule (the published 50 x 40 does not fit a CPU comparison of 42 models)", at_least=1)
    attack_iterations: int = setting(20, "optimiser steps per timestep", at_least=1)
    single: bool = setting(True, "the one-concept cases (cfg.shape, then cfg.colour)")
    joint: list[str] = setting(factory=list, doc="a multi-concept case: these shapes / colours erased at once (e.g. circle square); UA of each, and with `attack` both attacks and the random prefixes on each concept's prompts")
    sequential: list[str] = setting(factory=list, doc="a sequential case: these erased one after another, each from the last step's export; UA of every concept so far after each step, and with `attack` both attacks and the random prefixes on each concept's prompts of the final model")


def erase_config(cfg: CompareConfig, case: Case, method: str, out: Path, spec: WorldSpec) -> EraseConfig:
    forget, remain = case.split(spec)
    data = DataConfig(
        forget=[ImageGroup(prompt=p, generate=cfg.forget_per_prompt) for p in forget],
        remain=[ImageGroup(prompt=p, generate=cfg.remain_per_prompt) for p in remain],
        generation_steps=cfg.sample_steps,
        generation_guidance=cfg.guidance,
        generation_batch_size=64,
        misaligned_prompts=case.anchor(spec) if cfg.misaligned == "anchor" else [],
        seed=cfg.seed,
        cache_dir=str(out / "cache"),
    )
    train = TrainConfig(method=method, batch_size=cfg.batch_size, max_steps=cfg.steps, max_grad_norm=1.0, seed=cfg.seed, **METHOD_TRAIN.get(method, {}))
    return EraseConfig(model=cfg.base, concept=f"{case.kind} {case.value} (toy world)", output_dir=str(out / f"{case.kind}-{case.value}" / method),
                       overwrite=True, validation_grid=False, data=data, mask=MaskConfig(fraction=cfg.mask_fraction, guidance=cfg.mask_guidance, batch_size=32), unlearn=train)


def concepts_config(cfg: CompareConfig, cases: list[Case], erased: list[Case], method: str, model: str, out: Path, spec: WorldSpec) -> EraseConfig:
    """One erase of `cases` together from `model`, with every concept in `erased` (these and earlier steps') kept
    out of the remain set and of each c'; the remaining prompts show none of them."""
    one = erase_config(cfg, cases[0], method, out, spec)
    concepts = [ConceptConfig(case.name, [ImageGroup(prompt=p, generate=cfg.forget_per_prompt) for p in case.split(spec)[0]],
                              case.anchor(spec, tuple(erased)) if cfg.misaligned == "anchor" else []) for case in cases]
    data = replace(one.data, forget=[], misaligned_prompts=[], concepts=concepts, remain=[ImageGroup(prompt=p, generate=cfg.remain_per_prompt) for p in none_of(erased, spec)])
    return replace(one, model=model, concept="", data=data, output_dir=str(out / method))


def evaluate_concepts(pipe, classifier: ToyClassifier, spec: WorldSpec, cases: list[Case], remaining: list[Case], cfg: CompareConfig) -> dict:
    """UA of each case's concept on its prompts, and accuracy and images of the prompts that show none of `remaining`."""
    texts = [t for t in prompts(spec) for _ in range(cfg.eval_per_prompt)]
    images = generate(pipe, texts, seed=eval_seed(cfg.seed), steps=cfg.sample_steps, guidance=cfg.guidance)
    s, c = classifier.predict(images)
    targets, predicted = [parse(t, spec) for t in texts], list(zip(c.tolist(), s.tolist()))
    pairs = {case: {parse(t, spec) for t in case.split(spec)[0]} for case in remaining}  # (colour, shape) ids each case forgets
    row = {f"UA {case.value}": unlearning_accuracy(*zip(*[(t, p) for t, p in zip(targets, predicted) if t in pairs[case]]), pairs[case])["ua"] for case in cases}
    row["remaining_acc"] = unlearning_accuracy(targets, predicted, set().union(*pairs.values()))["remaining_accuracy"]
    rest = torch.tensor([t not in set().union(*pairs.values()) for t in targets])
    return {**row, "remain_images": images[rest], "images": images, "texts": texts}


def run_concepts(cfg: CompareConfig, cases: list[Case], sequential: bool, out: Path, log=print) -> list[dict]:
    """Base row plus, per method, one row (joint: all cases at once) or one per step (sequential: case k erased from
    step k-1's export); UA of every concept erased so far, remaining accuracy and FD on the prompts showing none of the
    cases. Rows are cached in OUT/rows.pt with their settings, as run_case does."""
    cache = out / "rows.pt"
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("seeds", "output_dir", *ATTACK_SETTINGS)}
    if cache.is_file() and (saved := torch.load(cache, weights_only=True))["config"] == settings:
        rows = saved["rows"]
    else:
        rows = _run_concepts(cfg, cases, sequential, out, log)
        with atomic(cache) as tmp:
            torch.save({"config": settings, "rows": rows}, tmp)
    return attack_concepts(cfg, cases, rows, len(cases) if sequential else 1, out, log) if cfg.attack else rows


def _run_concepts(cfg: CompareConfig, cases: list[Case], sequential: bool, out: Path, log) -> list[dict]:
    from salun_sd.run.runtime import make_accelerator
    from salun_sd.families.erase import erase

    spec, classifier, accelerator = WorldSpec(), load_classifier(), make_accelerator("no")
    base = evaluate_concepts(load_toy_pipeline(cfg.base), classifier, spec, cases, cases, cfg)
    fd = feature_distance(classifier, base.pop("remain_images"))
    rows = [{"method": "base", "step": 0, **base, "FD": 0.0, "seconds": 0.0}]
    steps = [cases[: k + 1] for k in range(len(cases))] if sequential else [cases]
    for method in cfg.methods:
        model = cfg.base
        for k, erased in enumerate(steps, 1):
            now = erased[-1:] if sequential else erased
            ecfg = concepts_config(cfg, now, erased, method, model, out / (f"step{k}" if sequential else "joint"), spec)
            start = time.time()
            run_dir = erase(ecfg, accelerator, ("mask", "erase"))  # the flow skips the mask for methods that train without one
            seconds = time.time() - start
            model = str(run_dir / "pipeline")
            r = evaluate_concepts(load_toy_pipeline(model), classifier, spec, erased, cases, cfg)
            row = {"method": method, "step": k, **r, "FD": fd.distance(r.pop("remain_images").split(512)), "seconds": seconds, "model": model}
            log(f"{'sequential' if sequential else 'joint'} {method} step {k}: " + ", ".join(f"{key} {v:.3f}" for key, v in row.items() if key.startswith("UA"))
                + f", remaining {row['remaining_acc']:.3f}")
            rows.append(row)
    return rows


def attack_concepts(cfg: CompareConfig, cases: list[Case], rows: list[dict], last: int, out: Path, log) -> list[dict]:
    """pre-ASR and the ASR of both attacks and of the random prefixes, per concept (its first `attack_prompts` forget
    prompts), on the base model and each method's final model (the last step's export). Cached in OUT/attack-rows.pt
    apart from the erases, so the attack settings can change without erasing again."""
    from salun_sd.run.runtime import make_accelerator

    cache = out / "attack-rows.pt"
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("seeds", "output_dir")}
    found = saved["rows"] if cache.is_file() and (saved := torch.load(cache, weights_only=True))["config"] == settings else {}
    spec, accelerator = WorldSpec(), make_accelerator("no")
    for i in [i for i, r in enumerate(rows) if r["step"] in (0, last) and i not in found]:  # a model attacked before a kill is kept
        model, metrics = rows[i].get("model", cfg.base), {}
        for case in cases:
            name = case.name.replace(" ", "-")
            rates = attack_metrics(cfg, case, model, out / "attack" / rows[i]["method"] / name, out / f"attack-{name}", spec, accelerator)
            metrics.update({f"{k} {case.value}": v for k, v in rates.items() if k in ATTACK_METRICS})
        found[i] = metrics
        log(f"attacked {rows[i]['method']} (step {rows[i]['step']}): " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        with atomic(cache) as tmp:
            torch.save({"config": settings, "rows": found}, tmp)
    return [{**r, **found.get(i, {})} for i, r in enumerate(rows)]


def evaluate(pipe, classifier: ToyClassifier, spec: WorldSpec, case: Case, cfg: CompareConfig) -> dict:
    """Samples for every prompt (same seeds for every model) and the classifier's verdicts."""
    forget, remain = case.split(spec)
    texts = [t for t in forget + remain for _ in range(cfg.eval_per_prompt)]
    images = generate(pipe, texts, seed=eval_seed(cfg.seed), steps=cfg.sample_steps, guidance=cfg.guidance)
    s, c = classifier.predict(images)
    forgotten = {parse(t, spec) for t in forget}  # (colour, shape) ids: every pair with the erased shape or colour
    scores = unlearning_accuracy([parse(t, spec) for t in texts], list(zip(c.tolist(), s.tolist())), forgotten)
    nf = len(forget) * cfg.eval_per_prompt
    return {"UA": scores["ua"], "remaining_acc": scores["remaining_accuracy"], "remain_images": images[nf:], "images": images, "texts": texts}


def parse(text: str, spec: WorldSpec) -> tuple[int, int]:
    from salun_sd.toyworld.world import parse_caption

    colour, shape = parse_caption(text, spec)
    return spec.colours.index(colour), spec.shapes.index(shape)


def feature_distance(classifier: ToyClassifier, reference: torch.Tensor) -> FidMetric:
    """The Fréchet distance to `reference` (images in [-1, 1]) in the classifier's pooled features."""
    fd = feature_fid(ClassifierFeatures(classifier, classifier.shape_head.in_features), FEATURES)
    fd.add(reference.split(512), real=True)
    return fd


ATTACK_METRICS = ("pre_ASR", "ASR_discrete", "ASR_embedding", "ASR_random")
ATTACK_SETTINGS = ("attack", "attack_prompts", "attack_timesteps", "attack_iterations")  # what only the attacks depend on


def attack_config(cfg: CompareConfig, case: Case, model: str | Path, out: Path, case_dir: Path, spec: WorldSpec) -> AttackConfig:
    """`salun-sd attack` on the case's first forget prompts with the toy judge and the evaluation's sampler and guidance;
    the base model's reference images are shared by every model of the case (case_dir/attack-reference)."""
    case_dir.mkdir(parents=True, exist_ok=True)
    prompts = case_dir / "attack-prompts.txt"
    write_text(prompts, "\n".join(case.split(spec)[0][: cfg.attack_prompts]) + "\n")
    return AttackConfig(model=str(model), base=cfg.base, prompts=str(prompts), output_dir=str(out), reference_dir=str(case_dir / "attack-reference"),
                        judge="toyworld", concept=case.value, timesteps=cfg.attack_timesteps, iterations=cfg.attack_iterations, steps=cfg.sample_steps,
                        scheduler="", guidance=cfg.guidance, reference_steps=cfg.sample_steps, reference_guidance=cfg.guidance, seed=20_000 + cfg.seed, attack_seed=cfg.seed)


def attack_metrics(cfg: CompareConfig, case: Case, model: str | Path, out: Path, case_dir: Path, spec: WorldSpec, accelerator) -> dict:
    """pre-ASR, the ASR of both attacks and of the random baseline (their chance floor), as rates over the attacked prompts."""
    from salun_sd.attack.run import attack

    acfg = attack_config(cfg, case, model, out, case_dir, spec)
    attack(acfg, accelerator, log=lambda *a: None)
    totals = json.loads((out / "report.json").read_text())["totals"]
    return {"pre_ASR": totals["pre_asr"], "ASR_discrete": totals["discrete"]["asr"], "ASR_embedding": totals["embedding"]["asr"],
            "ASR_random": totals["random"]["asr"], "attack_dir": str(out)}


def run_case(cfg: CompareConfig, case: Case, out: Path, log=print) -> list[dict]:
    """Base row plus one row per method; each erased model is evaluated (and attacked) on the same prompts and seeds.

    The rows are kept in OUT/<case>/rows.pt with the settings that made them, so a rerun with the same settings
    (after a kill, or to aggregate seeds that ran as separate processes) reuses them instead of redoing the case."""
    cache = out / f"{case.kind}-{case.value}" / "rows.pt"
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("seeds", "output_dir")}  # what one seed's rows depend on
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved["config"] == settings:
            log(f"{case.kind} {case.value}, seed {cfg.seed}: reusing {cache}")
            return saved["rows"]
    rows = _run_case(cfg, case, out, log)
    with atomic(cache) as tmp:
        torch.save({"config": settings, "rows": rows}, tmp)
    return rows


def _run_case(cfg: CompareConfig, case: Case, out: Path, log) -> list[dict]:
    from salun_sd.run.runtime import make_accelerator
    from salun_sd.core.objectives import get_method
    from salun_sd.families.erase import SDErase, erase

    spec = WorldSpec()
    classifier = load_classifier()
    accelerator = make_accelerator("no")
    base = evaluate(load_toy_pipeline(cfg.base), classifier, spec, case, cfg)
    fd = feature_distance(classifier, base["remain_images"])
    rows = [{"method": "base", "UA": base["UA"], "remaining_acc": base["remaining_acc"], "FD": 0.0, "seconds": 0.0, "images": base["images"], "texts": base["texts"]}]
    case_dir = out / f"{case.kind}-{case.value}"
    if cfg.attack:
        rows[0].update(attack_metrics(cfg, case, cfg.base, case_dir / "base-attack", case_dir, spec, accelerator))
    prefetch, salun = SDErase(erase_config(cfg, case, "salun", out, spec)), get_method("salun")
    prefetch.check(salun)  # resolves the concept list that load() reads
    prefetch.load(accelerator, salun)  # generate and cache D_f, D_r once, outside the timings
    for method in cfg.methods:
        ecfg = erase_config(cfg, case, method, out, spec)
        start = time.time()
        run_dir = erase(ecfg, accelerator, ("mask", "erase") if method == "salun" else ("erase",))
        seconds = time.time() - start
        r = evaluate(load_toy_pipeline(run_dir / "pipeline"), classifier, spec, case, cfg)
        row = {"method": method, "UA": r["UA"], "remaining_acc": r["remaining_acc"], "FD": fd.distance(r["remain_images"].split(512)),
               "seconds": seconds, "images": r["images"], "texts": r["texts"]}
        if cfg.attack:
            row.update(attack_metrics(cfg, case, run_dir / "pipeline", run_dir / "attack", case_dir, spec, accelerator))
        log(f"{case.kind} {case.value} {method}: UA {row['UA']:.3f} remaining {row['remaining_acc']:.3f} FD {row['FD']:.3f} {seconds:.0f} s"
            + (f"; pre-ASR {row['pre_ASR']:.2f} ASR discrete {row['ASR_discrete']:.2f} embedding {row['ASR_embedding']:.2f} random {row['ASR_random']:.2f}" if cfg.attack else ""))
        rows.append(row)
    return rows


def grid(rows: list[dict], per_prompt: int, path: Path, scale: int = 4) -> None:
    """One image per prompt (first seed) for each model: rows = models, columns = prompts."""
    texts = rows[0]["texts"][::per_prompt]
    cell = rows[0]["images"].shape[-1] * scale
    label_w, head = 60, 28
    img = Image.new("RGB", (label_w + cell * len(texts), head + cell * len(rows)), "white")
    pen = ImageDraw.Draw(img)
    for k, text in enumerate(texts):  # "a photo of a red circle" -> "red" over "circle"
        for line, word in enumerate(text.split()[-2:]):
            pen.text((label_w + k * cell + 2, 2 + 12 * line), word, fill="black")
    for r, row in enumerate(rows):
        pen.text((4, head + r * cell + cell // 2 - 5), row["method"], fill="black")
    cells = [Image.fromarray(((row["images"][k * per_prompt].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).resize((cell, cell), Image.Resampling.NEAREST)
             for row in rows for k in range(len(texts))]
    img.paste(make_image_grid(cells, rows=len(rows), cols=len(texts)), (label_w, head))
    save_image(img, path)


def preamble(cfg: CompareConfig) -> list[str]:
    """What the numbers rest on: the judge's accuracy on drawn images and the base model's on its own samples."""
    clf = load_classifier().cfg.measured.get("fresh_clean_8192", {})
    lines = ["## Toy world: erasing with every method from the same base", "",
             "World: `salun_sd.toyworld.world` (16x16, shapes circle/square/triangle/cross in red/green/blue/yellow, prompts "
             "\"a photo of a {colour} {shape}\"). Judge: the shipped toy classifier"
             + (f" ({clf['shape']:.2%} shape / {clf['colour']:.2%} colour on 8,192 fresh drawn images)." if clf else ".")]
    base_eval = Path(cfg.base) / "toyworld_eval.json"
    if base_eval.is_file():
        b = json.loads(base_eval.read_text())
        lines.append(f"Base model: `{cfg.base}`, scored on {b.get('samples', '?')} of its own samples: shape {b['shape']:.3f}, colour {b['colour']:.3f}.")
    lines += ["UA: share of forget-prompt samples not classified as the erased concept. Remaining acc: shape and colour both right "
              "on the other prompts. FD: Fréchet distance between the classifier's pooled features of the erased and the base "
              "model's samples of the remaining prompts (same seeds). Wall time: the erase alone (SalUn: mask included).", ""]
    return lines


METRICS = ("UA", "remaining_acc", "FD", "seconds")


def metric_keys(row: dict) -> tuple[str, ...]:
    if "step" in row:  # a multi-concept row: UA of each concept so far, then the rest, then the attacks' rates per concept
        return tuple(k for k in row if k.startswith("UA ")) + METRICS[1:] + tuple(k for k in row if k.split(" ")[0] in ATTACK_METRICS)
    return METRICS + (ATTACK_METRICS if "pre_ASR" in row else ())



def eval_seed(seed: int) -> int:
    """First noise seed of a run's evaluation samples: image j is drawn from eval_seed + j (toyworld.scoring), so
    runs of different seeds must start 100,000 apart to share no sample (10_000 + seed made seeds 0, 1, 2 share all
    but one image per prompt)."""
    return 10_000 + 100_000 * seed

def aggregate(per_seed: list[list[dict]]) -> list[dict]:
    """Mean and (population) std over seeds of each method's metrics; images and attack folders of the first seed."""
    rows = []
    for i, first in enumerate(per_seed[0]):
        values = {k: np.array([runs[i][k] for runs in per_seed]) for k in metric_keys(first)}
        rows.append({"method": first["method"], **({"step": first["step"]} if "step" in first else {}), "seeds": len(per_seed), **{k: float(v.mean()) for k, v in values.items()},
                     **{f"{k}_std": float(v.std()) for k, v in values.items()}, "images": first["images"], "texts": first["texts"],
                     **({"attack_dir": first["attack_dir"]} if "attack_dir" in first else {})})
    return rows


def _cell(row: dict, key: str, digits: int) -> str:
    text = f"{row[key]:.{digits}f}"
    return text + (f" ± {row[key + '_std']:.{digits}f}" if row.get("seeds", 1) > 1 else "")


def attack_grid(rows: list[dict], path: Path) -> None:
    """Per model (row): for each attacked prompt, its plain-prompt sample, then after the discrete and the embedding attack."""
    from salun_sd.evaluation.imagefiles import load_rgb
    from salun_sd.toyworld.world import to_tensor

    attacked = []
    for row in rows:
        report = json.loads((Path(row["attack_dir"]) / "report.json").read_text())
        files = [(r["file"], r["prompt"].split()[-2]) for r in report["prompts"] if "skipped" not in r]
        kinds = ("plain", "discrete", "embedding")
        pictures = [np.asarray(load_rgb(Path(row["attack_dir"]) / "images" / kind / file)) for file, _ in files for kind in kinds]
        texts = [f"{word} {kind}" for _, word in files for kind in kinds]
        attacked.append({"method": row["method"], "images": to_tensor(np.stack(pictures)), "texts": texts})
    grid(attacked, 1, path)


def markdown(results: dict[str, list[dict]], cfg: CompareConfig) -> str:
    lines = preamble(cfg)
    for name, rows in results.items():
        seeds = f" (mean ± std over seeds {', '.join(map(str, cfg.seeds))})" if rows[0].get("seeds", 1) > 1 else ""
        attacked = "pre_ASR" in rows[0]
        head = "| method | UA ↑ | remaining acc ↑ | FD vs base (classifier features) ↓ | wall time (s) |" + (" pre-ASR ↓ | ASR discrete ↓ | ASR embedding ↓ | random prefixes (floor) |" if attacked else "")
        lines += [f"### Erasing {name}{seeds}", "", head, "|" + " --- |" * (head.count("|") - 1)]
        for r in rows:
            cells = f"| {r['method']} | {_cell(r, 'UA', 3)} | {_cell(r, 'remaining_acc', 3)} | {_cell(r, 'FD', 2)} | {_cell(r, 'seconds', 0)} |"
            lines.append(cells + (f" {_cell(r, 'pre_ASR', 2)} | {_cell(r, 'ASR_discrete', 2)} | {_cell(r, 'ASR_embedding', 2)} | {_cell(r, 'ASR_random', 2)} |" if attacked else ""))
        lines += ["", f"![{name}](toyworld-{name.replace(' ', '-')}.png)", ""]
        if attacked:
            lines += [f"![{name}, attacked](toyworld-{name.replace(' ', '-')}-attacked.png)", ""]
    lines.append(f"Settings: {json.dumps({k: v for k, v in vars(cfg).items()})}; per-method training: {json.dumps(METHOD_TRAIN)}.")
    return "\n".join(lines) + "\n"


def concepts_markdown(name: str, rows: list[dict], cfg: CompareConfig) -> list[str]:
    """A joint or sequential case's table: UA of each concept erased so far (— where not yet erased), remaining accuracy, FD, time."""
    concepts = list(dict.fromkeys(k for r in rows for k in r if k.startswith("UA ") and not k.endswith("_std")))
    seeds = f" (mean ± std over seeds {', '.join(map(str, cfg.seeds))})" if rows[0].get("seeds", 1) > 1 else ""
    head = "| method | step | " + " | ".join(f"{k} ↑" for k in concepts) + " | remaining acc ↑ | FD vs base ↓ | wall time (s) |"
    lines = [f"### {name}{seeds}", "", head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        cells = [_cell(r, k, 3) if k in r else "—" for k in concepts]
        lines.append(f"| {r['method']} | {r['step']} | " + " | ".join(cells) + f" | {_cell(r, 'remaining_acc', 3)} | {_cell(r, 'FD', 2)} | {_cell(r, 'seconds', 0)} |")
    attacked = [r for r in rows if any(k.startswith("pre_ASR ") for k in r)]
    if attacked:
        names = [k.removeprefix("UA ") for k in concepts]
        head = "| method | step | " + " | ".join(f"{n}: pre-ASR / discrete / embedding / random ↓" for n in names) + " |"
        lines += ["", f"Under attack (each method's final model): rates over each concept's first {cfg.attack_prompts} forget prompt(s), "
                  f"{cfg.attack_timesteps} timesteps × {cfg.attack_iterations} optimiser steps", "", head, "|" + " --- |" * (head.count("|") - 1)]
        for r in attacked:
            cells = [" / ".join(_cell(r, f"{k} {n}", 2) for k in ATTACK_METRICS) for n in names]
            lines.append(f"| {r['method']} | {r['step']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def compare(cfg: CompareConfig, log=print) -> Path:
    """Run both cases (cfg.shape, cfg.colour), write OUTPUT_DIR/RESULTS.md, results.json and grids; returns the Markdown path."""
    from salun_sd.run.manifest import manifest

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "manifest.json", manifest(asdict(cfg), "compare"))
    results, numbers = {}, {}
    for case in (Case("shape", cfg.shape), Case("colour", cfg.colour)) if cfg.single else ():
        name = f"{case.kind} {case.value}"
        per_seed = [run_case(replace(cfg, seed=seed), case, out / "runs" / f"seed{seed}", log) for seed in cfg.seeds]
        rows = aggregate(per_seed)
        grid(rows, cfg.eval_per_prompt, out / f"toyworld-{name.replace(' ', '-')}.png")
        if cfg.attack:
            attack_grid(rows, out / f"toyworld-{name.replace(' ', '-')}-attacked.png")
        results[name] = rows
        numbers[name] = {"per_seed": {seed: [{k: r[k] for k in ("method", *metric_keys(r))} for r in runs] for seed, runs in zip(cfg.seeds, per_seed)},
                         "mean_std": [{m: v for m, v in r.items() if m not in ("images", "texts")} for r in rows]}
        write_json(out / "results.json", numbers)
    spec, extra = WorldSpec(), []
    for kind, values in (("joint", cfg.joint), ("sequential", cfg.sequential)):
        if not values:
            continue
        cases = [Case.named(v, spec) for v in values]
        name = f"{'Jointly' if kind == 'joint' else 'One after another'}: {', '.join(values)}"
        per_seed = [run_concepts(replace(cfg, seed=seed), cases, kind == "sequential", out / "runs" / f"seed{seed}" / f"{kind}-{'-'.join(values)}", log) for seed in cfg.seeds]
        rows = aggregate(per_seed)
        extra += concepts_markdown(name, rows, cfg)
        numbers[name] = {"per_seed": {seed: [{k: r[k] for k in ("method", "step", *metric_keys(r))} for r in runs] for seed, runs in zip(cfg.seeds, per_seed)},
                         "mean_std": [{m: v for m, v in r.items() if m not in ("images", "texts")} for r in rows]}
        write_json(out / "results.json", numbers)
    return write_text(out / "RESULTS.md", markdown(results, cfg) + ("\n".join(extra) + "\n" if extra else ""))
