"""Issue 16: one writer per run folder, and workers that stop when their launcher dies."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import replace

import psutil
import pytest
import torch
from accelerate import Accelerator

from conftest import exported_unet, forked, salun
from salun_sd.cli import main
from salun_sd.config import load_yaml
from salun_sd.errors import UserError
from salun_sd.run.lock import HOLDER_FILE, run_lock
from salun_sd.run.runtime import PAUSE_ENV
from salun_sd.families.config import EraseConfig
from salun_sd.families.erase import erase


def gone(pid: int) -> bool:
    """Ended (a zombie counts: it runs no code; its new parent has yet to reap it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for_pauses(proc: subprocess.Popen, count: int) -> list[int]:
    """Read the launcher's stderr until `count` processes say they paused; their pids."""
    pids, seen = [], []
    while len(pids) < count:
        line = proc.stderr.readline()
        assert line, f"the run ended before pausing:\n{''.join(seen)[-3000:]}"
        seen.append(line)
        pids += [int(p) for p in re.findall(r"paused after step \d+ \(pid (\d+)\)", line)]
    return pids


def test_killed_launcher_leaves_no_worker_a_second_writer_is_refused_and_resume_is_bitwise_exact(two_process_erase, capsys):
    straight, args = two_process_erase  # 4 steps, checkpoints every 2
    run = straight.parent / "killed"
    launcher = salun("erase", *args, "--output_dir", str(run), processes=2, env={PAUSE_ENV: "3"},
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        workers = wait_for_pauses(launcher, 2)  # both after step 3: checkpoint 2 is the last complete one
        checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
        with pytest.raises(SystemExit) as second:  # the second writer: this process
            main(["erase", *args, "--output_dir", str(run), "--unlearn.resume_from_checkpoint", "latest"])
        refusal = capsys.readouterr().err
        holder = re.search(r"is in use by pid (\d+) on host \S+ since .* \(salun-sd erase .*\)", refusal)
        assert second.value.code == 2 and holder and int(holder[1]) in workers, refusal[-2000:]
        assert not any(gone(pid) for pid in workers) and sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 60
    while not all(gone(pid) for pid in workers):
        assert time.monotonic() < deadline, "workers outlived their launcher"
        time.sleep(0.1)
    assert checkpoints == ["checkpoint-00000002"] and not (run / "pipeline").exists()

    with pytest.raises(UserError, match="resume_from_checkpoint latest"):  # checkpoints are not thrown away unasked
        erase(replace(load_yaml(EraseConfig, args[0]), output_dir=str(run)), Accelerator(cpu=True), ("erase",))
    log = forked(main, "erase", *args, "--output_dir", str(run), "--unlearn.resume_from_checkpoint", "latest")
    assert f"taking over the lock of a run that ended without releasing it: pid {holder[1]}" in log
    assert f"resumed from {run / 'checkpoints' / 'checkpoint-00000002'} at step 2" in log
    expected, again = exported_unet(straight), exported_unet(run)
    for k in expected:
        assert torch.equal(expected[k], again[k]), k
    assert not (run / HOLDER_FILE).exists()


def test_a_record_from_another_host_is_never_taken_over(tmp_path):
    record = tmp_path / HOLDER_FILE
    theirs = {"pid": os.getpid(), "host": socket.gethostname() + "-elsewhere", "started": "2026-01-01 00:00:00 UTC", "command": "salun-sd run x.yaml"}
    record.write_text(json.dumps(theirs))
    with pytest.raises(UserError, match=f"cannot see whether that run is alive: if it has ended, delete {re.escape(str(record))}"):
        with run_lock(tmp_path):
            pass
    assert json.loads(record.read_text()) == theirs


def test_the_lock_is_held_for_the_block_and_released_after_it(tmp_path, capfd):
    with run_lock(tmp_path):
        held = json.loads((tmp_path / HOLDER_FILE).read_text())
        other = subprocess.run([sys.executable, "-c", f"from salun_sd.run.lock import run_lock\nwith run_lock({str(tmp_path)!r}): pass"],
                               capture_output=True, text=True)
        assert other.returncode != 0 and f"is in use by pid {os.getpid()} on host {socket.gethostname()}" in other.stderr
    assert held["pid"] == os.getpid() and held["command"].startswith("salun-sd")
    assert not (tmp_path / HOLDER_FILE).exists()
    with run_lock(tmp_path):  # free again
        pass
    assert "taking over" not in capfd.readouterr().err
