from pathlib import Path

import pytest

from salun_sd.config import load_yaml
from salun_sd.families.config import EraseConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.name.startswith("ddpm")], ids=lambda p: p.name)
def test_every_sd_config_loads_and_names_its_data(path):
    cfg = load_yaml(EraseConfig, path)
    assert cfg.data.forget and cfg.data.remain and cfg.data.misaligned()
    for group in cfg.data.forget + cfg.data.remain:
        group.source()  # exactly one source each


def test_official_defaults_are_what_the_configs_say():
    nudity = load_yaml(EraseConfig, Path(CONFIGS[0]).parent / "nudity.yaml")
    assert (nudity.train.learning_rate, nudity.train.alpha, nudity.train.batch_size, nudity.mask.fraction, nudity.mask.guidance) == (1e-5, 0.1, 8, 0.5, 7.5)
    assert nudity.train.total_steps(800, 1) == 100
    tench = load_yaml(EraseConfig, Path(CONFIGS[0]).parent / "imagenette_tench.yaml")
    assert (tench.train.alpha, tench.train.epochs, len(tench.data.remain)) == (0.5, 5, 9)
