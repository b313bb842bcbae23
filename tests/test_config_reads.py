"""compat.config_reads: which watched config keys a trainer reads, observed through a resolver."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from compat.config_reads import trainer_running, watching_reads

CONFIG = OmegaConf.create({"loss": {"on_nonfinite": "raise", "cycle_text_weight": 0.5}, "training": {"seed": 3}})
KEY = "loss.on_nonfinite"

READS = {
    "attribute": lambda c: c.loss.on_nonfinite,
    "item": lambda c: c["loss"]["on_nonfinite"],
    "get": lambda c: c.loss.get("on_nonfinite", "upstream"),
    "getattr_default": lambda c: getattr(c.loss, "on_nonfinite", "upstream"),
    "select": lambda c: OmegaConf.select(c, KEY),
    "whole_config_resolved": lambda c: OmegaConf.to_container(c, resolve=True)["loss"]["on_nonfinite"],
}


@pytest.mark.parametrize("read", list(READS.values()), ids=list(READS))
def test_a_read_by_the_trainer_is_recorded_with_the_value_unchanged(read):
    watched, log = watching_reads(CONFIG, (KEY,))
    assert not log.was_read(KEY)
    with trainer_running():
        assert read(watched) == "raise"
    assert log.was_read(KEY)


def test_reads_outside_the_trainer_and_of_other_keys_are_not_recorded():
    watched, log = watching_reads(CONFIG, (KEY,))
    assert watched.loss.on_nonfinite == "raise"  # the harness reading it
    with trainer_running():
        assert watched.loss.cycle_text_weight == 0.5 and watched.training.seed == 3
        assert OmegaConf.to_container(watched.training, resolve=True) == {"seed": 3}
    assert not log.was_read(KEY)
    assert CONFIG.loss.on_nonfinite == "raise" and not OmegaConf.is_interpolation(CONFIG.loss, "on_nonfinite")


def test_only_scalars_can_be_watched():
    with pytest.raises(ValueError, match="loss holds DictConfig, not a scalar"):
        watching_reads(CONFIG, ("loss",))
