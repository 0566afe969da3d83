"""The run folder's rules, once for every command: what a run may do to OUTPUT_DIR before, during and after it.

Opening (open_folder), before any work: OUTPUT_DIR must be a folder this process can write (or make); the
command then holds its lock (salun_sd.run.lock), removes the temporaries that processes of earlier runs left
(files.STAGED names: a killed export's `.pipeline.PID.tmp`, a killed `generate`'s `.IMAGE.png.PID.tmp`, a
checkpoint's staging folder), and refuses a folder whose manifest.json says another command's run is there,
unless told to (--overwrite).

Replacing (claim): a run that writes files an earlier run left (its export, mask, checkpoints, log, manifest)
moves them aside into OUTPUT_DIR/.salun-sd.earlier/ when it starts (renames, no copies) and deletes them only
once it has completed. A run that fails — a bad input found only once the model is loaded, a full disk, a
crash in the library — removes what it wrote under those names and puts the earlier files back: the folder is
as it was before the run. Moving aside rather than writing the new run elsewhere and renaming it into place
at the end, because a run reads its own files back under their final names (a resume its checkpoints and log,
the erase step its mask).

A run that cannot clean up — killed, stopped with Ctrl-C, or diverged (which keeps its checkpoint to resume
from) — leaves the earlier files aside; the next run that claims the folder puts them back and removes the
interrupted run's files, unless it resumes the interrupted run: that run then completes it (and deletes the
earlier files) or fails (and puts them back). A run into a folder that holds none of the files it writes sets
nothing aside: whatever stops it, what it wrote stays, to be resumed (or replaced with --overwrite).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from salun_sd.errors import UserError
from salun_sd.run.files import STAGED, remove, write_json
from salun_sd.run.lock import run_lock

if TYPE_CHECKING:
    from accelerate import Accelerator

ASIDE = ".salun-sd.earlier"  # the earlier run's files while a run replaces them
RECORD = ".claim.json"  # in ASIDE: the names the replacing run claimed, and whether all were moved aside
MANIFEST = "manifest.json"
ERASE_STEPS = {"mask", "erase", "mask+erase"}  # the commands of one erase run folder (their manifest's command)
STALE_DEPTH = 3  # temporaries are written at most this deep (OUT/target/checkpoints/.checkpoint-N.tmp)


def check_output_dir(folder: Path) -> None:
    """One line, before any work, when `folder` is a file, lies under a file, or cannot be written."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"cannot be made: {existing} is a file"
        raise UserError(f"output folder {folder} {where}: choose another --output_dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".salun-sd-probe.", suffix=".tmp"):
            pass
    except OSError as err:
        raise UserError(f"output folder {folder} cannot be written ({err.strerror}): choose another --output_dir, or make it writable") from None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(folder: Path) -> list[Path]:
    """Remove the temporaries under `folder` whose process is gone (named by pid) or that a shared write left (no pid).

    Called with the lock held, before this run writes: no other run writes here, and the workers of this one,
    which may already be writing, are alive. Hidden folders that are not temporaries (.git, .venv) are not entered."""
    stale: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        for entry in d.iterdir():
            found = STAGED.fullmatch(entry.name)
            if found and not (found["pid"] and alive(int(found["pid"]))):
                stale.append(entry)
            elif entry.is_dir() and not entry.is_symlink() and not entry.name.startswith(".") and depth < STALE_DEPTH:
                walk(entry, depth + 1)

    walk(folder, 1)
    for entry in stale:
        remove(entry)
    if stale:
        print(f"{folder}: removed {len(stale)} temporary file(s) left by earlier runs: {', '.join(str(p.relative_to(folder)) for p in stale)}", file=sys.stderr)
    return stale


def run_of(folder: Path) -> str | None:
    """The command whose run `folder` holds, from its manifest.json (None: none, or unreadable)."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def same_kind(a: str, b: str) -> bool:
    return a == b or {a, b} <= ERASE_STEPS


@contextmanager
def open_folder(folder: str | Path, command: str | None, overwrite: bool, main_process: bool = True) -> Iterator[Path]:
    """Hold `folder` for a command: checked writable, locked, cleaned of stale temporaries, and refused when
    its manifest names another command's run (unless overwrite). `command`: what this run writes as its
    manifest's command (None: it writes no manifest.json, so it replaces no other run's)."""
    folder = Path(folder)
    check_output_dir(folder)
    with run_lock(folder, main_process):
        if main_process:
            remove_stale(folder)
            there = run_of(folder)
            if command is not None and there is not None and not same_kind(there, command) and not overwrite:
                raise UserError(f"{folder} holds a `salun-sd {there}` run (its {MANIFEST}): choose another --output_dir, or pass --overwrite to write this `{command}` run into it")
        yield folder


def matches(folder: Path, names: list[str]) -> list[Path]:
    """The entries of `folder` that the glob patterns `names` match (never the aside folder or the lock's files)."""
    found = {p for name in names for p in folder.glob(name)}
    return sorted(p for p in found if not p.name.startswith(".salun-sd"))


def read_record(aside: Path) -> dict:
    try:
        return json.loads((aside / RECORD).read_text())
    except (OSError, ValueError):
        return {"names": [], "moved": False}  # killed before the record was written: nothing was moved yet


def restore(folder: Path) -> None:
    """Put the earlier run's files back: first remove the replacing run's files under the claimed names (only once all
    were moved aside: before that, those names still hold the earlier files), then move the earlier ones back."""
    aside = folder / ASIDE
    record = read_record(aside)
    if record["moved"]:
        for entry in matches(folder, record["names"]):
            remove(entry)
        write_json(aside / RECORD, {**record, "moved": False})  # a restore killed from here on moves the rest back
    for entry in aside.iterdir():
        if entry.name != RECORD:
            entry.replace(folder / entry.name)
    remove(aside)


def set_aside(folder: Path, names: list[str], command: str) -> None:
    """Move the files under `names` aside. With an aside already there (a resumed run continues the interrupted
    one), the names it claimed hold the interrupted run's files, which stay; only newly claimed ones move."""
    aside = folder / ASIDE
    record = read_record(aside) if aside.exists() else {"names": [], "moved": False}
    before = set(matches(folder, record["names"])) if record["moved"] else set()
    moving = [entry for entry in matches(folder, names) if entry not in before]
    if not moving and not aside.exists():
        return  # no earlier run: nothing to restore, and what this run writes stays even if it fails (to be resumed)
    aside.mkdir(parents=True, exist_ok=True)
    write_json(aside / RECORD, {"names": sorted(set(record["names"]) | set(names)), "command": command, "pid": os.getpid(), "moved": False})
    for entry in moving:
        entry.replace(aside / entry.name)
    write_json(aside / RECORD, {**read_record(aside), "moved": True})


def commit(folder: Path) -> None:
    """Delete the earlier files: renamed to a temporary name first, so a delete cut short leaves a stale temporary, not a half aside."""
    aside = folder / ASIDE
    if aside.exists():
        doomed = folder / f"{ASIDE}.{os.getpid()}.tmp"
        aside.replace(doomed)
        remove(doomed)


def resumable(err: BaseException) -> bool:
    """A stop the run can be resumed from (Ctrl-C; a divergence, which keeps its checkpoint): its files stay for the resume."""
    return isinstance(err, KeyboardInterrupt) or getattr(err, "resumable", False)


@contextmanager
def claim(folder: Path, writes: list[str], blocking: Callable[[], list[Path]], overwrite: bool, resuming: bool,
          accelerator: Accelerator, command: str, resume_flag: str) -> Iterator[Path]:
    """Run the block as a run that replaces the files `writes` (glob patterns in `folder`) of an earlier run.

    `blocking()`: the files that need --overwrite to be replaced (an export, a mask, a checkpoint to resume).
    `resuming`: this run continues an interrupted one (resume_from_checkpoint), so it keeps that run's files.
    Every process enters; the main one moves files."""
    main, aside = accelerator.is_main_process, folder / ASIDE
    if main and aside.exists() and not resuming:
        record = read_record(aside)
        restore(folder)
        print(f"{folder}: a `salun-sd {record.get('command', '?')}` run (pid {record.get('pid', '?')}) ended before it finished; "
              "its files are removed and the files of the run before it are back", file=sys.stderr)
    accelerator.wait_for_everyone()
    existing = [p for p in blocking() if p.exists()]
    if existing and not overwrite:
        hint = f"; or --{resume_flag}.resume_from_checkpoint latest to continue the interrupted run" if "checkpoints" in existing[0].parts else ""
        raise UserError(f"{existing[0]} already exists: pass --overwrite to replace it{hint}")
    accelerator.wait_for_everyone()
    if main:
        set_aside(folder, writes, command)
    accelerator.wait_for_everyone()
    try:
        yield folder
    except BaseException as err:
        if not (main and aside.exists()):
            raise
        if resumable(err):
            print(f"{folder}: the files of the run before this one are in {aside}: the next run here puts them back, "
                  "unless it resumes this one", file=sys.stderr)
        else:
            restore(folder)
        raise
    if main:
        commit(folder)
