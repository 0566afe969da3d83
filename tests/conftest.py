import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from salun_sd.core_config import MaskConfig, TrainConfig  # noqa: E402
from salun_sd.sd.config import DataConfig, EraseConfig, ImageGroup  # noqa: E402

FORGET, REMAIN = "a photo of a nude person", "a photo of a person wearing clothes"


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
        train=TrainConfig(**{"batch_size": 2, "max_steps": 4, "learning_rate": 1e-3, **train}),
    )


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """Generated images and latents shared by the tests of a session (as the real cache is across runs)."""
    return tmp_path_factory.mktemp("cache")
