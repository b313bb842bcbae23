"""bench/row_profile.py: a session fixture set up inside the first test is a record of its own, and
the test's seconds and memory rise are its own."""

from __future__ import annotations

import json

pytest_plugins = ["pytester"]

CHECKS = """
import time
import pytest

@pytest.fixture(scope="session")
def loaded():
    time.sleep(0.6)
    return bytearray(300 * 2**20)  # touched: counts in RSS

@pytest.mark.compat_row("first")
def test_first(loaded):
    time.sleep(0.1)

@pytest.mark.compat_row("second")
def test_second(loaded):
    block = bytearray(100 * 2**20)
    time.sleep(0.1)
    del block
"""


def test_session_setup_is_its_own_record(pytester, monkeypatch, tmp_path):
    out = tmp_path / "profile.json"
    monkeypatch.setenv("BENCH_ROW_PROFILE", str(out))
    pytester.makeini("[pytest]\nmarkers =\n    compat_row(name): the row\n")
    pytester.makepyfile(test_checks=CHECKS)
    result = pytester.runpytest_subprocess("-p", "bench.row_profile", "-q")
    result.assert_outcomes(passed=2)
    records = {r["row"]: r for r in json.loads(out.read_text())["records"]}
    assert set(records) == {"(setup: loaded)", "first", "second"}, records
    setup, first, second = records["(setup: loaded)"], records["first"], records["second"]
    assert setup["seconds"] >= 0.6 and first["seconds"] < 0.5, (setup, first)
    mib = 2**20
    assert setup["rss_peak"] - setup["rss_start"] >= 250 * mib, setup
    assert first["rss_peak"] - first["rss_start"] < 50 * mib, first  # the load is not the first test's
    assert second["rss_peak"] - second["rss_start"] >= 80 * mib, second
