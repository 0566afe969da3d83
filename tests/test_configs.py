from pathlib import Path

import pytest

from salun_sd.config import load_yaml
from salun_sd.families.config import EraseConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.name.startswith(("ddpm", "classify"))], ids=lambda p: p.name)
def test_every_sd_config_loads_and_names_its_data(path):
    cfg = load_yaml(EraseConfig, path)
    concepts = cfg.data.concept_list(cfg.concept)
    assert concepts and cfg.data.remain and all(c.misaligned_prompts for c in concepts)
    for group in [g for c in concepts for g in c.forget] + cfg.data.remain:
        group.source()  # exactly one source each


def test_official_defaults_are_what_the_configs_say():
    nudity = load_yaml(EraseConfig, Path(CONFIGS[0]).parent / "nudity.yaml")
    assert (nudity.unlearn.learning_rate, nudity.unlearn.alpha, nudity.unlearn.batch_size, nudity.mask.fraction, nudity.mask.guidance) == (1e-5, 0.1, 8, 0.5, 7.5)
    assert nudity.unlearn.total_steps(800, 1) == 100
    tench = load_yaml(EraseConfig, Path(CONFIGS[0]).parent / "imagenette_tench.yaml")
    assert (tench.unlearn.alpha, tench.unlearn.epochs, len(tench.data.remain)) == (0.5, 5, 9)


def test_renamed_keys_and_flags_are_refused_with_the_new_name(tmp_path, capsys):
    from salun_sd.cli import main

    for text, message in (("train:\n  max_steps: 2\n", "old.yaml: key train is now unlearn"),
                          ("unlearn:\n  compile_unet: true\n", "old.yaml.unlearn: key compile_unet is now compile"),
                          ("export_unet_only: true\n", "key export_unet_only is now export_network_only")):
        (tmp_path / "old.yaml").write_text(text)
        with pytest.raises(SystemExit):
            main(["run", str(tmp_path / "old.yaml")])
        assert message in capsys.readouterr().err
    for argv, message in ((["run", "--train.max_steps", "2"], "--train.max_steps is now --unlearn.max_steps"),
                          (["ddpm", "erase", "--unlearn.compile_unet"], "--unlearn.compile_unet is now --unlearn.compile")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_choices_are_literal_types_checked_in_one_place(capsys):
    from typing import get_args

    from salun_sd.cli import main
    from salun_sd.core.config import MethodName
    from salun_sd.core.objectives import METHODS

    assert get_args(MethodName) == tuple(METHODS)  # every method a config may name is implemented, and no other
    with pytest.raises(SystemExit):
        main(["run", "--mask.scope", "layer"])
    assert "mask.scope must be one of global, per_layer, got 'layer'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--seeding", "per_batch"])
    assert "seeding must be one of per_image, per_prompt (or empty), got 'per_batch'" in capsys.readouterr().err
