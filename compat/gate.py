"""The gate: runs the compatibility suite and prints the matrix.

    python -m compat [--checkpoint CKPT] [--stable-config YAML] [--cycle-config YAML]
                     [--data-tokens DIR --data-latents DIR] [--device cpu|cuda]
                     [--report DIR] [--kill-table] [-- extra pytest args]

Exit codes (the same for `pytest compat/`):
  0  every applicable row ran and none is INCOMPATIBLE
  1  at least one row is INCOMPATIBLE
  2  the gate could not check: a usage error, an unreadable or unsafe checkpoint, a bad config or
     bad data, a device that is not there, or a row that should have run did not
The matrix (Markdown and JSON, default folder `compat-report/`) is written in every case; rows that
could not run are NOT RUN with the reason, and a short block at the end says what to do.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from compat.options import OPTIONS, CompatOptions
from compat.outcomes import (
    BLOCKED,
    CANNOT_CHECK,
    EXIT_CANNOT_CHECK,
    EXIT_INCOMPATIBLE,
    EXIT_OK,
    NOT_APPLICABLE,
    GateInputError,
    is_control_failure,
    skip_kind,
)
from compat.rows import INCOMPATIBLE, NOT_RUN, OK, REVIEW, ROWS

COMPAT_DIR = Path(__file__).resolve().parent
DEFAULT_REPORT = "compat-report"
NOT_SELECTED = "not selected"
# Which NOT RUN kinds make the gate exit 2 (when no row is INCOMPATIBLE): all but these.
HARMLESS_NOT_RUN = (NOT_APPLICABLE, NOT_SELECTED)


@dataclass
class CheckOutcome:
    nodeid: str
    outcome: str  # passed | failed | error | skipped
    message: str = ""
    skip_kind: str | None = None  # for skipped: not applicable | could not check | blocked | skipped
    measured: list = field(default_factory=list)
    review: list = field(default_factory=list)

    @property
    def check(self) -> str:
        """The check's id: the parametrize id, else the test name."""
        name = self.nodeid.split("::")[-1]
        return name[name.index("[") + 1 : -1] if "[" in name else name


@dataclass
class RowResult:
    id: str
    topic: str
    stable: str
    cycle: str
    measured: str
    verdict: str
    not_run_kind: str | None
    tests: list


class MatrixCollector:
    """pytest plugin: gathers each test's outcome and measured values by row; with `report_folder`
    (plain `pytest compat/ --compat-report DIR`) it also writes and prints the matrix at the end."""

    def __init__(self, report_folder: str | None = None, sets_exit_status: bool = False):
        self.sets_exit_status = sets_exit_status  # plain `pytest compat/`: the session exits with the gate's code
        self.row_of: dict[str, str] = {}
        self.outcomes: dict[str, CheckOutcome] = {}
        self.kills: list[dict] = []
        self.other_failures: list[str] = []
        self.context: dict[str, str] = {}
        self.input_error: GateInputError | None = None
        self.report_folder = report_folder
        self.started = time.perf_counter()

    def pytest_collection_modifyitems(self, items):
        for item in items:
            mark = item.get_closest_marker("compat_row")
            if mark is not None:
                self.row_of[item.nodeid] = mark.args[0]

    def pytest_deselected(self, items):
        for item in items:
            self.row_of.pop(item.nodeid, None)

    def pytest_runtest_logreport(self, report):
        outcome = self.outcomes.setdefault(report.nodeid, CheckOutcome(report.nodeid, "passed"))
        if report.when == "call" or report.outcome != "passed":
            if report.outcome == "failed":
                outcome.outcome = "failed" if report.when == "call" else "error"
                outcome.message = _failure_message(report)
            elif report.outcome == "skipped" and outcome.outcome == "passed":
                outcome.outcome = "skipped"
                outcome.skip_kind, outcome.message = skip_kind(_skip_reason(report))
        props = list(report.user_properties)
        outcome.measured = [
            (name.removeprefix("measured."), value) for name, value in props if name.startswith("measured.")
        ]
        outcome.review = [value for name, value in props if name == REVIEW.lower()]
        for name, value in props:
            if name == "kill":
                kill = json.loads(value)
                if kill not in self.kills:
                    self.kills.append(kill)
        if report.outcome == "failed" and report.nodeid not in self.row_of and report.nodeid not in self.other_failures:
            self.other_failures.append(report.nodeid)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session, exitstatus):
        from compat.conftest import CONTEXT_KEY, INPUT_ERROR_KEY

        checked = session.config.stash.get(CONTEXT_KEY, None)
        self.context = checked.describe() if checked is not None else {}
        self.input_error = session.config.stash.get(INPUT_ERROR_KEY, None)
        rows = self.rows()
        add_junit_suite_properties(session.config, rows)
        code = exit_code(rows, self.input_error, self.other_failures) if self.row_of else None
        if self.sets_exit_status and code == EXIT_CANNOT_CHECK and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = EXIT_CANNOT_CHECK  # a row that should have run did not (e.g. a failed control)
        if self.report_folder is None:
            return
        context = run_context(self, time.perf_counter() - self.started)
        path = write_report(self.report_folder, rows, context, self, code)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("")
            for line in render_text(rows).splitlines():
                reporter.write_line(line)
            reporter.write_line(f"compat matrix written to {path}")

    def rows(self) -> list[RowResult]:
        by_row: dict[str, list[CheckOutcome]] = defaultdict(list)
        for nodeid, row in self.row_of.items():
            if nodeid in self.outcomes:
                by_row[row].append(self.outcomes[nodeid])
        return [row_result(row, by_row.get(row.id, [])) for row in ROWS]


def add_junit_suite_properties(config, rows: list[RowResult]) -> None:
    """With --junitxml, each row's verdict and measured values as suite properties
    (`compat.<row>.verdict`, `compat.<row>.measured`): valid in every junit family (xunit2 allows
    no properties on test cases; those carry `measured.<name>` for the legacy families)."""
    try:
        from _pytest.junitxml import xml_key
    except ImportError:  # pytest moved its internals: the per-test properties remain
        return
    xml = config.stash.get(xml_key, None)
    if xml is None:
        return
    for r in rows:
        xml.add_global_property(f"compat.{r.id}.verdict", r.verdict)
        xml.add_global_property(f"compat.{r.id}.measured", r.measured)


# Exceptions whose name says nothing to the user: the harness's own, and a plain assert's.
HARNESS_EXCEPTIONS = ("compat.outcomes.Incompatible", "compat.subjects.CandidateError", "AssertionError", "Failed")
# pytest's rewritten-assert explanation, appended after the message on a line of its own.
_REWRITTEN_ASSERT = re.compile(r"\n(?:assert |where |\s*\+\s)")


def failure_text(message: str) -> str:
    """A check's failure as the user reads it: the sentence first (no harness exception name before
    it, no rewritten-assert explanation after it), on one line."""
    text = message.strip()
    for name in HARNESS_EXCEPTIONS:
        if text.startswith(f"{name}: "):
            text = text[len(name) + 2 :]
            break
    return " ".join(_REWRITTEN_ASSERT.split(text)[0].split())


def _failure_message(report) -> str:
    """The message of the exception that ended the check (the last of a chain), on one line."""
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    message = getattr(crash, "message", None)
    if message:
        return failure_text(message)
    return _first_line(report.longreprtext)


def _first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("E "):
            return line[2:].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _skip_reason(report) -> str:
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# Of a row none of whose checks ran, the kind that says most about why (the gate's exit follows it).
_KIND_PRIORITY = (CANNOT_CHECK, "skipped", BLOCKED, NOT_APPLICABLE)


def row_result(row, tests: list[CheckOutcome]) -> RowResult:
    """A row's verdict from its checks: any failure -> INCOMPATIBLE; none ran -> NOT RUN with the
    reason; some skipped -> REVIEW listing them; a measured risk -> REVIEW; otherwise OK (every
    check of the row that applies to this setup ran and passed; checks not applicable by design,
    e.g. a CUDA comparison on a CPU run, are listed as n/a)."""
    ran = [t for t in tests if t.outcome != "skipped"]
    failed = [t for t in tests if t.outcome in ("failed", "error")]
    skipped = [t for t in tests if t.outcome == "skipped"]
    inapplicable = [t for t in skipped if t.skip_kind == NOT_APPLICABLE]  # not a check of this setup
    measured = []
    for t in tests:
        measured.extend(f"{name}={_format_value(value)}" for name, value in t.measured)
    controls = [t for t in skipped if is_control_failure(t.skip_kind, t.message)]
    kind = None
    if not tests:
        verdict, kind, note = NOT_RUN, NOT_SELECTED, "not selected (no check of this row was collected)"
    elif controls and not failed:  # the harness could not measure what the row judges: no verdict
        verdict, kind = NOT_RUN, CANNOT_CHECK
        note = f"{CANNOT_CHECK}: " + "; ".join(dict.fromkeys(t.message for t in controls))
    elif failed:
        verdict = INCOMPATIBLE
        note = "; ".join(f"FAILED {t.check}: {t.message}" for t in failed)
    elif not ran:
        verdict = NOT_RUN
        kind = min((t.skip_kind for t in skipped), key=_KIND_PRIORITY.index)
        reason = next(t.message for t in skipped if t.skip_kind == kind)
        note = f"{kind}: {reason}"
    elif len(skipped) > len(inapplicable):
        verdict = REVIEW
        note = "; ".join(f"skipped {t.check} ({t.skip_kind}: {t.message})" for t in skipped if t not in inapplicable)
    elif any(t.review for t in ran):
        flagged = []
        for t in ran:
            values = dict(t.measured)
            flagged += [f"{_format_value(values[r])} ({r})" if r in values else str(r) for r in t.review]
        verdict, note = REVIEW, "review: " + "; ".join(dict.fromkeys(flagged))
    else:
        verdict, note = OK, ""
    if skipped and verdict == INCOMPATIBLE:
        note += "; " + "; ".join(f"skipped {t.check} ({t.skip_kind})" for t in skipped)
    elif inapplicable and verdict != NOT_RUN:
        note = "; ".join(filter(None, [note, *(f"n/a {t.check}: {t.message}" for t in inapplicable)]))
    text = "; ".join(dict.fromkeys(measured))
    if note:
        text = f"{note} | {text}" if text else note
    return RowResult(row.id, row.topic, row.stable, row.cycle, text, verdict, kind, [asdict(t) for t in tests])


def exit_code(rows: list[RowResult], input_error: GateInputError | None, other_failures: list[str]) -> int:
    """The gate's exit code (see the module docstring); INCOMPATIBLE wins over could-not-check."""
    if any(r.verdict == INCOMPATIBLE for r in rows):
        return EXIT_INCOMPATIBLE
    if input_error is not None or other_failures:
        return EXIT_CANNOT_CHECK
    if all(r.verdict == NOT_RUN for r in rows):
        return EXIT_CANNOT_CHECK  # nothing was checked: never a pass
    if any(r.verdict == NOT_RUN and r.not_run_kind not in HARMLESS_NOT_RUN for r in rows):
        return EXIT_CANNOT_CHECK
    return EXIT_OK


def not_run_rows(reason: str) -> list[RowResult]:
    """Every row NOT RUN for one reason (the gate stopped before running any check)."""
    return [
        RowResult(row.id, row.topic, row.stable, row.cycle, f"{CANNOT_CHECK}: {reason}", NOT_RUN, CANNOT_CHECK, [])
        for row in ROWS
    ]


# -- rendering -------------------------------------------------------------------------------------
def render_text(rows: list[RowResult], width: int = 60) -> str:
    id_w = max([22] + [len(r.id) for r in rows])
    topic_w = max([34] + [len(r.topic) for r in rows])
    header = f"{'row':<{id_w}} {'topic':<{topic_w}} {'verdict':<13} measured"
    lines = [header, "-" * len(header)]
    for r in rows:
        wrapped = textwrap.wrap(r.measured or "-", width) or ["-"]
        lines.append(f"{r.id:<{id_w}} {r.topic:<{topic_w}} {r.verdict:<13} {wrapped[0]}")
        lines.extend(f"{'':<{id_w}} {'':<{topic_w}} {'':<13} {more}" for more in wrapped[1:])
    return "\n".join(lines)


def render_markdown(rows: list[RowResult], context: dict) -> str:
    out = ["# Compatibility matrix: stable vs cycle trainer", ""]
    out += [f"- {k}: {v}" for k, v in context.items()]
    out += [
        "",
        "Each row's checks are in `compat/test_row_<row>.py`.",
        "",
        "| Row | Topic | Stable | Cycle | Measured | Verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"`{r.id}`", r.topic, r.stable, r.cycle, r.measured or "-", f"**{r.verdict}**"]
        out.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(out) + "\n"


def render_kill_table(kills: list[dict]) -> str:
    if not kills:
        return "kill table: no mutant was run (use --kill-table)"
    header = f"{'mutant':<34} {'meant for row/check':<48} {'path':<9} caught"
    lines = [header, "-" * (len(header) + 30)]
    for k in kills:
        target = f"{k['row']}/{k.get('check', '')}"
        verdict = f"yes ({k.get('how', '')})" if k["caught"] else f"NO ({k.get('how', '')})"
        lines.append(f"{k['mutant']:<34} {target:<48} {k.get('path', ''):<9} {verdict}  {k.get('detail', '')[:60]}")
    caught = sum(k["caught"] for k in kills)
    lines.append(f"{caught} of {len(kills)} caught")
    return "\n".join(lines)


def render_error_block(error: GateInputError) -> str:
    return "\n".join(
        [
            "compat gate: could not check (exit 2)",
            *textwrap.wrap(f"problem: {error.problem}", 100, subsequent_indent="  "),
            *textwrap.wrap(f"fix: {error.fix}", 100, subsequent_indent="  "),
        ]
    )


def write_report(
    folder: str | Path,
    rows: list[RowResult],
    context: dict,
    collector: "MatrixCollector | None" = None,
    code: int | None = None,
) -> Path:
    """compat-matrix.md and compat-matrix.json in `folder`; returns the Markdown path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    error = collector.input_error if collector is not None else None
    (folder / "compat-matrix.md").write_text(render_markdown(rows, context))
    (folder / "compat-matrix.json").write_text(
        json.dumps(
            {
                "context": context,
                "exit_code": code,
                "rows": [asdict(r) for r in rows],
                "input_error": {"problem": error.problem, "fix": error.fix} if error else None,
                "kills": collector.kills if collector else [],
                "other_failures": collector.other_failures if collector else [],
            },
            indent=2,
            default=str,
        )
    )
    return folder / "compat-matrix.md"


def run_context(collector: MatrixCollector | None, seconds: float, options: CompatOptions | None = None) -> dict:
    """The matrix header: what the session checked (from the shared context), else the options."""
    context = dict(collector.context) if collector is not None and collector.context else {}
    if not context and options is not None:
        context = {
            "checkpoint": options.checkpoint or "embedded default",
            "stable config": options.stable_config or "packaged tiny default",
            "cycle config": options.cycle_config or "packaged tiny default",
            "device": options.device,
        }
    context["wall seconds"] = f"{seconds:.1f}"
    return context


# -- entry point -----------------------------------------------------------------------------------
class GateUsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a usage error still writes the matrix and exits 2
        raise GateUsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m compat",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Exit codes") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for option in OPTIONS:
        p.add_argument(
            f"--{option.name}", type=option.type, default=option.default, metavar=option.metavar, help=option.help
        )
    p.add_argument("--report", default=DEFAULT_REPORT, metavar="DIR", help="folder for compat-matrix.md / .json")
    p.add_argument("--kill-table", action="store_true", help="also run every planted defect and print the kill table")
    p.add_argument("--quiet", action="store_true", help="pass -q -q to pytest")
    p.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments (e.g. -k, -x)")
    return p


def pytest_arguments(args) -> list[str]:
    argv = [str(COMPAT_DIR), "-p", "no:cacheprovider", "-q", "--no-header", "-rN"]
    if args.quiet:
        argv.append("-q")
    for option in OPTIONS:
        value = getattr(args, option.dest)
        if value is None:
            continue
        if option.metavar in ("CKPT", "YAML", "DIR"):
            value = Path(value).resolve()
        elif option.metavar == "SPEC" and ".py:" in value:  # path/to/file.py:Class
            path, name = value.rsplit(":", 1)
            value = f"{Path(path).resolve()}:{name}"
        argv.append(f"--compat-{option.name}={value}")
    if not args.kill_table:
        argv += ["-m", "not mutants"]
    return argv + list(args.pytest_args)


def _report_folder(argv: list[str] | None) -> str:
    """--report from an argument list that may not parse as a whole."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--report", default=DEFAULT_REPORT)
    known, _ = pre.parse_known_args(argv)
    return known.report


def _stop(folder: str, error: GateInputError, started: float, options: CompatOptions | None = None) -> int:
    rows = not_run_rows(error.one_line())
    print(render_text(rows))
    collector = MatrixCollector()
    collector.input_error = error
    markdown = write_report(
        folder, rows, run_context(None, time.perf_counter() - started, options), collector, EXIT_CANNOT_CHECK
    )
    print(f"\nwrote {markdown} and {markdown.with_suffix('.json')}")
    print(render_error_block(error), file=sys.stderr)
    return EXIT_CANNOT_CHECK


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except GateUsageError as exc:
        return _stop(_report_folder(argv), GateInputError(f"usage: {exc}", "see `python -m compat --help`"), started)
    options = CompatOptions(**{o.dest: getattr(args, o.dest) for o in OPTIONS})
    from compat.inputs import check_options

    try:
        check_options(options)
    except GateInputError as error:
        return _stop(args.report, error, started, options)
    collector = MatrixCollector()
    rc = pytest.main(pytest_arguments(args), plugins=[collector])
    if rc in (pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.USAGE_ERROR, pytest.ExitCode.INTERRUPTED):
        collector.input_error = collector.input_error or GateInputError(
            f"pytest stopped with exit code {int(rc)} ({rc.name.lower().replace('_', ' ')}) before the matrix was complete",
            "read pytest's message above; extra pytest arguments after -- must be valid",
        )
    rows = collector.rows()
    code = exit_code(rows, collector.input_error, collector.other_failures)
    context = run_context(collector, time.perf_counter() - started, options)
    print()
    print(render_text(rows))
    print(f"\nmodel: {context.get('model', 'not built')}")
    if args.kill_table:
        print()
        print(render_kill_table(collector.kills))
    markdown = write_report(args.report, rows, context, collector, code)
    print(f"\nwrote {markdown} and {markdown.with_suffix('.json')}")
    if code == EXIT_INCOMPATIBLE:
        print(f"compat gate: INCOMPATIBLE rows: {', '.join(r.id for r in rows if r.verdict == INCOMPATIBLE)} (exit 1)")
    elif code == EXIT_CANNOT_CHECK:
        error = collector.input_error or GateInputError(
            _cannot_check_summary(rows, collector.other_failures), "see the NOT RUN rows' reasons in the matrix"
        )
        print(render_error_block(error), file=sys.stderr)
    else:
        print("compat gate: every applicable row ran; no incompatible row (exit 0)")
    if collector.input_error is not None and code == EXIT_INCOMPATIBLE:
        print(render_error_block(collector.input_error), file=sys.stderr)
    return code


def _cannot_check_summary(rows: list[RowResult], other_failures: list[str]) -> str:
    if other_failures:
        return f"the suite's own checks failed: {', '.join(other_failures[:5])}"
    if all(r.verdict == NOT_RUN for r in rows):
        return "no row ran (nothing was checked)"
    unrun = [r for r in rows if r.verdict == NOT_RUN and r.not_run_kind not in HARMLESS_NOT_RUN]
    return "rows that should have run did not: " + "; ".join(f"{r.id} ({r.measured})" for r in unrun[:5])


if __name__ == "__main__":
    sys.exit(main())
