"""One writer per run folder: a lock that a command's main process holds for the command's whole life.

The lock is filelock's flock on `OUTPUT_DIR/.salun-sd.lock`. The kernel releases a flock when its
holder dies, however it dies, so a crashed run never blocks the next one; but a flock says nothing
about who holds it, and on some network file systems (`local_lock=flock` NFS mounts, Lustre's
localflock) it only excludes processes of the same host. So the holder also writes a record next to
it (pid, host, start time, command line): a refused run names the holder, a record left by a crashed
run of this host is taken over with a message, and a record from another host is never taken over,
since this host cannot tell whether that run still writes.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from salun_sd.errors import UserError
from salun_sd.run.files import write_json

LOCK_FILE, HOLDER_FILE = ".salun-sd.lock", ".salun-sd.lock.json"


def read_holder(record: Path) -> dict | None:
    """The holder record, or None if there is none (never written, or a run that ended cleanly) or it is unreadable
    (records are replaced atomically, so only a hand-edited one can be)."""
    try:
        holder = json.loads(record.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) and {"pid", "host", "started", "command"} <= holder.keys() else None


def describe(holder: dict | None) -> str:
    if holder is None:
        return "another run (its holder record is not written yet, or unreadable)"
    return f"pid {holder['pid']} on host {holder['host']} since {holder['started']} ({holder['command']})"


@contextmanager
def run_lock(folder: str | Path, main_process: bool = True) -> Iterator[None]:
    """Hold `folder` for the duration of the block, or fail at once with a UserError naming the holder.

    Only the main process of a multi-process run locks (pass main_process=False on the others): the
    processes of one run are one writer, and when the main process fails here, the launcher stops the rest.
    """
    if not main_process:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock, record = FileLock(folder / LOCK_FILE), folder / HOLDER_FILE
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise UserError(f"{folder} is in use by {describe(read_holder(record))}: wait for that run to end, or stop it") from None
    try:
        claim(record, folder)
        try:
            yield
        finally:
            record.unlink(missing_ok=True)
    finally:
        lock.release()


def claim(record: Path, folder: Path) -> None:
    """With the flock held: take over a record that a crashed run of this host left, refuse another host's, write ours."""
    host = socket.gethostname()
    left = read_holder(record)
    if left is not None and left["host"] != host:
        raise UserError(
            f"{record} says {folder} is held by {describe(left)}; this host ({host}) cannot see whether that run is alive: "
            f"if it has ended, delete {record} and start again"
        )
    if left is not None:  # the flock was free, so that process is gone
        print(f"{folder}: taking over the lock of a run that ended without releasing it: {describe(left)}", file=sys.stderr)
    holder = {
        "pid": os.getpid(),
        "host": host,
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": shlex.join(["salun-sd", *sys.argv[1:]]),
    }
    write_json(record, holder)
