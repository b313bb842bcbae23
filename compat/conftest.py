"""pytest wiring of the compatibility suite: the `--compat-*` options, the shared context, and
the `measure` fixture through which rows report what they measured."""
from __future__ import annotations

import time

import pytest

from compat.harness import CompatContext, CompatOptions
from compat.rows import REVIEW, ROWS_BY_ID

TARGET_SIZE_WARNING = "error:Using a target size:UserWarning"


def pytest_addoption(parser):
    group = parser.getgroup("compat", "mmdit-compat: run the matrix on your own checkpoint and configs")
    group.addoption("--compat-checkpoint", default=None,
                    help="checkpoint to check (.safetensors or upstream .pt); default: embedded stable pretrain")
    group.addoption("--compat-stable-config", default=None, help="stable trainer YAML (default: packaged tiny)")
    group.addoption("--compat-cycle-config", default=None, help="cycle trainer YAML (default: packaged tiny)")
    group.addoption("--compat-data-tokens", default=None, help="upstream-format token dir (*.npz) for real batches")
    group.addoption("--compat-data-latents", default=None, help="upstream-format latent dir (*.npy) for real batches")
    group.addoption("--compat-device", default="cpu", help="device for the rows (cpu, cuda, cuda:1, ...)")
    group.addoption("--compat-report", default=None, help="folder for the matrix as Markdown and JSON")
    group.addoption("--compat-batch-size", default=4, type=int, help="batch size of the rows' batches (>= 2)")
    group.addoption("--compat-seq-len", default=16, type=int, help="sequence length of the rows' batches")


def pytest_configure(config):
    if config.getoption("--compat-report"):
        # `pytest compat/ --compat-report DIR` writes the matrix too (the gate does it itself).
        from compat.gate import MatrixCollector

        config._compat_started = time.perf_counter()
        config.pluginmanager.register(MatrixCollector(), "compat-matrix-report")
    config.addinivalue_line("markers", "compat_row(id): ties a test to a row of the compatibility matrix")
    config.addinivalue_line("markers", "mutants: runs rows against planted defects (teeth)")
    # Everywhere, also when the suite runs from an installed package without pyproject.toml.
    config.addinivalue_line("filterwarnings", TARGET_SIZE_WARNING)


def pytest_sessionfinish(session, exitstatus):
    collector = session.config.pluginmanager.get_plugin("compat-matrix-report")
    if collector is None:
        return
    from compat.gate import render_text, run_context, write_report

    options = {name.replace("-", "_"): session.config.getoption(f"--compat-{name}")
               for name in ("checkpoint", "stable-config", "cycle-config", "device")}
    rows = collector.rows()
    context = run_context(options, time.perf_counter() - session.config._compat_started)
    path = write_report(session.config.getoption("--compat-report"), rows, context, collector)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        for line in render_text(rows).splitlines():
            reporter.write_line(line)
        reporter.write_line(f"compat matrix written to {path}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        mark = item.get_closest_marker("compat_row")
        if mark is not None and mark.args[0] not in ROWS_BY_ID:
            raise pytest.UsageError(f"{item.nodeid}: unknown compat row {mark.args[0]!r}")


def options_from(config) -> CompatOptions:
    get = config.getoption
    batch_size = int(get("--compat-batch-size"))
    if batch_size < 2:
        raise pytest.UsageError("--compat-batch-size must be >= 2 (rows compare batches with single samples)")
    return CompatOptions(
        checkpoint=get("--compat-checkpoint"), stable_config=get("--compat-stable-config"),
        cycle_config=get("--compat-cycle-config"), data_tokens=get("--compat-data-tokens"),
        data_latents=get("--compat-data-latents"), device=get("--compat-device"),
        report=get("--compat-report"), batch_size=batch_size, seq_len=int(get("--compat-seq-len")),
    )


@pytest.fixture(scope="session")
def compat_options(pytestconfig) -> CompatOptions:
    return options_from(pytestconfig)


@pytest.fixture(scope="session")
def ctx(compat_options, tmp_path_factory) -> CompatContext:
    """The shared context: configs, the checkpoint under test and ONE model instance."""
    if compat_options.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"--compat-device {compat_options.device}: CUDA is not available")
    return CompatContext.create(compat_options, tmp_path_factory.mktemp("compat"))


@pytest.fixture
def model(ctx):
    return ctx.require_model()


@pytest.fixture
def measure(request):
    """measure(name, value, review=False): a measured value for the matrix; review=True marks a
    measured risk that does not break compatibility (verdict REVIEW)."""

    def record(name: str, value, review: bool = False) -> None:
        request.node.user_properties.append(("measured", name, value))
        if review:
            request.node.user_properties.append(("verdict_hint", REVIEW, name))

    return record
