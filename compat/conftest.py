"""pytest wiring of the compatibility suite: the `--compat-*` options (declared once, in
`compat.options`), the shared context, and the `measure` fixture through which rows report what
they measured.

`pytest compat/` follows the gate's exit codes: 1 when a check fails (a row INCOMPATIBLE), 2 when
the inputs could not be used (the reason is printed at the end), else pytest's own code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import time

import pytest

from compat.gate import MatrixCollector
from compat.options import OPTIONS, CompatOptions
from compat.outcomes import (
    CONTEXT_KEY,
    FIGURE_PREFIX,
    HEADLINE,
    INPUT_ERROR_KEY,
    PLANTED_SKIPPED_KEY,
    GateInputError,
    cannot_check,
    session_exit_status,
)
from compat.rows import REVIEW, ROWS_BY_ID

TARGET_SIZE_WARNING = "error:Using a target size:UserWarning"


def pytest_addoption(parser):
    group = parser.getgroup("compat", "mmdit-compat: run the matrix on your own checkpoint and configs")
    for option in OPTIONS:
        group.addoption(
            f"--compat-{option.name}",
            default=option.default,
            type=option.type,
            metavar=option.metavar,
            help=option.help,
        )
    group.addoption(
        "--compat-report", default=None, metavar="DIR", help="also write the matrix as Markdown and JSON to DIR"
    )


def pytest_configure(config):
    if not any(isinstance(p, MatrixCollector) for p in config.pluginmanager.get_plugins()):
        # Plain `pytest compat/`: the matrix goes into --junitxml as suite properties, and with
        # --compat-report DIR it is written and printed too (the gate registers its own collector).
        config.pluginmanager.register(
            MatrixCollector(report_folder=config.getoption("--compat-report")),
            "compat-matrix-report",
        )
    config.addinivalue_line("markers", "compat_row(id): ties a test to a row of the compatibility matrix")
    config.addinivalue_line("markers", "mutants: runs rows against planted defects (teeth)")
    # Everywhere, also when the suite runs from an installed package without pyproject.toml.
    config.addinivalue_line("filterwarnings", TARGET_SIZE_WARNING)


def pytest_collection_modifyitems(config, items):
    for item in items:
        mark = item.get_closest_marker("compat_row")
        if mark is not None and mark.args[0] not in ROWS_BY_ID:
            raise pytest.UsageError(f"{item.nodeid}: unknown compat row {mark.args[0]!r}")
    # The planted defects prove the rows' teeth on the embedded default: on a user's inputs (whose
    # config may decide a defect's control row, or cannot show a defect) they would decide nothing
    # about the user's trainer, so they are not run (and never decide the exit code).
    planted = [item for item in items if item.get_closest_marker("mutants") is not None]
    if planted and options_from(config).user_inputs:
        config.hook.pytest_deselected(items=planted)
        items[:] = [item for item in items if item.get_closest_marker("mutants") is None]
        config.stash[PLANTED_SKIPPED_KEY] = len(planted)
    # The planted defects run after the rows: a row's own pass is then the control of its defects.
    # The checkpoint's own row runs first: it is the only row that runs on a large checkpoint's
    # weights, which are released after it (`CompatContext.release_model`).
    items.sort(key=lambda item: (item.get_closest_marker("mutants") is not None, _row_of(item) != CHECKPOINT_ROW))


def options_from(config) -> CompatOptions:
    """The options the session checks with: the gate's own object when the gate drives the session
    (its collector holds it; the gate refuses `--compat-*` after `--`), else pytest's parsed
    `--compat-*` options (plain `pytest compat/`)."""
    for plugin in config.pluginmanager.get_plugins():
        if isinstance(plugin, MatrixCollector) and plugin.options is not None:
            return plugin.options
    return CompatOptions(**{o.dest: config.getoption(f"--compat-{o.name}") for o in OPTIONS})


@pytest.fixture(scope="session")
def compat_options(pytestconfig) -> CompatOptions:
    return options_from(pytestconfig)


@pytest.fixture(scope="session")
def ctx(compat_options, tmp_path_factory, pytestconfig):
    """The shared context: configs, the checkpoint under test and ONE model instance. When an input
    cannot be used, every row that needs it is NOT RUN ("could not check") for that one reason."""
    from compat.harness import CompatContext

    started = time.perf_counter()
    try:
        context = CompatContext.create(compat_options, tmp_path_factory.mktemp("compat"))
    except GateInputError as error:
        pytestconfig.stash[INPUT_ERROR_KEY] = error
        cannot_check(error.one_line())
    context.setup_seconds = time.perf_counter() - started
    pytestconfig.stash[CONTEXT_KEY] = context  # described at the end, when every row has run
    return context


@pytest.fixture
def model(ctx):
    return ctx.require_model()


def _plain(value):
    """A property value junitxml and xdist can carry: numbers and strings as they are, the rest as JSON."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, (bool, int, float, str)):  # subclasses (torch's TorchVersion) as their base type
        return next(base(value) for base in (bool, int, float, str) if isinstance(value, base))
    return json.dumps(value, default=str, sort_keys=True)


@pytest.fixture
def measure(request):
    """measure(name, value, review=False, headline=False, figure=False): a measured value for the
    matrix (a junitxml property `measured.<name>`).

    Args (of the returned function):
        name: the value's name in the matrix.
        value: a number, string or anything JSON can hold.
        review: a measured risk that does not break compatibility (verdict REVIEW).
        headline: the value that sums up the row when it is OK (its finding in the summary).
        figure: `value` is the data of one of the report's figures (`compat.figures`): kept as JSON
            in compat-matrix.json (`figure.<name>`), not in the measured text.
    """

    def record(name: str, value, review: bool = False, headline: bool = False, figure: bool = False) -> None:
        if figure:
            request.node.user_properties.append((f"{FIGURE_PREFIX}{name}", json.dumps(value, default=float)))
            return
        request.node.user_properties.append((f"measured.{name}", _plain(value)))
        if review:
            request.node.user_properties.append((REVIEW.lower(), name))
        if headline:
            request.node.user_properties.append((HEADLINE, name))

    return record


def _malloc_trim():
    """glibc's malloc_trim, or None off glibc (the hygiene below is then skipped)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()
CHECKPOINT_ROW = "pretrained_checkpoint"


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Hands the memory a check freed back to the system (glibc keeps freed blocks in its arenas): on a
    full-size checkpoint the next check's temporaries then come on top of the model, not on top of
    every earlier check's leftovers (the gate's peak RSS)."""
    if _row_of(item) == CHECKPOINT_ROW and _row_of(nextitem) != CHECKPOINT_ROW:
        context = item.config.stash.get(CONTEXT_KEY, None)
        if context is not None:
            context.release_model()  # a large checkpoint's weights: no later row runs on them
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def _row_of(item) -> str | None:
    """The compat row a row test belongs to (None for a planted-defect test or no item)."""
    if item is None or item.get_closest_marker("mutants") is not None:
        return None
    mark = item.get_closest_marker("compat_row")
    return mark.args[0] if mark is not None else None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    planted = config.stash.get(PLANTED_SKIPPED_KEY, 0)
    if planted:
        terminalreporter.write_line(
            f"compat: {planted} planted-defect tests not run: they prove the rows' teeth on the embedded default "
            "(run `pytest compat/` without --compat-* inputs for them)"
        )


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    error = session.config.stash.get(INPUT_ERROR_KEY, None)
    if error is None:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(f"compat: could not check: {error.problem}", red=True)
        reporter.write_line(f"compat: fix: {error.fix}")
    session.exitstatus = session_exit_status(exitstatus, error)
