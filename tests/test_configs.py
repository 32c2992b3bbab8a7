"""Every experiment config loads, validates and builds its network."""

import importlib
import os

import jax
import pytest

from stochinterp import couplings, sharding, train
from stochinterp.models.unet import count_params

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
EXPERIMENTS = sorted(
    name[:-3]
    for name in os.listdir(CONFIG_DIR)
    if name.endswith(".py") and name not in ("__init__.py", "base.py")
)


def load(name):
    return importlib.import_module(f"configs.{name}").get_config()


def test_the_experiments_are_all_found():
    assert "inpaint_photos16" in EXPERIMENTS
    assert "imagenet_sr64_256" in EXPERIMENTS
    assert len(EXPERIMENTS) >= 7


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_validates_and_builds_its_network(name):
    config = load(name)
    train.validate_config(config, sharding.make_mesh())
    height, width, channels = train.image_shape(config)
    coupling = couplings.from_config(config.coupling)
    model = train.build_model(config, channels)
    n = count_params(
        model,
        (height, width, channels),
        cond_channels=couplings.cond_channels(coupling, channels),
        with_labels=bool(config.coupling.num_classes),
    )
    assert n > 100_000


def test_imagenet_superres_network_has_the_papers_parameter_count():
    config = load("imagenet_sr64_256")
    config.coupling.p_uncond = 0.0  # no null-class row: the paper's network
    model = train.build_model(config, 3)
    assert count_params(model, (64, 64, 3), cond_channels=3, with_labels=True) == (
        269_650_195
    )


def test_a_typo_in_a_config_field_is_refused():
    config = load("inpaint_photos16")
    with pytest.raises(AttributeError, match="num_stepz"):
        config.train.num_stepz = 3
    assert jax.device_count() == 2
