"""What every test shares: one torch thread, the offline Hub, subprocesses on the CPU, tiny erase configs.

One thread for each pytest-xdist worker (`-n auto` in pyproject.toml: one worker per core) and every
process it starts: the models here are tiny, and on a busy 2-core machine spinning threads cost more
than they give (the toy demo took 645 s under load, 86 s on one thread). Files go to workers whole
(`--dist loadfile`), so a module fixture is made once; the session fixtures below are made once per run
for all workers (`shared`), in a folder they share.

Runs in several processes are forked from the test's process (`forked`: torch and diffusers come imported,
which a new Python pays 5-16 s of CPU for); `salun(..., processes=2)` is the user's `accelerate launch`.

On a machine with CUDA GPUs: subprocesses and forked processes see no GPU, and every Accelerator runs on the CPU
(ACCELERATE_USE_CPU). Accelerate's state is one per process and the first Accelerator fixes its
device, so otherwise the test order would decide whether a CLI run trains on the GPU, and runs that
are compared with CPU processes (one process vs two) would differ by the device. Generation and
evaluation, which do not go through Accelerate, still use the GPU.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"  # before torch loads, and inherited by every subprocess
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["ACCELERATE_USE_CPU"] = "true"

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from filelock import FileLock  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from salun_sd.cli import main  # noqa: E402
from salun_sd.core.config import MaskConfig, TrainConfig  # noqa: E402
from salun_sd.evaluation.clip_score import ClipScorer  # noqa: E402
from salun_sd.families.config import DataConfig, EraseConfig, ImageGroup  # noqa: E402

torch.set_num_threads(1)

FORGET, REMAIN = "a photo of a nude person", "a photo of a person wearing clothes"


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a test's subprocess: this one's, on the CPU (no GPU to see; the launcher picks the
    CPU itself, ACCELERATE_USE_CPU is for this process), offline, one thread."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    return {**env, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def salun(*args: str, processes: int = 1, check: bool = True, env: dict[str, str] | None = None, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """`python -m salun_sd ARGS` in a subprocess on the CPU; with processes > 1 under `accelerate launch`.

    Returns the finished process, or with Popen keywords (stdout=...) the running one; env adds variables."""
    if processes == 1:
        cmd = [sys.executable, "-m", "salun_sd", *args]
    else:  # the CPU recipe: --multi_gpu with Accelerator(cpu=True); `--cpu --num_processes 2` runs one process
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "salun_sd", *args]
    if popen:
        return subprocess.Popen(cmd, env=cpu_env(**(env or {})), **popen)
    result = subprocess.run(cmd, env=cpu_env(**(env or {})), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def forked(entry: Callable[[list[str]], object], *args: str, processes: int = 2) -> str:
    """entry(args) in `processes` processes forked from this one, each with the environment torchrun gives its
    workers (RANK, WORLD_SIZE, MASTER_PORT ...), so Accelerate and torch.distributed start as under
    `accelerate launch`, but with torch and diffusers already imported (a new Python spends 5-16 s of CPU on
    that). What they wrote to stdout and stderr comes back; if one fails, the others are killed and this raises.
    salun(..., processes=2) runs the user's own path, `accelerate launch` and new Pythons (test_runlock)."""
    AcceleratorState._reset_state(True)  # each process makes its own, as a new one would
    world = {"WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with tempfile.TemporaryFile("w+") as log:
        pids = [fork(entry, *args, env={**world, "RANK": str(rank), "LOCAL_RANK": str(rank)}, output=log.fileno()) for rank in range(processes)]
        failed = None
        while pids:  # polled: a process that failed first would leave a blocking wait on another waiting forever
            for pid in list(pids):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    pids.remove(pid)
                    if os.waitstatus_to_exitcode(status) != 0 and failed is None:
                        failed = os.waitstatus_to_exitcode(status)
                        for other in pids:  # they would wait for it at the next collective
                            os.kill(other, signal.SIGKILL)
            time.sleep(0.05)
        log.seek(0)
        if failed is not None:
            raise AssertionError(f"{entry.__module__}.{entry.__name__}({list(args)}) in {processes} processes: exit {failed}\n{log.read()[-6000:]}")
        return log.read()


def fork(entry: Callable[[list[str]], object], *args: str, env: dict[str, str] | None = None, output: int) -> int:
    """entry(args) in a process forked from this one, with env added to its environment and its stdout and stderr
    written to the file descriptor `output`; its pid (the caller reaps it, os.waitpid). Like salun()'s subprocesses it
    sees no GPU: one that this process has used could not be used after the fork anyway."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.environ.update(env or {})
        torch.cuda.is_available = lambda: False
        os.dup2(output, 1)
        os.dup2(output, 2)
        sys.stdout = sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 (not pytest's capture)
        entry(list(args))
        code = 0
    except SystemExit as stop:
        code = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


def exported_unet(run_dir) -> dict[str, torch.Tensor]:
    """The UNet weights of an erase's exported pipeline."""
    return load_file(str(Path(run_dir) / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))


def tiny_config(out, cache, **train) -> EraseConfig:
    """A seconds-long erase of the offline tiny pipeline."""
    return EraseConfig(
        model="tiny",
        concept="nudity",
        output_dir=str(out),
        data=DataConfig(
            forget=[ImageGroup(prompt=FORGET, generate=8)],
            remain=[ImageGroup(prompt=REMAIN, generate=8)],
            generation_steps=3,
            cache_dir=str(cache),
        ),
        mask=MaskConfig(fraction=0.5, batch_size=4),
        unlearn=TrainConfig(**{"batch_size": 2, "max_steps": 4, "learning_rate": 1e-3, **train}),
    )


def toy_erase(out, steps: int, method: str = "salun") -> Path:
    """`method` erases 'circle' from the shipped toy model through the real erase flow (compare's settings, tiny data); the pipeline folder."""
    from salun_sd.families.erase import erase
    from salun_sd.run.runtime import make_accelerator
    from salun_sd.toyworld.compare import Case, CompareConfig, erase_config
    from salun_sd.toyworld.world import WorldSpec

    cfg = erase_config(CompareConfig(forget_per_prompt=2, remain_per_prompt=1, steps=steps), Case("shape", "circle"), method, Path(out), WorldSpec())
    cfg.mask.batch_size = 16
    return erase(cfg, make_accelerator("no"), ("mask", "erase")) / "pipeline"


def random_clip() -> ClipScorer:
    """An open_clip CLIP with random weights: the real model class, transform and BPE tokenizer."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    return ClipScorer(model, open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-B-32"), "tiny-random")


class RandomCNN(torch.nn.Module):
    """A small random CNN feature extractor taking uint8 images, like the Inception one."""

    def __init__(self, features: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, features, 5, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255)


# The slowest files (by their CPU seconds in a full run, 2026-12-02 06:31 UTC at 848dbbc; test_runlock by its wall
# time, a real `accelerate launch`) go to the workers first: with --dist loadfile a worker takes the next file when
# it finishes one, so a long file left for last keeps one worker busy while the other idles. (`--no-loadscope-reorder`
# in pyproject.toml: xdist otherwise sends the files with the most tests first, whatever they cost.)
SLOWEST_FIRST = ("test_bench.py", "test_ddpm.py", "test_demo.py", "test_attack.py", "test_toyworld_compare.py", "test_families_end_to_end.py",
                 "test_runlock.py", "test_erase.py", "test_uce.py", "test_relearn.py", "test_concepts.py", "test_run_folder.py",
                 "test_attack_families.py", "test_single_file.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file, and for the other files, the order stays


@pytest.fixture(autouse=True)
def no_accelerate_state_left_behind():
    """Accelerate keeps one state per process, set by the first Accelerator (device, mixed precision) and
    silently kept by the next ones: a test that trained in bf16 would make every later test autocast too."""
    yield
    AcceleratorState._reset_state(True)


def shared(tmp_path_factory, name: str, make: Callable[[Path], object] = lambda folder: None) -> Path:
    """A folder made by `make` once per test run and shared by every pytest-xdist worker: the first worker to
    ask makes it under a file lock, the others wait and reuse it (a session fixture is otherwise made once per worker)."""
    root = tmp_path_factory.getbasetemp()
    folder = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / f"shared-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / ".made").is_file():
            folder.mkdir(exist_ok=True)
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """Generated images and latents shared by the tests of a run (as the real cache is across runs; its writes are atomic)."""
    return shared(tmp_path_factory, "cache")


@pytest.fixture(scope="session")
def erase_yaml(tmp_path_factory):
    """A tiny-pipeline YAML config and its mask, for the tests that run the CLI: one process (this one) draws the
    data (two batches of 4 per prompt, into ROOT/cache1), then makes ROOT/mask1/mask.safetensors."""

    def make(root: Path) -> None:
        (root / "cfg.yaml").write_text(
            f"model: tiny\ndata:\n  forget:\n    - prompt: {FORGET}\n      generate: 8\n  remain:\n    - prompt: {REMAIN}\n      generate: 8\n"
            f"  generation_steps: 3\n  generation_batch_size: 4\n  cache_dir: {root / 'cache1'}\nmask:\n  batch_size: 4\nunlearn:\n  learning_rate: 1.0e-3\n"
        )
        main(["mask", str(root / "cfg.yaml"), "--output_dir", str(root / "mask1")])

    root = shared(tmp_path_factory, "cli", make)
    return root, root / "cfg.yaml"


@pytest.fixture(scope="session")
def two_process_erase(tmp_path_factory, erase_yaml):
    """An uninterrupted 2-process erase (1 example per process and step, checkpoints every 2 steps): its folder and arguments.
    Tests put their own runs beside it, in folders of their own names."""
    root, cfg = erase_yaml
    # A large Adam epsilon keeps each update proportional to its gradient: with the default 1e-8, a gradient
    # of ~1e-9 (float noise of the summation order) decides the sign of a full lr-sized step.
    args = [str(cfg), "--mask.path", str(root / "mask1" / "mask.safetensors"), "--unlearn.max_steps", "4", "--unlearn.batch_size", "1",
            "--unlearn.adam_epsilon", "1e-2", "--unlearn.weight_decay", "0.01", "--unlearn.max_grad_norm", "1.0", "--unlearn.checkpointing_steps", "2"]
    runs = shared(tmp_path_factory, "p2", lambda folder: forked(main, "erase", *args, "--output_dir", str(folder / "p2")))
    return runs / "p2", args
