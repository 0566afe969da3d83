"""Process setup and teardown shared by every command that trains.

torch and Accelerate are imported inside the functions, so command modules can import this one
without slowing `--help`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from salun_sd.errors import UserError

if TYPE_CHECKING:
    from accelerate import Accelerator


PAUSE_ENV = "SALUN_SD_PAUSE_AFTER_STEP"


def exit_with_launcher() -> None:
    """In a worker of torch's elastic agent (torchrun; accelerate launch with several processes), exit when the agent dies.

    An agent killed with SIGKILL cannot stop its workers, which then train on as orphans and keep writing
    the run folder. A thread watches the parent pid rather than PR_SET_PDEATHSIG, which fires when the
    *thread* that started the worker ends, not the agent. A single process is left alone: a run started
    with nohup must outlive its shell.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(0.5)
        try:
            print(f"salun-sd: the launcher (pid {launcher}) is gone; stopping worker {os.getpid()}", file=sys.stderr, flush=True)
        finally:  # its stderr may have gone with it
            os._exit(1)

    threading.Thread(target=watch, name="salun-sd-launcher-watch", daemon=True).start()


def pause_if_asked(step: int | str) -> None:
    """With SALUN_SD_PAUSE_AFTER_STEP=N in the environment, every process stops after optimizer step N (and its
    checkpoint) and waits to be killed: a run interrupted at a known point, to inspect it or to test resuming.
    A named point pauses the same way (=export: the erased model written, not yet renamed into place)."""
    if os.environ.get(PAUSE_ENV) == str(step):
        print(f"salun-sd: paused after step {step} (pid {os.getpid()})", file=sys.stderr, flush=True)
        threading.Event().wait()


def device(requested: str = "auto") -> str:
    """The torch device to use: `requested`, or for "auto" (and "") cuda when available, else cpu."""
    if requested not in ("", "auto"):
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_accelerator(mixed_precision: str = "no", report_to: str = "", project_dir: str | None = None) -> Accelerator:
    """Accelerate picks up `accelerate launch`; CPU-only machines need cpu=True to run several processes.

    With report_to (tensorboard | wandb), Accelerate's tracker of that name logs into project_dir.
    """
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if mixed_precision not in ("no", "fp16", "bf16"):
        raise UserError(f"mixed_precision must be no, fp16 or bf16, got {mixed_precision!r} (in YAML, quote \"no\")")
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if report_to and not available[report_to]():
        raise UserError(f"report_to={report_to} needs the {report_to} package, which is not installed here: pip install {report_to}")
    return Accelerator(mixed_precision=mixed_precision, cpu=device() == "cpu", log_with=report_to or None, project_dir=project_dir)


def finish(accelerator: Accelerator) -> None:
    """End all processes together. Gloo processes can abort in interpreter teardown after their work
    is done, so a multi-process run leaves through os._exit once every rank has flushed."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
