"""The attack report: pre-ASR and ASR per prompt and in total with counts, the adversarial prompts, and per
prompt the base (reference), plain-prompt and attacked images side by side (the evaluation report's grids)."""

from __future__ import annotations

import json
from pathlib import Path

from salun_sd.attack.config import AttackConfig
from salun_sd.config import to_dict
from salun_sd.evaluation.report import GRID_ROWS, save_grid

LABELS = {"discrete": "ASR, discrete (UnlearnDiffAtk tokens)", "embedding": "ASR, embedding (free prefix embeddings)"}


def totals(results: list[dict], names: list[str]) -> dict:
    """Counts and rates over the prompts that were attacked (long prompts that were skipped are listed apart)."""
    done = [r for r in results if "skipped" not in r]
    n = len(done)
    out = {"prompts": n, "skipped": len(results) - n, "pre_success": sum(r["pre_success"] for r in done)}
    out["pre_asr"] = out["pre_success"] / n if n else None
    for name in names:
        hits = sum(r["attacks"][name]["success"] for r in done)
        out[name] = {"success": hits, "asr": hits / n if n else None}
    return out


def _pct(count: int, n: int) -> str:
    return f"{100 * count / n:.2f} % ({count}/{n})" if n else "n/a"


def write_report(cfg: AttackConfig, results: list[dict], names: list[str], judge: str, ref_dir: Path) -> tuple[Path, Path]:
    out = Path(cfg.output_dir)
    summary = totals(results, names)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps({"totals": summary, "judge": judge, "config": to_dict(cfg), "prompts": results}, indent=2, ensure_ascii=False), encoding="utf-8")
    n = summary["prompts"]
    lines = [f"# Attack on `{cfg.model}`", "", f"Judge: {judge}.", "",
             "| | success |", "|---|---|", f"| pre-attack (plain prompt) | {_pct(summary['pre_success'], n)} |"]
    lines += [f"| {LABELS[name]} | {_pct(summary[name]['success'], n)} |" for name in names]
    lines += ["", f"Attack: {cfg.k} prefix tokens, {cfg.timesteps} timesteps x {cfg.iterations} iterations (stop at the first success), "
              f"text encoder and references from `{cfg.base}`, {cfg.steps} steps of {cfg.scheduler or 'the model folder scheduler'} per image, attack seed {cfg.attack_seed}. "
              "A prompt whose plain image already shows the concept counts as a success without an attack, as in the official code."]
    if summary["skipped"]:
        lines.append(f"{summary['skipped']} prompt(s) were too long for the prefix and are left out of the rates (listed in {json_path.name}).")
    lines += ["", "| case | prompt | pre | " + " | ".join(names) + " | adversarial prompt (discrete) |", "|---" * (len(names) + 4) + "|"]
    done = [r for r in results if "skipped" not in r]
    for r in done:
        marks = " | ".join("yes" if r["attacks"][name]["success"] else "no" for name in names)
        adversarial = r["attacks"].get("discrete", {}).get("adversarial_prompt", "")
        lines.append(f"| {r['case_number']} | {_cell(r['prompt'])} | {'yes' if r['pre_success'] else 'no'} | {marks} | {_cell(adversarial)} |")
    lines += ["", "## Images", "", "Columns: the base model (reference), the attacked model on the plain prompt, then after each attack ("
              + ", ".join(names) + "). Same prompt and seed in each row.", ""]
    columns = [ref_dir, out / "images" / "plain", *(out / "images" / name for name in names)]
    (out / "grids").mkdir(exist_ok=True)
    for number, start in enumerate(range(0, len(done), GRID_ROWS)):
        rows = done[start : start + GRID_ROWS]
        grid = Path("grids") / f"attack_{number:03d}.png"
        save_grid(columns, [r["file"] for r in rows], out / grid)
        lines += [f"![cases {', '.join(str(r['case_number']) for r in rows)}]({grid.as_posix()})", ""]
    lines.append(f"Every number, with loss traces and token ids, is in [{json_path.name}]({json_path.name}).")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return json_path, md_path


def _cell(text: str, width: int = 100) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text[:width] + "..." if len(text) > width else text
