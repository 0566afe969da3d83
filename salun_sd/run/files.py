"""Every file and folder the toolkit writes appears in one step, whole or not at all.

It is written under a hidden temporary name beside its final one (`.NAME.PID.tmp`), then renamed into
place (`os.replace` is atomic within a filesystem), so a killed run never leaves half a file under the
final name, where a restart would take it for a finished one. Temporary names end in `.tmp`, so image
listings and checkpoint listings never see them, and say whose they are (STAGED), so the next run that
holds the folder removes those a killed process left (salun_sd.run.folder.remove_stale).

A write that fails because the disk (or the quota) is full raises a UserError saying where and about how
much was needed, whichever layer noticed: Python (OSError ENOSPC), safetensors (its Rust "os error 28")
or torch's zip writer ("unexpected pos", which keeps no errno).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from salun_sd.errors import UserError

# The temporary names of staging() and publish(): .NAME.tmp (shared), .NAME.PID.tmp, .NAME.PID.old.tmp.
STAGED = re.compile(r"\.(?P<name>.+?)(?:\.(?P<pid>\d+))?(?:\.old)?\.tmp")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122", "unexpected pos")


def staging(path: str | Path, shared: bool = False) -> Path:
    """The temporary name of `path`: one per process, or one for all (`shared`) when every process writes into it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp" if shared else f".{path.name}.{os.getpid()}.tmp")


def remove(path: Path) -> None:
    """Delete a file or folder if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(tmp: str | Path, path: str | Path) -> Path:
    """Rename a finished `tmp` to `path`, replacing what is there. A folder cannot be replaced by one rename:
    the old one is renamed aside first and deleted after, so `path` is never a mix of the two."""
    tmp, path = Path(tmp), Path(path)
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.{os.getpid()}.old.tmp")
        remove(old)
        path.replace(old)
        tmp.replace(path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def disk_full(err: BaseException) -> bool:
    """Whether `err` says the disk or the quota is full, in the words of any layer that writes."""
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return True
    return not isinstance(err, UserError) and any(text in str(err) for text in DISK_FULL_TEXTS)


def nbytes(*states: Any) -> int:
    """The bytes of every tensor in `states` (modules, optimizers, state dicts, nested dicts and lists): about what saving them writes."""
    total = 0
    for state in states:
        if hasattr(state, "state_dict"):
            state = state.state_dict()
        if isinstance(state, dict):
            total += nbytes(*state.values())
        elif isinstance(state, (list, tuple)):
            total += nbytes(*state)
        elif hasattr(state, "element_size"):
            total += state.numel() * state.element_size()
    return total


def size_on_disk(path: Path) -> int:
    """The bytes of a file, or of every file under a folder (0 if it is not there)."""
    if path.is_dir() and not path.is_symlink():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.stat().st_size if path.is_file() else 0


def megabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@contextmanager
def space_for(path: Path, need: Callable[[], int], written: Path | None = None) -> Iterator[None]:
    """Turn a full disk while writing `path` into one line: where, about how much was needed (`need()`, or at least
    what `written` had reached) and how much is free. The caller removes what it half wrote."""
    try:
        yield
    except Exception as err:
        if not disk_full(err):
            raise
        needed = max(need(), size_on_disk(written) if written is not None else 0)
        where = next(p for p in (path, *path.parents) if p.exists())
        free = shutil.disk_usage(where).free
        raise UserError(
            f"no space left on the device of {path.parent} while writing {path.name} (it needs about {megabytes(needed)}, "
            f"{megabytes(free)} are free): free some space or choose another folder, and run again"
        ) from None


@contextmanager
def atomic(path: str | Path, need: Callable[[], int] = lambda: 0) -> Iterator[Path]:
    """Yield the temporary path to write `path` (a file, or a folder the writer creates) to; on success it
    replaces `path`, on an error it is deleted and `path` is left as it was. `need`: about the bytes it takes
    (for the message of a full disk; without it, the message says what the temporary had reached)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging(path)
    remove(tmp)
    try:
        with space_for(path, need, tmp):
            yield tmp
            publish(tmp, path)
    finally:
        remove(tmp)


def write_text(path: str | Path, text: str) -> Path:
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Indented UTF-8 JSON; values JSON cannot hold (paths, dtypes) are written as their str()."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str))


def save_image(image: Image.Image, path: str | Path) -> Path:
    """An image in the format its suffix names (the temporary name's suffix names none)."""
    path = Path(path)
    with atomic(path) as tmp:
        image.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
    return path


def write_section(path: str | Path, begin: str, end: str, section: str) -> Path:
    """Replace the part of a Markdown file from marker `begin` to marker `end` (both in `section`) by `section`, or
    append it; the rest of the file is kept (a script's results table in docs/RESULTS.md)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else "# Results\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
    return write_text(path, text)
