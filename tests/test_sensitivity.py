"""The control of the semantics rows: a model blind to an input cannot check how trainers feed it."""

from __future__ import annotations

import pytest

from compat.harness import (
    SENSITIVITY_MIN,
    CompatContext,
    require_sensitive,
    sensitivity,
    sensitized_copy,
)
from compat.options import CompatOptions
from compat.outcomes import CANNOT_CHECK, CONTROL_PREFIX


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return CompatContext.create(CompatOptions(), tmp_path_factory.mktemp("sens"))


def test_a_fresh_model_is_blind_to_timesteps_and_a_sensitized_copy_is_not(ctx):
    fresh = ctx.proxy_model()  # mmdit zero-initialises its time conditioning
    batch = ctx.batch(2, seed=1)
    seen = sensitivity(fresh, batch)
    assert seen["latent_t"] < SENSITIVITY_MIN and seen["text_t"] < SENSITIVITY_MIN, seen
    assert seen["latents"] >= SENSITIVITY_MIN and seen["text"] >= SENSITIVITY_MIN, seen
    sharp = sensitivity(sensitized_copy(fresh, 0.4), batch)
    assert min(sharp.values()) >= SENSITIVITY_MIN, sharp


def test_the_semantic_model_sees_every_compared_input(ctx):
    seen = sensitivity(ctx.semantic_model(), ctx.batch(2, seed=2))
    assert min(seen.values()) >= SENSITIVITY_MIN, (seen, ctx.semantic_note)


def test_a_blind_model_makes_the_row_not_run(ctx, monkeypatch):
    monkeypatch.setattr(ctx, "_sensitivity", {"text_t": 1e-6, "latent_t": 1e-2, "latents": 1.0, "text": 1.0})
    with pytest.raises(pytest.skip.Exception, match=f"^{CANNOT_CHECK}: {CONTROL_PREFIX}.*text_t"):
        require_sensitive(ctx, ("text_t", "latent_t"))
    assert require_sensitive(ctx, ("latent_t", "latents"))["latents"] == 1.0
