"""The training log: every optimizer step's loss terms in OUTPUT_DIR/log.jsonl, and in Accelerate's tracker
(TensorBoard or Weights & Biases) when the accelerator was made with one (unlearn.report_to).

The JSON lines need no extra package and survive the run; a resumed run first drops the lines written
after its checkpoint's step (the steps it is about to redo), so the file holds every step once.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from accelerate import Accelerator

from salun_sd.run.files import write_text


LOG_NAME = "log.jsonl"


class StepLog:
    """Call with (step, {term: value}) after each optimizer step; only the main process writes."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, start_step: int, cfg: object) -> None:
        self.accelerator, self.path = accelerator, Path(run_dir) / LOG_NAME
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lines = self.path.read_text().splitlines() if start_step and self.path.is_file() else []
            kept = "".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= start_step)
            write_text(self.path, kept)
        if accelerator.log_with:  # Accelerate's trackers take scalar hyperparameters
            settings = {k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers("salun-sd", config=settings)

    def __call__(self, step: int, values: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        self.accelerator.log(values, step=step)  # a no-op without trackers
