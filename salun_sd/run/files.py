"""Every file and folder the toolkit writes appears in one step, whole or not at all.

It is written under a hidden temporary name beside its final one (`.NAME.PID.tmp`), then renamed into
place (`os.replace` is atomic within a filesystem), so a killed run never leaves half a file under the
final name, where a restart would take it for a finished one. Temporary names end in `.tmp`, so image
listings and checkpoint listings never see them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image


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


@contextmanager
def atomic(path: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write `path` (a file, or a folder the writer creates) to; on success it
    replaces `path`, on an error it is deleted and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging(path)
    remove(tmp)
    try:
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
