"""Strict fixtures: a setting a compat row changes goes through the settings schema, so a typo in a
row's own settings is an error (at collection time for module-level settings, when the config is
built for settings given inline), never a key silently added and a row that tests the default."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from compat.harness import row_settings
from latentDLM_mmdit.settings import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_row_settings_refuse_a_typo_naming_the_nearest_key():
    with pytest.raises(ConfigError, match=r"loss\.cycle_text_wieght.*nearest valid key: 'loss\.cycle_text_weight'"):
        row_settings({"cycle_text_wieght": 0.0})
    with pytest.raises(ConfigError, match="model.latent_parametrization"):
        row_settings({"model.latent_parametrization": "v_param"})
    assert row_settings({"cycle_text_weight": 0.0, "model.latent_parameterization": "x0"}) == {
        "cycle_text_weight": 0.0,
        "model.latent_parameterization": "x0",
    }


def test_a_planted_typo_in_a_row_module_fails_collection(tmp_path):
    row = tmp_path / "test_row_planted.py"
    row.write_text(
        textwrap.dedent("""
        from compat.harness import row_settings

        TYPO = row_settings({"latent_t_mode": "full", "cycle_text_wieght": 0.0})


        def test_nothing():
            assert TYPO
    """)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(row)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode != 0, proc.stdout
    assert "error" in proc.stdout.lower() and "cycle_text_wieght" in proc.stdout, proc.stdout[-3000:]
    assert "nearest valid key: 'loss.cycle_text_weight'" in proc.stdout, proc.stdout[-3000:]


def test_inline_settings_are_checked_when_the_config_is_built(tmp_path):
    from compat.harness import CompatContext
    from compat.options import CompatOptions

    ctx = CompatContext.create(CompatOptions(), tmp_path)
    with pytest.raises(ConfigError, match="cycle_latent_wieght"):
        ctx.cycle_config_for({"cycle_latent_wieght": 0.2})
    with pytest.raises(ConfigError):
        ctx.cycle_config_for({"cycle_text_weight": -1.0})  # values by the schema's ranges
