"""Issue 23: nothing lost, nothing stale. A run that fails, however late, leaves the earlier run in its folder as it
was (a full disk at a checkpoint or at the export, a kill during the export); the temporaries a killed process
left are removed by the next run; an output folder that cannot be written, or holds another command's run,
fails in one line before any work."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import StableDiffusionPipeline
from safetensors import SafetensorError

from conftest import exported_unet, fork, tiny_config
from salun_sd.cli import main
from salun_sd.errors import UserError
from salun_sd.families.erase import erase
from salun_sd.run.files import STAGED
from salun_sd.run.folder import ASIDE, claim, open_folder
from salun_sd.run.runtime import PAUSE_ENV


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (the lock's own files aside) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".salun-sd.lock")}


def leftovers(folder: Path) -> list[str]:
    """Temporaries and set-aside files anywhere under `folder`: none may outlive the run that made them."""
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if STAGED.fullmatch(p.name) or p.name == ASIDE]


def cli_error(capsys, *argv: str) -> list[str]:
    """The stderr lines of `salun-sd ARGV` run in this process, which must fail; the last is its one-line error."""
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err, err
    return err


# --- the transaction, on plain files --------------------------------------------------------------------------


@pytest.fixture
def earlier(tmp_path) -> Path:
    out = tmp_path / "run"
    for name, text in {"manifest.json": "earlier manifest", "pipeline/unet/weights": "earlier weights", "checkpoints/checkpoint-00000002/x": "ckpt", "log.jsonl": "log"}.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return out


def replacing(out: Path, resuming: bool = False, **kw):
    names = ["manifest.json", "pipeline", *([] if resuming else ["checkpoints", "log.jsonl"])]
    return claim(out, names, lambda: [out / "pipeline"], True, resuming, Accelerator(cpu=True), "erase", "unlearn", **kw)


def new_run_files(out: Path) -> None:
    (out / "pipeline").mkdir()
    (out / "pipeline" / "half").write_text("new")
    (out / "manifest.json").write_text("new manifest")
    (out / "checkpoints").mkdir(exist_ok=True)


def test_a_failed_run_leaves_the_earlier_one_a_completed_run_replaces_it(earlier):
    before = snapshot(earlier)
    with pytest.raises(RuntimeError, match="late failure"), replacing(earlier):
        assert not (earlier / "pipeline").exists() and not (earlier / "checkpoints").exists()  # its checkpoints are not mixed with the new run's
        new_run_files(earlier)
        raise RuntimeError("late failure")
    assert snapshot(earlier) == before and leftovers(earlier) == []
    with replacing(earlier):
        new_run_files(earlier)
    assert snapshot(earlier) == {"manifest.json": b"new manifest", "pipeline/half": b"new"} and leftovers(earlier) == []


def test_an_interrupted_run_is_undone_by_the_next_run_unless_it_resumes(earlier, capsys):
    before = snapshot(earlier)
    with pytest.raises(KeyboardInterrupt), replacing(earlier):  # Ctrl-C: resumable, so its files stay
        new_run_files(earlier)
        (earlier / "checkpoints" / "checkpoint-00000001").mkdir()
        raise KeyboardInterrupt
    assert (earlier / ASIDE / "pipeline" / "unet" / "weights").read_text() == "earlier weights"
    with pytest.raises(UserError, match="resumed run failed"), replacing(earlier, resuming=True):  # the resume keeps the interrupted run's checkpoints
        assert sorted(p.name for p in (earlier / "checkpoints").iterdir()) == ["checkpoint-00000001"]
        raise UserError("resumed run failed")
    assert snapshot(earlier) == before and leftovers(earlier) == []  # a failed resume puts the earlier run back

    with pytest.raises(KeyboardInterrupt), replacing(earlier):
        new_run_files(earlier)
        raise KeyboardInterrupt
    capsys.readouterr()
    with pytest.raises(UserError, match="already exists"):  # the next run without --overwrite: the earlier run is back, and kept
        claim(earlier, ["pipeline"], lambda: [earlier / "pipeline"], False, False, Accelerator(cpu=True), "erase", "unlearn").__enter__()
    assert "a `salun-sd erase` run (pid " in capsys.readouterr().err
    assert snapshot(earlier) == before and leftovers(earlier) == []


# --- opening a folder: stale temporaries, unwritable folders, another command's run ---------------------------


def test_the_next_run_removes_the_temporaries_of_dead_processes_only(tmp_path):
    out = tmp_path / "run"
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process has this pid
    stale = [f".pipeline.{dead}.tmp/unet/x", f".00001_0_0.png.{dead}.tmp", f".pipeline.{dead}.old.tmp/x", "checkpoints/.checkpoint-00000002.tmp/x", f"target/samples/.a.png.{dead}.tmp"]
    kept = [f".00002_0_0.png.{os.getpid()}.tmp", f".git/.index.{dead}.tmp", "00001_0_0.png", "notes.tmp"]  # a live writer's; not entered; not temporaries
    for name in stale + kept:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    with open_folder(out, "generate", False):
        pass
    assert all((out / name).exists() for name in kept)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.name.startswith(".salun-sd.lock")) == sorted(kept)


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write: read-only by its mode, or (as root, whom modes do not stop) a sysfs folder."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/kernel")):
        try:
            (candidate / ".probe").touch()
            (candidate / ".probe").unlink()
        except OSError:
            return candidate
    pytest.skip("no folder here refuses this process's writes")


def test_an_output_folder_that_is_a_file_or_unwritable_is_one_line_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    images = tmp_path / "images"
    images.mkdir()
    for output, said in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", f"cannot be made: {tmp_path / 'file'} is a file"),
                         (unwritable_folder(tmp_path), "cannot be written")):
        for argv in (["erase", "--model", "tiny"], ["attack", "--model", "tiny", "--prompts", str(tmp_path / "none.csv")],
                     ["evaluate", "--images", str(images), "--metrics", "nudenet"]):  # nothing to score: a crash after scoring would say so
            line = cli_error(capsys, *argv, "--output_dir", str(output))[-1]
            assert line.startswith(f"salun-sd {argv[0]}: error: output folder {output} {said}"), line


def test_generate_evaluate_and_attack_refuse_another_commands_run_unless_told(tmp_path, capsys):
    out = tmp_path / "erase-run"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"command": "mask+erase"}))
    (tmp_path / "prompts.txt").write_text("a photo\n")
    generate = ["generate", "--model", "tiny", "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2", "--output_dir", str(out)]
    line = cli_error(capsys, *generate)[-1]
    assert line == f"salun-sd generate: error: {out} holds a `salun-sd mask+erase` run (its manifest.json): choose another --output_dir, or pass --overwrite to write this `generate` run into it"
    for argv in (["evaluate", "--images", str(tmp_path), "--output_dir", str(out)], ["attack", "--model", "tiny", "--prompts", str(tmp_path / "prompts.txt"), "--output_dir", str(out)]):
        assert "holds a `salun-sd mask+erase` run" in cli_error(capsys, *argv)[-1]
    assert json.loads((out / "manifest.json").read_text()) == {"command": "mask+erase"}
    main([*generate, "--overwrite"])  # told so
    assert json.loads((out / "manifest.json").read_text())["command"] == "generate" and len(list(out.glob("*.png"))) == 1


# --- real erases: a full disk at a checkpoint and at the export, a kill during the export ----------------------


@pytest.fixture(scope="module")
def earlier_erase(tmp_path_factory, data_cache) -> Path:
    """A finished tiny erase (mask, checkpoints, log, manifest, exported pipeline)."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    erase(tiny_config(out, data_cache, checkpointing_steps=2), Accelerator(cpu=True))
    AcceleratorState._reset_state(True)
    return out


def full_disk_at(monkeypatch, module, name: str, where: str, error: Exception) -> None:
    """Make `module.name` (a real writer: torch.save, safetensors' save_file) fail as on a full disk when it writes a
    path containing `where`: it writes, then the file is cut short and the writer's own full-disk error is raised."""
    real = getattr(module, name)

    def write(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        if where in str(path):
            Path(path).write_bytes(Path(path).read_bytes()[:100])
            raise error
        return None

    monkeypatch.setattr(module, name, write)


@pytest.mark.parametrize(("module", "name", "where", "error", "culprit"), [
    (torch, "save", "checkpoint-00000002", RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 4224 vs 4112"), "checkpoints while writing checkpoint-00000002"),
    (safetensors.torch, "save_file", "unet", SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'), " while writing pipeline"),
    (safetensors.torch, "save_file", "vae", OSError(errno.ENOSPC, "No space left on device"), " while writing pipeline"),
], ids=["checkpoint", "export", "export_oserror"])
def test_a_full_disk_is_one_line_and_leaves_the_earlier_run(tmp_path, earlier_erase, data_cache, monkeypatch, module, name, where, error, culprit):
    out = tmp_path / "run"
    shutil.copytree(earlier_erase, out)
    before = snapshot(out)
    shutil.copy(out / "mask.safetensors", tmp_path / "mask.safetensors")  # no mask pass: seconds
    cfg = tiny_config(out, data_cache, checkpointing_steps=1, max_steps=2, learning_rate=3e-3)  # the second checkpoint fails, after the first is written
    cfg.overwrite, cfg.mask.path = True, str(tmp_path / "mask.safetensors")
    full_disk_at(monkeypatch, module, name, where, error)
    with pytest.raises(UserError) as err:
        erase(cfg, Accelerator(cpu=True))
    text = str(err.value)
    assert "\n" not in text and re.fullmatch(rf"no space left on the device of {out}/?{culprit} \(it needs about [\d.]+ MB, [\d.]+ [MG]B are free\): .*", text), text
    needed = float(re.search(r"about ([\d.]+) MB", text)[1])
    assert needed > 0.1  # the tiny UNet's weights and Adam moments (checkpoint), or the whole pipeline (export)
    assert snapshot(out) == before and leftovers(out) == []
    monkeypatch.undo()
    loaded = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in exported_unet(earlier_erase).items())


def test_a_run_killed_during_its_export_costs_the_earlier_run_nothing_and_leaves_nothing(erase_yaml, tmp_path, capsys):
    root, cfg = erase_yaml
    run = tmp_path / "run"
    args = ["erase", str(cfg), "--mask.path", str(root / "mask1" / "mask.safetensors"), "--unlearn.max_steps", "2", "--output_dir", str(run)]
    main(args)  # the earlier run
    before, earlier_unet = snapshot(run), exported_unet(run)
    read, write = os.pipe()
    killed = fork(main, *args, "--overwrite", "--unlearn.learning_rate", "3e-3", env={PAUSE_ENV: "export"}, output=write)  # its own process
    os.close(write)
    try:
        with open(read) as output:
            for line in output:
                if "paused after step export" in line:
                    break
            else:
                pytest.fail("the run ended before its export")
        assert [p.name for p in run.glob(".pipeline.*.tmp")] == [f".pipeline.{killed}.tmp"] and not (run / "pipeline").exists()
    finally:
        os.kill(killed, signal.SIGKILL)
        os.waitpid(killed, 0)
    err = cli_error(capsys, *args)  # the next run: removes the leftovers, puts the earlier run back, and refuses to replace it unasked
    assert err[-1] == f"salun-sd erase: error: {run / 'pipeline'} already exists: pass --overwrite to replace it", err
    assert any(f".pipeline.{killed}.tmp" in line for line in err) and any("ended before it finished" in line for line in err), err
    assert snapshot(run) == before and leftovers(run) == []
    loaded = StableDiffusionPipeline.from_pretrained(run / "pipeline")
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in earlier_unet.items())
