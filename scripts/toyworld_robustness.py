"""Toy-world robustness that separates methods (issue 19 part 6): every method's erased model under the prompt
attacks of `salun-sd attack` and the relearning attack of `salun-sd relearn`, with intervals and paired tests.

Unit: one (forget prompt, image seed) instance. Every forget prompt of each case (4) with `seeds_per_prompt` image
seeds (75: 300 paired instances per method and case), the same instances for every method, so SalUn and each
baseline are compared on identical prompts and seeds (exact McNemar test on the discordant instances). The budget
goes to optimiser steps, not judged images: `timesteps` (4) judged images per instance and attack, `iterations`
optimiser steps per timestep; the pilot stage checks that the attacks' loss has levelled off at that budget.
Stages, each resumable (a rerun skips what is on disk):
  erase    every method erases the case from the shipped base (the `salun-sd compare` settings, erase seed 0);
  pilot    the SalUn model, `pilot_instances` instances, every budget of `pilot_iterations`, a judge that never
           stops the search: the attacked diffusion loss (whole schedule, fixed noise) against the plain prompt's;
  relearn  `salun-sd relearn` on every erased model, and once on the base model (its curve is the control);
  attack   in rounds of `round_seeds` seeds (4 x round_seeds instances) per method, so that whenever the run
           stops every method has the same instances done; `budget_minutes` stops it between two attack calls.
The table (docs/RESULTS.md between the markers, and OUTPUT_DIR/robustness.md / .json) is written after every round.

    python scripts/toyworld_robustness.py                                  # the full run
    python scripts/toyworld_robustness.py --seeds_per_prompt 5 --budget_minutes 30 --stages erase attack
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import time
from dataclasses import asdict, dataclass
from typing import Literal
from pathlib import Path

from salun_sd.config import add_config_arguments, config_from_args, setting
from salun_sd.evaluation.stats import mcnemar, wilson
from salun_sd.run.files import write_json, write_text
from salun_sd.toyworld.compare import METHOD_TRAIN, Case, CompareConfig, erase_config
from salun_sd.toyworld.pipeline import PIPELINE_DIR, SAMPLE_STEPS
from salun_sd.toyworld.world import WorldSpec

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- toyworld-robustness:start -->", "<!-- toyworld-robustness:end -->"
STAGES = ("erase", "pilot", "relearn", "attack")


@dataclass
class RobustnessConfig:
    output_dir: str = setting("outputs/robustness", "models/, relearn/, attack/, pilot/, robustness.md, robustness.json, timings.jsonl")
    methods: list[str] = setting(factory=lambda: list(METHOD_TRAIN), doc="every method of `salun-sd compare`, with its settings there")
    shape: str = setting("circle", "the shape erased in the first case")
    colour: str = setting("red", "the colour erased in the second case")
    cases: list[Literal["shape", "colour"]] = setting(factory=lambda: ["shape", "colour"], doc="which cases run: shape (erase `shape`) and/or colour (erase `colour`)")
    erase_seed: int = setting(0, "the seed of every erase (data, mask, training): one erased model per method and case")
    stages: list[Literal["erase", "pilot", "relearn", "attack"]] = setting(factory=lambda: list(STAGES), doc="erase | pilot | relearn | attack")
    seeds_per_prompt: int = setting(75, "image seeds per forget prompt: 4 prompts x 75 = 300 paired instances per method and case")
    first_image_seed: int = setting(20_000, "instance (prompt, s) draws its judged images from seed first_image_seed + s")
    round_seeds: int = setting(5, "seeds per round: each round attacks 4 x round_seeds more instances on every method")
    attacks: str = setting("discrete,embedding,random", "`salun-sd attack --attacks`: random is the chance floor (random prefixes, as many judged images)")
    timesteps: int = setting(4, "judged images per instance and attack (published: 50)")
    iterations: int = setting(50, "optimiser steps per timestep (published: 40 over 50 timesteps)")
    batch_size: int = setting(64, "instances per forward/backward pass of the attack (`salun-sd attack --batch_size`)")
    pilot_instances: int = setting(8, "instances of the pilot (the first ones; the SalUn model of the first case)")
    pilot_iterations: list[int] = setting(factory=lambda: [10, 25, 50, 100], doc="budgets the pilot compares (per timestep)")
    relearn_images: int = setting(8, "base-model images the relearning fine-tune trains on (2 per forget prompt)")
    relearn_steps: int = setting(100, "steps of the relearning fine-tune")
    relearn_eval_at: list[int] = setting(factory=lambda: [0, 10, 25, 50, 100], doc="steps at which UA is measured")
    relearn_eval_images: int = setting(16, "UA images per forget prompt at each point")
    relearn_learning_rate: float = setting(5e-4, "one rate for every model: the toy world's erase rate (SalUn, RL, FT, ESD, FMN)")
    relearn_control: bool = setting(True, "also fine-tune the base model (the control curve); false: only the methods' models (e.g. a second process beside one that runs it)")
    budget_minutes: float = setting(0.0, "stop between two attack calls once this much wall time has passed since the start (0: no limit)")
    results_md: str = setting("docs/RESULTS.md", "the table is written between the markers of this file (\"\": only OUTPUT_DIR)")


def cases(cfg: RobustnessConfig) -> list[Case]:
    return [Case(kind, cfg.shape if kind == "shape" else cfg.colour) for kind in cfg.cases]


def case_name(case: Case) -> str:
    return f"{case.kind}-{case.value}"


def compare_config(cfg: RobustnessConfig) -> CompareConfig:
    return CompareConfig(seed=cfg.erase_seed, seeds=[cfg.erase_seed], attack=False)


def model_dir(cfg: RobustnessConfig, case: Case, method: str) -> Path:
    return Path(cfg.output_dir) / "models" / case_name(case) / method / "pipeline"


def log_timing(cfg: RobustnessConfig, **entry) -> None:
    with (Path(cfg.output_dir) / "timings.jsonl").open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def erase_models(cfg: RobustnessConfig) -> None:
    """Every method's erased model of each case, as `salun-sd compare` makes them (the same data, steps and rates)."""
    from salun_sd.families.erase import erase
    from salun_sd.run.runtime import make_accelerator

    spec = WorldSpec()
    for case in cases(cfg):
        for method in cfg.methods:
            if (model_dir(cfg, case, method) / "model_index.json").is_file():
                continue
            ecfg = erase_config(compare_config(cfg), case, method, Path(cfg.output_dir) / "models", spec)
            start = time.time()
            erase(ecfg, make_accelerator("no"), ("mask", "erase") if method == "salun" else ("erase",))
            log_timing(cfg, stage="erase", case=case_name(case), method=method, seconds=round(time.time() - start, 1))


def instance_csv(cfg: RobustnessConfig, case: Case) -> Path:
    """Every instance of the case, ordered by seed then prompt, so the first 4·s rows are seeds 0..s-1 of every prompt."""
    forget, _ = case.split(WorldSpec())
    path = Path(cfg.output_dir) / "attack" / case_name(case) / "instances.csv"
    rows = [{"case_number": i, "prompt": p, "evaluation_seed": cfg.first_image_seed + s, "evaluation_guidance": 3.0}
            for i, (s, p) in enumerate((s, p) for s in range(cfg.seeds_per_prompt) for p in forget)]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, text.getvalue())


def attack_config(cfg: RobustnessConfig, case: Case, method: str, limit: int, **overrides):
    """`salun-sd attack` with the toy model's own sampler (SAMPLE_STEPS DDIM steps, guidance 3.0), references and judged images alike."""
    from salun_sd.attack.config import AttackConfig

    folder = Path(cfg.output_dir) / "attack" / case_name(case)
    settings = dict(model=str(model_dir(cfg, case, method)), base=str(PIPELINE_DIR), prompts=str(instance_csv(cfg, case)), limit=limit,
                    output_dir=str(folder / method), reference_dir=str(folder / "reference"), judge="toyworld", concept=case.value,
                    attacks=cfg.attacks, timesteps=cfg.timesteps, iterations=cfg.iterations, steps=SAMPLE_STEPS, scheduler="", reference_steps=SAMPLE_STEPS,
                    reference_guidance=3.0, attack_seed=0, batch_size=cfg.batch_size)
    return AttackConfig(**{**settings, **overrides})


def never(images: list) -> list[bool]:
    """The pilot's judge: no image stops the search, so every instance runs the whole budget."""
    return [False] * len(images)


def pilot(cfg: RobustnessConfig) -> list[dict]:
    """Mean attacked / plain reference loss per budget on the first instances of the SalUn model of the first case."""
    from salun_sd.attack.run import attack
    from salun_sd.run.runtime import make_accelerator

    case, rows = cases(cfg)[0], []
    for iterations in cfg.pilot_iterations:
        acfg = attack_config(cfg, case, "salun", cfg.pilot_instances, attacks="discrete,embedding", iterations=iterations, judge=f"{Path(__file__).stem}:never",
                             output_dir=str(Path(cfg.output_dir) / "pilot" / f"iterations-{iterations}"))
        attack(acfg, make_accelerator("no"), log=lambda *a: None)  # a rerun finds the instances done and only rewrites the report
        report = json.loads((Path(acfg.output_dir) / "report.json").read_text())
        row = {"iterations": iterations, "optimiser_steps": iterations * cfg.timesteps}
        for name in ("discrete", "embedding"):
            entries = [p["attacks"][name] for p in report["prompts"]]
            row[name] = sum(e["reference_loss_attacked"] / e["reference_loss_plain"] for e in entries) / len(entries)
            row[f"{name}_seconds"] = sum(e["seconds"] for e in entries) / len(entries)  # per instance: its batch's time shared
        rows.append(row)
        write_json(Path(cfg.output_dir) / "pilot" / "pilot.json", rows)  # after each budget: a stopped pilot keeps what it measured
    return rows


def relearn_config(cfg: RobustnessConfig, case: Case, target: str):
    from salun_sd.relearn.config import RelearnConfig

    forget, _ = case.split(WorldSpec())
    model = str(model_dir(cfg, case, target)) if target != "base" else ""
    return RelearnConfig(model=model, base=str(PIPELINE_DIR), prompts=forget, images=cfg.relearn_images, steps=cfg.relearn_steps, eval_at=cfg.relearn_eval_at,
                         learning_rate=cfg.relearn_learning_rate, targets=["base" if target == "base" else "model"], generation_steps=SAMPLE_STEPS, guidance=3.0,
                         eval_images=cfg.relearn_eval_images, generation_batch_size=128, judge="toyworld", concept=case.value,
                         output_dir=str(Path(cfg.output_dir) / "relearn" / case_name(case) / target), cache_dir=str(Path(cfg.output_dir) / "relearn" / "cache"))


def relearn_all(cfg: RobustnessConfig) -> None:
    from salun_sd.relearn.run import relearn

    from salun_sd.errors import UserError
    from salun_sd.run.lock import run_lock

    for case in cases(cfg):
        for target in ["base", *cfg.methods] if cfg.relearn_control else cfg.methods:
            rcfg = relearn_config(cfg, case, target)
            start = time.time()
            try:
                with run_lock(rcfg.output_dir):
                    relearn(rcfg, log=print)
            except UserError as err:  # another process of this script holds the target
                print(f"skipping {case_name(case)} {target}: {err}")
                continue
            log_timing(cfg, stage="relearn", case=case_name(case), method=target, seconds=round(time.time() - start, 1))


def attack_rounds(cfg: RobustnessConfig, deadline: float | None) -> None:
    """Round r attacks instances [0, 4·round_seeds·(r+1)) of every method; a finished instance is never redone."""
    from salun_sd.attack.run import attack
    from salun_sd.run.runtime import make_accelerator

    total = cfg.seeds_per_prompt
    for seeds in range(min(cfg.round_seeds, total), total + cfg.round_seeds, cfg.round_seeds):
        seeds = min(seeds, total)
        for case in cases(cfg):
            limit = seeds * len(case.split(WorldSpec())[0])
            for method in cfg.methods:
                if deadline is not None and time.time() > deadline:
                    print(f"budget reached: stopping before {case_name(case)} {method} at {seeds} seeds per prompt")
                    return
                acfg = attack_config(cfg, case, method, limit)
                before = len(list((Path(acfg.output_dir) / "results").glob("*.json")))
                start = time.time()
                attack(acfg, make_accelerator("no"), log=lambda *a: None)
                done = len(list((Path(acfg.output_dir) / "results").glob("*.json"))) - before
                if done:
                    log_timing(cfg, stage="attack", case=case_name(case), method=method, instances=done, seconds=round(time.time() - start, 1))
        write_tables(cfg)
        if seeds == total:
            return


def results(folder: Path) -> dict[int, dict]:
    return {int(p.stem): json.loads(p.read_text()) for p in sorted((folder / "results").glob("*.json"))} if (folder / "results").is_dir() else {}


def cell(k: int, n: int) -> str:
    low, high = wilson(k, n)
    return f"{k}/{n} = {k / n:.2f} [{low:.2f}, {high:.2f}]" if n else "–"


def discordant(a: list[bool], b: list[bool]) -> dict:
    """The paired instances where exactly one side succeeded, and the exact McNemar p-value."""
    only_a, only_b = sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
    return {"paired": len(a), "first_only": only_a, "second_only": only_b, "p": mcnemar(only_a, only_b)}


def case_tables(cfg: RobustnessConfig, case: Case) -> tuple[list[str], dict]:
    """One case's rows and paired tests over the instances every method with results has finished (a finished round
    gives them all the same ones; a method's instances beyond that wait for the others), and the same numbers as data."""
    folder = Path(cfg.output_dir) / "attack" / case_name(case)
    done_by = {m: results(folder / m) for m in cfg.methods}
    common = set.intersection(*(set(r) for r in done_by.values() if r)) if any(done_by.values()) else set()
    per_method = {m: {i: r for i, r in done.items() if i in common} for m, done in done_by.items()}
    names = [n.strip() for n in cfg.attacks.split(",")]
    data: dict = {"instances": {m: len(r) for m, r in per_method.items()}, "finished": {m: len(r) for m, r in done_by.items()}, "methods": {}, "salun_vs": {}}
    floor = "discrete" in names and "random" in names
    head = "| method | pre-ASR | " + " | ".join(f"ASR {name}" for name in names) + " |" + (" discrete vs random: only discrete / only random, McNemar p |" if floor else "")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    success = {m: {name: {i: r["attacks"][name]["success"] for i, r in done.items()} for name in names} for m, done in per_method.items()}
    for m, done in per_method.items():
        n = len(done)
        counts = {"instances": n, "pre": sum(r["pre_success"] for r in done.values()), **{name: sum(success[m][name].values()) for name in names}}
        row = f"| {m} | {cell(counts['pre'], n)} | " + " | ".join(cell(counts[name], n) for name in names) + " |"
        if floor:
            counts["discrete_vs_random"] = test = discordant(list(success[m]["discrete"].values()), list(success[m]["random"].values()))
            row += f" {test['first_only']} / {test['second_only']}, p = {test['p']:.3g} |" if n else " – |"
        data["methods"][m] = counts
        lines.append(row)
    if "salun" in cfg.methods:
        lines += ["", "| SalUn vs | paired instances | " + " | ".join(f"{name}: SalUn only / other only, McNemar p" for name in names) + " |",
                  "|---" * (len(names) + 2) + "|"]
        for m in cfg.methods:
            shared = sorted(set(per_method["salun"]) & set(per_method[m]))
            if m == "salun" or not shared:
                continue
            tests = {name: discordant([success["salun"][name][i] for i in shared], [success[m][name][i] for i in shared]) for name in names}
            data["salun_vs"][m] = tests
            lines.append(f"| {m} | {len(shared)} | " + " | ".join(f"{t['first_only']} / {t['second_only']}, p = {t['p']:.3g}" for t in tests.values()) + " |")
    return lines, data


def relearn_table(cfg: RobustnessConfig, case: Case) -> tuple[list[str], dict]:
    curves = {}
    for target in ["base", *cfg.methods]:
        folder = Path(cfg.output_dir) / "relearn" / case_name(case) / target
        curve = folder / ("base" if target == "base" else "model") / "curve.json"  # written after each point: a stopped fine-tune shows the points it reached
        if curve.is_file():
            curves[target] = json.loads(curve.read_text())["points"]
    if not curves:
        return [], {}
    from salun_sd.relearn.run import steps_to

    steps = cfg.relearn_eval_at
    lines = ["| model | " + " | ".join(f"UA at step {s}" for s in steps) + " | first step with UA ≤ 0.5 |", "|---" * (len(steps) + 2) + "|"]
    for target, points in curves.items():
        at = {p["step"]: p for p in points}
        back = steps_to(points, 0.5)
        lines.append(f"| {target} | " + " | ".join(f"{at[s]['UA']:.2f} [{at[s]['UA_wilson95'][0]:.2f}, {at[s]['UA_wilson95'][1]:.2f}]" if s in at else "–" for s in steps)
                     + f" | {back if back is not None else f'none within {steps[-1]}'} |")
    return lines, curves


def write_tables(cfg: RobustnessConfig) -> None:
    """OUTPUT_DIR/robustness.md and .json, and the same Markdown between the markers of results_md."""
    from salun_sd.run.manifest import git_revision

    out = Path(cfg.output_dir)
    lines, data = [], {"config": asdict(cfg), "revision": git_revision(), "cases": {}}
    pilot_path = out / "pilot" / "pilot.json"
    if pilot_path.is_file():
        rows = json.loads(pilot_path.read_text())
        lines += [f"**Budget check (pilot).** SalUn model of {case_name(cases(cfg)[0])}, its first {cfg.pilot_instances} instances, a judge that never stops the "
                  "search; mean attacked / plain reference diffusion loss (whole schedule, fixed noise; lower: the attack found more):", "",
                  "| optimiser steps per instance | discrete | embedding | wall seconds per instance, discrete / embedding (batch of all) |", "|---|---|---|---|"]
        lines += [f"| {r['optimiser_steps']} | {r['discrete']:.3f} | {r['embedding']:.3f} | {r['discrete_seconds']:.1f} / {r['embedding_seconds']:.1f} |" for r in rows] + [""]
        data["pilot"] = rows
    for case in cases(cfg):
        attack_lines, attack_data = case_tables(cfg, case)
        relearn_lines, relearn_data = relearn_table(cfg, case)
        n = max(attack_data["instances"].values(), default=0)
        extra = {m: k - n for m, k in attack_data["finished"].items() if k > n}
        lines += [f"#### {case.kind} {case.value}: {n} paired instances per method (image seeds {cfg.first_image_seed}, {cfg.first_image_seed + 1}, … "
                  f"of each forget prompt in turn)" + (f"; finished but not yet shared by every method: {', '.join(f'{m} {k}' for m, k in extra.items())}" if extra else ""), "",
                  f"Budget: {cfg.timesteps} timesteps × {cfg.iterations} iterations = {cfg.timesteps * cfg.iterations} optimiser steps and at most "
                  f"{cfg.timesteps} judged images per instance and attack; revision `{data['revision'][:12]}`.", "", *attack_lines, ""]
        if relearn_lines:
            lines += [f"Relearning ({cfg.relearn_images} base-model images, lr {cfg.relearn_learning_rate:g}; UA with Wilson 95 % interval over "
                      f"{cfg.relearn_eval_images} images per prompt):", "", *relearn_lines, ""]
        data["cases"][case_name(case)] = {"attack": attack_data, "relearn": relearn_data}
    text = "\n".join(lines) + "\n"
    write_text(out / "robustness.md", text)
    write_json(out / "robustness.json", data)
    if cfg.results_md:
        path = ROOT / cfg.results_md
        doc = path.read_text()
        if START in doc and END in doc:
            write_text(path, re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}{END}", doc, flags=re.S))


def main(argv: list[str] | None = None) -> None:
    import torch

    torch.set_num_threads(1)  # the toy models are tiny: on a shared CPU, spinning threads cost more than they give
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, RobustnessConfig)
    cfg = config_from_args(parser.parse_args(argv))
    start = time.time()
    deadline = start + 60 * cfg.budget_minutes if cfg.budget_minutes else None
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        if stage in cfg.stages and (deadline is None or time.time() < deadline or stage == "erase"):
            print(f"stage {stage}")
            {"erase": erase_models, "pilot": pilot, "relearn": relearn_all}.get(stage, lambda c: attack_rounds(c, deadline))(cfg)
    write_tables(cfg)
    print(f"done in {time.time() - start:.0f} s; tables in {Path(cfg.output_dir) / 'robustness.md'}")


if __name__ == "__main__":
    main()
