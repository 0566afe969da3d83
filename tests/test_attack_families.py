"""Issue 22 part 3: the attack on tiny SDXL, SD3 (no T5) and FLUX.1 pipelines, scored by the core's denoiser."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ldm_layout import ldm_checkpoint
from salun_sd.attack.config import AttackConfig
from salun_sd.attack.discrete import DiscretePrefixes
from salun_sd.attack.embedding import EmbeddingPrefixes
from salun_sd.attack.run import attack, references
from salun_sd.attack.search import search
from salun_sd.attack.target import Victim, attack_pipeline
from salun_sd.core.objectives import Batch, diffusion_loss
from salun_sd.evaluation.config import GenerateConfig
from salun_sd.evaluation.generate import plan_jobs
from salun_sd.evaluation.prompts import PromptRecord
from salun_sd.families.config import SingleFileSource
from salun_sd.families.loading import family_of
from salun_sd.run.runtime import make_accelerator
from tiny_families import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline

BUILDERS = {"sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
PROMPT = "a photo of a red circle"


@pytest.fixture(scope="module", params=list(BUILDERS))
def victim(request) -> Victim:
    pipe = BUILDERS[request.param]()
    return Victim(attack_pipeline(pipe, pipe), k=3, timesteps=2, steps=2, resolution=32)


def reference_case(victim: Victim, folder):
    job = plan_jobs([PromptRecord(0, PROMPT)], GenerateConfig(steps=2, seed=0, guidance=3.0), (32, 32), 16)[0]
    return victim.case(job.request, references(victim.pipe, [job], 2, folder)[0])


def test_the_attack_loss_is_the_erase_loss_of_the_prompt(victim, tmp_path):
    """The plain prompt's attack loss is core.objectives.diffusion_loss on the denoiser the erase builds for that prompt."""
    case = reference_case(victim, tmp_path)
    trained = family_of(victim.pipe).denoiser(victim.pipe, [PROMPT], resolution=32)
    t, noise = [victim.timesteps[1]], torch.randn(1, *case.x0.shape[1:], generator=torch.Generator().manual_seed(3))
    batch = Batch(case.x0, torch.tensor([trained.cond_id(PROMPT)]), noise, torch.tensor(t))
    torch.testing.assert_close(victim.losses([case], None, t, noise), diffusion_loss(trained, victim.network, batch))


def test_both_attacks_lower_the_reference_loss_below_the_plain_prompts(victim, tmp_path):
    case = reference_case(victim, tmp_path)
    [plain] = victim.reference_losses([case], None, seeds=[1])
    never = lambda images: [False] * len(images)  # noqa: E731  run the whole budget
    for space in (DiscretePrefixes(victim.clip_tables, 1, 3, 0.01, 0.1), EmbeddingPrefixes(victim.tables, 1, 3, 0.005)):
        [outcome] = search(victim, [case], space, 5, [never], [torch.Generator().manual_seed(0)])
        assert outcome.blocks == 2 and victim.reference_losses([case], [outcome.slots], seeds=[1])[0] < plain
        if outcome.slots.ids is not None:  # what T5 read and a user would type
            assert victim.decode(outcome.slots.ids, case).endswith(PROMPT)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_the_base_model_is_broken(family, tmp_path, monkeypatch):
    """`salun-sd attack` on the unerased base (SDXL as a single file): the concept, here "what the base model draws
    for the prompt", shows on the plain prompt, so every prompt counts as broken for both attacks (pre-ASR, as the
    official code counts it), judged by a module:function judge; the report is written."""
    pipe = BUILDERS[family]()
    pipe.save_pretrained(tmp_path / "base")
    model, single_file = str(tmp_path / "base"), SingleFileSource()
    if family == "sdxl":
        save_file(ldm_checkpoint(pipe), str(tmp_path / "tiny-xl.safetensors"))
        model, single_file = str(tmp_path / "tiny-xl.safetensors"), SingleFileSource(config=str(tmp_path / "base"))
    (tmp_path / f"base_judge_{family}.py").write_text(  # one module per family: Python caches a module by name
        "from pathlib import Path\nimport numpy as np\nfrom PIL import Image\n"
        f"REFERENCES = Path({str(tmp_path / 'out' / 'reference')!r})\n"
        "def like_the_base(images):\n"
        "    refs = [np.asarray(Image.open(p).convert('RGB'), dtype=float) for p in REFERENCES.glob('*.png')]\n"
        "    return [any(np.abs(np.asarray(image, dtype=float) - r).mean() < 1 for r in refs) for image in images]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\n")
    cfg = AttackConfig(model=model, base=model, prompts=str(tmp_path / "prompts.txt"), output_dir=str(tmp_path / "out"), judge=f"base_judge_{family}:like_the_base",
                       scheduler="", steps=2, guidance=3.0, reference_steps=2, reference_guidance=3.0, height=32, width=32, timesteps=1, iterations=1, k=3, single_file=single_file)
    md = attack(cfg, make_accelerator("no"), log=lambda *_: None)
    totals = json.loads((md.parent / "report.json").read_text())["totals"]
    assert totals["pre_success"] == 1 and totals["discrete"]["asr"] == 1 and totals["embedding"]["asr"] == 1
