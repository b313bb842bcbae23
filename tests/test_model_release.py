"""A large checkpoint's weights are released once pretrained_checkpoint (the only row that runs on
them) is done, and loaded again, equal, if a later check asks; a small one is never released."""

from __future__ import annotations

import pytest
import torch

import compat.harness as harness
from compat.harness import CompatContext
from compat.options import CompatOptions


@pytest.fixture
def ctx(tmp_path):
    return CompatContext.create(CompatOptions(), tmp_path)


def test_a_small_checkpoint_is_kept(ctx):
    model = ctx.require_model()
    assert not ctx.large and ctx.release_model() is False
    assert ctx.require_model() is model and ctx.loaded


def test_a_large_checkpoint_is_released_and_reloaded_equal(ctx, monkeypatch):
    monkeypatch.setattr(harness, "LARGE_MODEL_PARAMS", ctx.n_params - 1)  # the embedded default counts as large
    before = {k: v.clone() for k, v in ctx.require_model().state_dict().items()}
    assert ctx.release_model() is True
    assert ctx.model is None and ctx.loaded  # loaded (the rows that ask `loaded` still see it did)
    again = ctx.require_model()
    assert not ctx.model_released
    after = again.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)


def test_the_checkpoint_row_runs_first():
    """In the gate's own session order: pretrained_checkpoint's checks come before every other row's."""
    from compat import conftest  # the suite's own conftest: its ordering hook

    class Item:
        def __init__(self, row, mutant=False):
            self.row, self.mutant = row, mutant

        def get_closest_marker(self, name):
            if name == "mutants":
                return object() if self.mutant else None
            if name == "compat_row":
                return type("Mark", (), {"args": (self.row,)})()
            return None

    items = [
        Item("cycle_terms"),
        Item("pretrained_checkpoint", mutant=True),
        Item("ddp"),
        Item("pretrained_checkpoint"),
    ]

    class Config:
        def getoption(self, name):
            return None

        class hook:
            @staticmethod
            def pytest_deselected(items):
                raise AssertionError("nothing is deselected without user inputs")

        stash = {}

        class pluginmanager:  # no gate collector: the options come from getoption
            @staticmethod
            def get_plugins():
                return []

    conftest.pytest_collection_modifyitems(Config(), items)
    assert [(i.row, i.mutant) for i in items] == [
        ("pretrained_checkpoint", False),
        ("cycle_terms", False),
        ("ddp", False),
        ("pretrained_checkpoint", True),
    ]
