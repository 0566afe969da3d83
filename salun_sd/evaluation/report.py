"""The evaluation report: every number in JSON, and a Markdown page a person can read.

The page puts the sets side by side (base vs erased, with the change) and shows image grids of
the same prompt and seed before and after, saved as PNG next to it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from diffusers.utils import make_image_grid
from PIL import Image, ImageOps

from salun_sd.evaluation.imagefiles import load_rgb, read_metadata
from salun_sd.evaluation.nudity import DETECTORS, NUDENET_MIN_SCORE
from salun_sd.evaluation.stats import NO_CONCEPT, wilson
from salun_sd.run.files import save_image, write_json, write_text

GRID_ROWS = 8
THUMBNAIL = 256

Row = tuple[str, Callable[[dict], float | None], str]


def _get(*keys: str) -> Callable[[dict], float | None]:
    def read(metrics: dict) -> float | None:
        value = metrics
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    return read


def summary_rows(results: dict) -> list[Row]:
    """(label, getter, format) for each headline number; labels carry the settings that define it."""
    s = results["settings"]
    first = results["sets"][0]["metrics"]
    rows: list[Row] = []
    if "nudenet" in first:
        t = s["nudenet_threshold"]
        rows.append((f"NudeNet nudity rate, % of images (threshold {t})", lambda m: _pct(_get("nudenet", "nudity_rate")(m)), "{:.2f}"))
        rows.append((f"NudeNet exposed parts, total (threshold {t})", _get("nudenet", "total_exposed"), "{:d}"))
        rows += [(f"  {name}", _get("nudenet", "counts", name), "{:d}") for name in s["nudenet_classes"]]
    if "clip" in first:
        rows.append((f"CLIP score ({first['clip']['model']}, {first['clip']['scale']})", _get("clip", "mean"), "{:.2f}"))
    if "fid" in first:
        rows.append((f"FID vs {s['reference']} ({first['fid']['extractor']})", _get("fid", "fid"), "{:.2f}"))
    if "ua" in first:
        rows.append((f"UA, % (forgotten class: {', '.join(s['forget_class'])})", lambda m: _pct(_get("ua", "ua")(m)), "{:.2f}"))
        if len(s["forget_class"]) > 1:  # several erased concepts: each one's UA
            rows += [(f"  UA, % ({name})", lambda m, name=name: _pct(_get("ua", "per_concept", name, "ua")(m)), "{:.2f}") for name in s["forget_class"]]
        rows.append(("Accuracy on remaining classes (erased by none), %", lambda m: _pct(_get("ua", "remaining_accuracy")(m)), "{:.2f}"))
    return rows


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _fmt(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def metric_table(results: dict) -> str:
    """Markdown table: one row per number, one column per set, and the change when there are two sets."""
    sets = results["sets"]
    header = ["metric", *(f"{s['label']} ({s['images']} images)" for s in sets)]
    if len(sets) == 2:
        header.append(f"change ({sets[1]['label']} - {sets[0]['label']})")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, get, fmt in summary_rows(results):
        values = [get(s["metrics"]) for s in sets]
        cells = [label, *(_fmt(v, fmt) for v in values)]
        if len(sets) == 2:
            both = None not in values
            cells.append(_fmt(values[1] - values[0], "{:+.2f}" if "f" in fmt else "{:+d}") if both else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rate_text(successes: int, n: int) -> str:
    """A rate as a reader checks it, the one format of evaluate's and attack's reports: percent, count, 95 % Wilson interval."""
    if not n:
        return "n/a"
    low, high = wilson(successes, n)
    return f"{100 * successes / n:.2f} % ({successes}/{n}) [{100 * low:.2f}, {100 * high:.2f}]"


CONCEPT_COLUMNS = {
    "nudenet": ("NudeNet nudity rate, % (flagged/images) [95 % Wilson interval]", lambda g: f"{rate_text(g['images_with_exposed'], g['images'])}, {g['total_exposed']} parts"),
    "clip": ("CLIP score", lambda g: f"{_fmt(g['mean'], '{:.2f}')} (sd {_fmt(g['std'], '{:.2f}')}, {g['images']} images)"),
}


def concept_table(results: dict) -> str:
    """Markdown table of the numbers per concept the prompts name, and of the prompts naming none (remaining quality),
    one column per metric and set; "" when no set's metadata names a concept."""
    sets = results["sets"]
    groups_of = {(m, i): s["metrics"].get(m, {}).get("per_concept", {}) for m in CONCEPT_COLUMNS for i, s in enumerate(sets)}
    metrics = [m for m in CONCEPT_COLUMNS if any(groups_of[m, i] for i in range(len(sets)))]
    if not metrics:
        return ""
    groups = sorted(dict.fromkeys(g for groups in groups_of.values() for g in groups), key=lambda g: g == NO_CONCEPT)  # none last
    header = ["prompts naming", *(f"{CONCEPT_COLUMNS[m][0]}: {s['label']}" for m in metrics for s in sets)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        cells = ["none of the erased concepts (remaining quality)" if group == NO_CONCEPT else group]
        cells += [CONCEPT_COLUMNS[m][1](groups_of[m, i][group]) if group in groups_of[m, i] else "n/a" for m in metrics for i in range(len(sets))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_grid(folders: list[Path], names: list[str], path: Path) -> None:
    """One row per image name, one column per folder, each tile fitted (up or down, aspect kept) into THUMBNAIL px."""
    tiles = [ImageOps.pad(load_rgb(folder / name), (THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS, color="white") for name in names for folder in folders]
    save_image(make_image_grid(tiles, rows=len(names), cols=len(folders)), path)


def grid_section(results: dict, out: Path, max_pairs: int) -> str:
    """Before/after grids of the first `max_pairs` images that share case number and seed."""
    sets, pairs = results["sets"], results["pairs"][:max_pairs]
    if len(sets) != 2 or max_pairs <= 0:
        return ""
    if not pairs:
        return (
            "## Before / after\n\nNo image names are shared by the two folders, so there is no same-prompt, "
            "same-seed pair to show. Generate both from the same prompt set and seeds.\n"
        )
    folders = [Path(s["folder"]) for s in sets]
    metadata = read_metadata(folders[0])
    (out / "grids").mkdir(parents=True, exist_ok=True)
    parts = [f"## Before / after\n\nLeft: {sets[0]['label']}; right: {sets[1]['label']}. Same prompt and seed in each row.\n"]
    for number, start in enumerate(range(0, len(pairs), GRID_ROWS)):
        names = pairs[start : start + GRID_ROWS]
        grid = Path("grids") / f"pairs_{number:03d}.png"
        save_grid(folders, names, out / grid)
        parts.append(f"![{sets[0]['label']} vs {sets[1]['label']}]({grid.as_posix()})\n")
        parts.append("| row | file | prompt |\n|---|---|---|")
        for row, name in enumerate(names, start=1):
            prompt = metadata.get(name, {}).get("prompt", "")
            prompt = (prompt[:120] + "...") if len(prompt) > 120 else prompt
            parts.append(f"| {row} | {name} | {prompt.replace('|', '/')} |")
        parts.append("")
    return "\n".join(parts)


def settings_section(results: dict) -> str:
    s = results["settings"]
    lines = ["## Settings\n", f"- Protocol: {s['protocol_description']}."]
    if s["nudenet_threshold"] is not None:
        floor = f" (below {NUDENET_MIN_SCORE}: every detection NudeNet reports, as it drops lower scores itself)" if s["nudenet_threshold"] < NUDENET_MIN_SCORE else ""
        lines.append(
            f"- NudeNet (the detector shipped in the `nudenet` package): a part counts when its score is above {s['nudenet_threshold']}{floor}; "
            f"nudity rate = share of images with at least one of: {', '.join(s['nudenet_classes'])}.\n"
            f"- NudeNet input `{s['nudenet_detector']}`: {DETECTORS[s['nudenet_detector']]}."
        )
    for item in results["sets"]:
        made = "; ".join(f"{k} {'/'.join(str(v) for v in values)}" for k, values in item.get("generation", {}).items() if values != [None])
        lines.append(f"- {item['label']}: `{item['folder']}`, {item['images']} images" + (f", generated with {made}." if made else "."))
    return "\n".join(lines) + "\n"


def write_report(results: dict, out: str | Path, max_pairs: int = GRID_ROWS) -> tuple[Path, Path]:
    """Write report.json and report.md (with grids/) into `out`; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    write_json(json_path, results)
    title = " vs ".join(s["label"] for s in results["sets"])
    body = [f"# Concept-erasure evaluation: {title}\n", metric_table(results), ""]
    per_concept = concept_table(results)
    if per_concept:
        body += ["## Per concept\n", "Each row: the images of the prompts whose `concept` column names that concept; the row of none: "
                 "the prompts naming no erased concept, what the erase should leave as it was.\n", per_concept, ""]
    body.append(settings_section(results))
    grids = grid_section(results, out, max_pairs)
    if grids:
        body.append(grids)
    body.append(f"Every number, with per-image results, is in [{json_path.name}]({json_path.name}).\n")
    write_text(md_path, "\n".join(body))
    return json_path, md_path
