"""scripts/gpu_report.py (and through it bench_erase.py, bench_generate.py) runs end to end on CPU at small shapes;
bench_erase.py says plainly when diffusers is missing."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cpu_env

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SCRIPT = SCRIPTS / "bench_erase.py"


def test_gpu_report_cpu_smoke_runs_every_part_and_prints_rows(tmp_path):
    """scripts/gpu_report.py --cpu-smoke: every part (erase presets + mask pass, the capped fit, generation) runs
    through the same code as on a GPU, and the rows for BENCHMARKS.md come out with the device name."""
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "gpu_report.py"), "--cpu-smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=cpu_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = json.loads(out.read_text())
    assert not [part for part in ("fit", "generate", "attack") if "error" in full[part]], (full["fit"], full["generate"], full["attack"])
    device = full["erase"]["device"]
    table = proc.stdout.strip().splitlines()
    assert table[:2] == ["| device | what | result |", "| --- | --- | --- |"]
    assert all(line.startswith(f"| {device} | ") for line in table[2:])
    assert any("mask pass" in line for line in table) and any("24 GiB fit, bf16_ckpt_adam" in line for line in table)
    assert any("generation, tiny" in line and "images/s" in line for line in table)
    assert "attack (UnlearnDiffAtk" in table[-1] and "for the published 50" in table[-1]
    report = full["erase"]
    assert report["tflop_per_sample"] > 0
    rows = {row["name"]: row for row in report["step"]}
    assert set(rows) == {"official", "default", "smoke-levers"}
    for row in rows.values():
        assert row["samples_per_s"] > 0 and row["tflops"] > 0 and row["peak_memory_gib"] > 0
        assert row["frozen_bitwise"] is True
    assert rows["official"]["speedup_vs_official"] == 1.0
    assert rows["official"]["batch_size"] == 1 and rows["official"]["attention"] == "eager"
    mask = report["mask"]
    assert abs(mask["kept"] - 0.5) < 1e-3 and mask["seconds"] > 0
    assert mask["same_threshold"] is True
    assert "erase step, preset official" in proc.stdout


def test_missing_diffusers_is_said_plainly(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail as if it were not installed
    monkeypatch.setattr(sys, "argv", ["bench_erase.py", "--cpu-smoke"])
    with pytest.raises(SystemExit) as stop:  # a str code: Python prints it alone on stderr and exits 1, no traceback
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert isinstance(stop.value.code, str) and "'diffusers' is not installed" in stop.value.code


def test_flow_family_presets_run_and_keep_frozen_weights(monkeypatch):
    """--family builds SD3.5 / FLUX layouts (toy width here) and runs the same unlearn loop; masked-out weights stay bitwise."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_erase

    report = bench_erase.main(["--family", "flux-dev", "--cpu-smoke", "--no-mask", "--steps", "2", "--warmup", "0"])
    rows = {row["name"]: row for row in report["step"]}
    assert set(rows) == {"default", "smoke-xattn"} and report["tflop_per_sample"] > 0
    assert all(row["samples_per_s"] > 0 and row["frozen_bitwise"] is True for row in rows.values())
