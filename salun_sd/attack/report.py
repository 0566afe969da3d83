"""The attack report: pre-ASR and ASR per prompt and in total with counts, the random baseline beside the
attacks, the adversarial prompts, and per prompt the base (reference), plain-prompt and attacked images side by
side (the evaluation report's grids). Every rate is over every prompt of the set."""

from __future__ import annotations

from pathlib import Path

from salun_sd.attack.config import AttackConfig
from salun_sd.config import to_dict
from salun_sd.evaluation.report import GRID_ROWS, rate_text, save_grid
from salun_sd.evaluation.stats import concept_groups, wilson
from salun_sd.run.files import write_json, write_text

LABELS = {"discrete": "ASR, discrete (UnlearnDiffAtk tokens, judged as typed: decoded and re-tokenised)",
          "discrete_ids": "ASR, discrete (the optimised token ids themselves)",
          "embedding": "ASR, embedding (free prefix embeddings, per prompt and seed)",
          "random": "random prefixes, no optimisation (the chance floor)"}


def totals(results: list[dict], names: list[str]) -> dict:
    """Counts, rates and 95 % Wilson intervals over every prompt of the set (a prompt too long for the prefix counts as a
    failure of each attack), and the same per concept when the results name one (evaluation.stats.concept_groups)."""
    out = rates(results, names)
    groups = concept_groups([r.get("concept") for r in results])
    if groups:
        out["per_concept"] = {concept: rates([results[i] for i in positions], names) for concept, positions in groups.items()}
    return out


def rates(results: list[dict], names: list[str]) -> dict:
    n = len(results)
    out = {"prompts": n, "too_long": sum(any("not_run" in e for e in r["attacks"].values()) for r in results),
           "pre_success": sum(r["pre_success"] for r in results)}
    out["pre_asr"] = out["pre_success"] / n if n else None
    out["pre_asr_ci95"] = list(wilson(out["pre_success"], n))
    hits = {name: sum(r["attacks"][name]["success"] for r in results) for name in names}
    if "discrete" in names:
        hits["discrete_ids"] = sum(r["attacks"]["discrete"].get("ids_success", r["attacks"]["discrete"]["success"]) for r in results)
    for name, count in hits.items():
        out[name] = {"success": count, "asr": count / n if n else None, "ci95": list(wilson(count, n))}
    return out


def write_report(cfg: AttackConfig, results: list[dict], names: list[str], judge: str, ref_dir: Path, encoder: str) -> tuple[Path, Path]:
    out = Path(cfg.output_dir)
    summary = totals(results, names)
    json_path, md_path = out / "report.json", out / "report.md"
    write_json(json_path, {"totals": summary, "judge": judge, "text_encoder": encoder, "config": to_dict(cfg), "prompts": results})
    n = summary["prompts"]
    shown = [name for key in names for name in ([key, "discrete_ids"] if key == "discrete" else [key])]
    lines = [f"# Attack on `{cfg.model}`", "", f"Judge: {judge}.", "",
             "| | success, % (count) [95 % Wilson interval] |", "|---|---|", f"| pre-attack (plain prompt) | {rate_text(summary['pre_success'], n)} |"]
    lines += [f"| {LABELS[name]} | {rate_text(summary[name]['success'], n)} |" for name in shown]
    if "per_concept" in summary:
        lines += ["", "Per concept (each prompt's `concept` column, else its `class`), the same rates:", "",
                  "| concept | prompts | pre-attack | " + " | ".join(shown) + " |", "|---" * (len(shown) + 3) + "|"]
        lines += [f"| {c} | {t['prompts']} | {rate_text(t['pre_success'], t['prompts'])} | " + " | ".join(rate_text(t[name]["success"], t["prompts"]) for name in shown) + " |"
                  for c, t in summary["per_concept"].items()]
    lines += ["", f"Attack: {cfg.k} prefix tokens, {cfg.timesteps} timesteps x {cfg.iterations} iterations (stop at the first success); "
              f"random baseline: up to {cfg.random_count()} random {cfg.k}-token prefixes; text encoder: {encoder}; references drawn by `{cfg.base}` with "
              f"{cfg.reference_steps} steps at guidance {cfg.reference_guidance}; judged images {cfg.steps} steps; "
              f"{cfg.scheduler or 'the model folder scheduler'}; weights {cfg.dtype}; attack seed {cfg.attack_seed}. "
              "A prompt whose plain image already shows the concept counts as a success without an attack, as in the official code. "
              f"Every rate is over all {n} prompts."]
    if summary["too_long"]:
        lines.append(f"{summary['too_long']} prompt(s) leave no room for {cfg.k} prefix tokens: judged on the plain prompt (truncated), "
                     f"and each attack counts as a failure on them (listed in {json_path.name}).")
    lines += ["", "| case | prompt | pre | " + " | ".join(names) + " | adversarial prompt (discrete) |", "|---" * (len(names) + 4) + "|"]
    for r in results:
        marks = " | ".join("yes" if r["attacks"][name]["success"] else "no" for name in names)
        adversarial = r["attacks"].get("discrete", {}).get("adversarial_prompt", "")
        lines.append(f"| {r['case_number']} | {_cell(r['prompt'])} | {'yes' if r['pre_success'] else 'no'} | {marks} | {_cell(adversarial)} |")
    lines += ["", "## Images", "", "Columns: the base model (reference), the attacked model on the plain prompt, then after each attack ("
              + ", ".join(names) + "). Same prompt and seed in each row.", ""]
    columns = [ref_dir, out / "images" / "plain", *(out / "images" / name for name in names)]
    (out / "grids").mkdir(exist_ok=True)
    for number, start in enumerate(range(0, len(results), GRID_ROWS)):
        rows = results[start : start + GRID_ROWS]
        grid = Path("grids") / f"attack_{number:03d}.png"
        save_grid(columns, [r["file"] for r in rows], out / grid)
        lines += [f"![cases {', '.join(str(r['case_number']) for r in rows)}]({grid.as_posix()})", ""]
    lines.append(f"Every number, with loss traces and token ids, is in [{json_path.name}]({json_path.name}).")
    write_text(md_path, "\n".join(lines) + "\n")
    return json_path, md_path


def _cell(text: str, width: int = 100) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text[:width] + "..." if len(text) > width else text
