"""pytest plugin: what each compat check costs, for `python -m bench --only gate --per-row`.

Loaded into the gate's pytest session with `-p bench.row_profile` (the bench passes it after `--`);
it writes one JSON record per test to the file named by the environment variable
`BENCH_ROW_PROFILE`: the test's row, wall seconds (setup, call and teardown), the process's RSS when
the test started and the largest RSS sampled while it ran (every 10 ms from a thread, and the
kernel's own high-water mark, `ru_maxrss`, which a sample can miss between two samples).
tracemalloc cannot see torch's storages; RSS can.
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time

import psutil
import pytest

ENV = "BENCH_ROW_PROFILE"
INTERVAL_S = 0.01


class _Sampler:
    """The largest RSS of this process while running, sampled from a thread."""

    def __init__(self, process: psutil.Process):
        self.process = process
        self.peak = process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> "_Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class RowProfile:
    def __init__(self, path: str):
        self.path = path
        self.process = psutil.Process()
        self.records: list[dict] = []
        self.sampler: _Sampler | None = None
        self.setting_up = False  # within a session fixture's setup (nested ones count in the outer)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        mark = item.get_closest_marker("compat_row")
        self.test = {"rss_start": self.process.memory_info().rss, "max_before": _max_rss_bytes(), "setup_s": 0.0}
        started = time.perf_counter()
        with _Sampler(self.process) as sampler:
            self.sampler = sampler
            yield
        self.sampler = None
        max_after = _max_rss_bytes()
        # A new process-wide high-water mark reached during this test is this test's peak.
        peak = max(sampler.peak, max_after if max_after > self.test["max_before"] else 0)
        self.records.append(
            {
                "nodeid": item.nodeid,
                "row": mark.args[0] if mark is not None else None,
                "seconds": time.perf_counter() - started - self.test["setup_s"],
                "rss_start": self.test["rss_start"],
                "rss_peak": peak,
            }
        )

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        if fixturedef.scope != "session" or self.sampler is None or self.setting_up:
            yield
            return
        before = self.process.memory_info().rss
        started = time.perf_counter()
        self.setting_up = True
        try:
            yield
        finally:
            self.setting_up = False
        seconds = time.perf_counter() - started
        after = self.process.memory_info().rss
        self.records.append(
            {
                "nodeid": f"(setup: {fixturedef.argname})",
                "row": f"(setup: {fixturedef.argname})",
                "seconds": seconds,
                "rss_start": before,
                "rss_peak": max(self.sampler.peak, after),
            }
        )
        # The test goes on from here: its time, its start and its peak exclude the setup.
        self.test["setup_s"] += seconds
        self.test["rss_start"] = after
        self.test["max_before"] = _max_rss_bytes()
        self.sampler.peak = after

    def pytest_sessionfinish(self, session):
        with open(self.path, "w", encoding="utf-8") as f:
            json.dump({"records": self.records, "max_rss": _max_rss_bytes()}, f)


def pytest_configure(config):
    path = os.environ.get(ENV)
    if path:
        config.pluginmanager.register(RowProfile(path), "bench-row-profile")
