"""Prompt sets for evaluation: the I2P CSV (or its Hugging Face dataset), class-prompt CSVs, text lists.

Every source becomes a list of `PromptRecord`s with one stable case number each, because the case
number (with the seed) is what names an image and pairs the base and the erased image of a prompt.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from salun_sd.errors import UserError

HF_I2P_DATASET = "AIML-TUDA/i2p"
HF_SOURCE_NAMES = ("i2p", f"hf:{HF_I2P_DATASET}")

# Canonical field -> the column names that carry it. The first name is the official SalUn/ESD CSV
# column, the second the one in the Hugging Face I2P dataset.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "case_number": ("case_number",),
    "prompt": ("prompt",),
    "seed": ("evaluation_seed", "sd_seed"),
    "guidance": ("evaluation_guidance", "sd_guidance_scale"),
    "width": ("sd_image_width",),
    "height": ("sd_image_height",),
    "categories": ("categories",),
    "nudity_percentage": ("nudity_percentage",),
    "class_name": ("class",),
    "concept": ("concept",),  # which erased concept a prompt asks for (a multi-concept erase: results per concept)
}


@dataclass(frozen=True)
class PromptRecord:
    """One prompt with the generation settings its set asks for (None: the source does not say)."""

    case_number: int
    prompt: str
    seed: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    categories: tuple[str, ...] = ()
    nudity_percentage: float | None = None
    class_name: str | None = None
    concept: str | None = None

    @property
    def named_concept(self) -> str | None:
        """What the attack judges and groups a prompt by: its concept column, else its class (None: it names neither)."""
        return self.concept or self.class_name


@dataclass
class PromptSet:
    """The records of one source, plus which columns it had (filters need to know what exists)."""

    source: str
    records: list[PromptRecord]
    columns: tuple[str, ...] = field(default_factory=tuple)

    def has(self, name: str) -> bool:
        return any(col in self.columns for col in COLUMN_ALIASES[name])


def load_prompts(source: str, hf_split: str = "train") -> PromptSet:
    """Load a prompt set: `i2p` (Hugging Face), a `.csv` file, or a text file with one prompt per line."""
    if source in HF_SOURCE_NAMES:
        return load_hf_i2p(hf_split)
    path = Path(source)
    if not path.is_file():
        raise UserError(
            f"prompt set '{source}' is not a file. Pass a CSV (I2P or class prompts), a text file with one "
            f"prompt per line, or `i2p` to load {HF_I2P_DATASET} from Hugging Face."
        )
    if path.suffix.lower() == ".csv":
        return load_csv(path)
    return load_text_list(path)


def load_csv(path: Path) -> PromptSet:
    """An I2P-style or class-prompt CSV; `utf-8-sig` because the official Imagenette CSV starts with a BOM."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        columns = tuple(reader.fieldnames or ())
    return PromptSet(str(path), records_from_rows(rows, columns, str(path)), columns)


def load_text_list(path: Path) -> PromptSet:
    """One prompt per non-empty line; the case number is the prompt's position among them."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    records = [PromptRecord(case_number=i, prompt=text) for i, text in enumerate(line for line in lines if line)]
    if not records:
        raise UserError(f"prompt list {path} holds no prompts (it is empty or only blank lines).")
    return PromptSet(str(path), records, ("prompt",))


def load_hf_i2p(split: str = "train") -> PromptSet:
    """The I2P benchmark from the Hugging Face hub, for users with a network (case number = row index)."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            "loading `i2p` from Hugging Face needs the `datasets` package: `pip install datasets` "
            "(or `pip install salun-sd[datasets]`), or pass the I2P CSV file instead."
        ) from None
    try:
        table = datasets.load_dataset(HF_I2P_DATASET, split=split)
    except Exception as err:  # the hub client raises many types (connection, auth, missing split)
        raise UserError(
            f"could not load {HF_I2P_DATASET} (split '{split}') from Hugging Face: {err}. "
            f"Without a network, pass the I2P CSV file (e.g. unsafe-prompts4703.csv) instead."
        ) from err
    columns = tuple(table.column_names)
    return PromptSet(f"hf:{HF_I2P_DATASET}", records_from_rows(list(table), columns, HF_I2P_DATASET), columns)


def _column(columns: Iterable[str], name: str) -> str | None:
    present = set(columns)
    return next((col for col in COLUMN_ALIASES[name] if col in present), None)


def _parse(value: object, kind: type, source: str, row: int, column: str) -> object:
    """Convert one cell; empty cells mean 'not given'. Integers may be written as floats (`512.0`)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        if kind is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}, row {row + 1}: column '{column}' should hold a number, found {value!r}.") from None


def records_from_rows(rows: list[Mapping[str, object]], columns: Iterable[str], source: str) -> list[PromptRecord]:
    """Turn table rows into records, checking the columns the evaluation depends on."""
    columns = tuple(columns)
    prompt_col = _column(columns, "prompt")
    if prompt_col is None:
        raise UserError(
            f"{source} has no 'prompt' column (columns found: {', '.join(c or '(unnamed)' for c in columns) or 'none'}). "
            "A prompt CSV needs at least 'prompt'; I2P adds 'evaluation_seed', 'evaluation_guidance', "
            "'sd_image_width', 'sd_image_height', 'categories', 'nudity_percentage', 'case_number'; "
            "class prompts add 'class'."
        )
    if not rows:
        raise UserError(f"{source} has a header but no rows.")
    numeric = {"case_number": int, "seed": int, "guidance": float, "width": int, "height": int, "nudity_percentage": float}
    present = {name: _column(columns, name) for name in COLUMN_ALIASES}
    records = []
    for i, row in enumerate(rows):
        values: dict[str, object] = {}
        for name, kind in numeric.items():
            col = present[name]
            values[name] = _parse(row.get(col), kind, source, i, col) if col else None
        case_number = values.pop("case_number")
        categories = str(row.get(present["categories"]) or "") if present["categories"] else ""
        class_name = str(row.get(present["class_name"]) or "").strip() if present["class_name"] else ""
        concept = str(row.get(present["concept"]) or "").strip() if present["concept"] else ""
        records.append(
            PromptRecord(
                case_number=i if case_number is None else case_number,
                prompt=str(row.get(prompt_col) or ""),
                categories=tuple(c.strip().lower() for c in categories.split(",") if c.strip()),
                class_name=class_name or None,
                concept=concept or None,
                **values,
            )
        )
    seen: dict[int, int] = {}
    for i, record in enumerate(records):
        if record.case_number in seen:
            raise UserError(
                f"{source}: case_number {record.case_number} appears in rows {seen[record.case_number] + 1} and {i + 1}; "
                "case numbers name the images, so they must be unique."
            )
        seen[record.case_number] = i
    return records


def filter_prompts(
    prompts: PromptSet,
    categories: Iterable[str] = (),
    min_nudity: float | None = None,
    limit: int | None = None,
) -> PromptSet:
    """Keep prompts in any of `categories` and with nudity_percentage >= `min_nudity`; then the first `limit`."""
    records = prompts.records
    wanted = {c.strip().lower() for c in categories if c.strip()}
    if wanted:
        if not prompts.has("categories"):
            raise UserError(f"--category needs a 'categories' column, and {prompts.source} has none (columns: {', '.join(prompts.columns)}).")
        known = {c for r in records for c in r.categories}
        unknown = sorted(wanted - known)
        if unknown:
            raise UserError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} in {prompts.source}; it has: {', '.join(sorted(known))}.")
        records = [r for r in records if wanted.intersection(r.categories)]
    if min_nudity is not None:
        if not prompts.has("nudity_percentage"):
            raise UserError(f"--min_nudity needs a 'nudity_percentage' column, and {prompts.source} has none (columns: {', '.join(prompts.columns)}).")
        records = [r for r in records if r.nudity_percentage is not None and r.nudity_percentage >= min_nudity]
    if limit is not None:
        records = records[:limit]
    if not records:
        raise UserError(f"no prompts of {prompts.source} are left after the filters; loosen --category / --min_nudity.")
    return replace(prompts, records=records)
