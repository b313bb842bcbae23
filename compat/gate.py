"""The gate: runs the compatibility suite and prints the matrix.

    python -m compat [--checkpoint CKPT] [--stable-config YAML] [--cycle-config YAML]
                     [--data-tokens DIR --data-latents DIR] [--device cpu|cuda]
                     [--report DIR] [--verbose] [--kill-table] [-- extra pytest args]

Exit codes (the same for `pytest compat/`):
  0  every applicable row ran and none is INCOMPATIBLE
  1  at least one row is INCOMPATIBLE
  2  the gate could not check: a usage error, an unreadable or unsafe checkpoint, a bad config or
     bad data, a device that is not there, or a row that should have run did not
The matrix (compat-matrix.json, compat-matrix.md and the page index.html with its figures, default
folder `compat-report/`) is written in every case; rows that could not run are NOT RUN with the
reason, and a short block at the end says what to do. The terminal shows a summary that fits a
screen (`--verbose`: also every row's full measured text and pytest's own output).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from importlib import metadata
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from compat.options import OPTIONS, CompatOptions
from compat.outcomes import (
    BLOCKED,
    CANNOT_CHECK,
    CONTEXT_KEY,
    EXIT_CANNOT_CHECK,
    EXIT_INCOMPATIBLE,
    EXIT_OK,
    FIGURE_PREFIX,
    HEADLINE,
    INPUT_ERROR_KEY,
    NOT_APPLICABLE,
    GateInputError,
    is_control_failure,
    session_exit_status,
    skip_kind,
)
from compat.report import clean_message, render_problem_block, render_terminal, summarize
from compat.report import write_report as write_report_files
from compat.rows import COMPAT_DIR, INCOMPATIBLE, NOT_RUN, OK, REVIEW, ROWS

DEFAULT_REPORT = "compat-report"
NOT_SELECTED = "not selected"
# Which NOT RUN kinds make the gate exit 2 (when no row is INCOMPATIBLE): all but these.
HARMLESS_NOT_RUN = (NOT_APPLICABLE, NOT_SELECTED)
VERSION_PACKAGES = ("torch", "mmdit", "hyper-connections", "x-transformers")
PYTEST_OUTPUT = "pytest-output.txt"  # pytest's own output of a gate run (tracebacks), in the report folder


@dataclass
class CheckOutcome:
    nodeid: str
    outcome: str  # passed | failed | error | skipped
    message: str = ""
    skip_kind: str | None = None  # for skipped: not applicable | could not check | blocked | skipped
    measured: list = field(default_factory=list)
    review: list = field(default_factory=list)
    headline: list = field(default_factory=list)  # names of measured values that sum the row up
    figures: dict = field(default_factory=dict)  # figure name -> data (compat.figure_data)

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
    """pytest plugin: gathers each test's outcome, measured values and figure data by row.

    Args:
        report_folder: where the report goes. Plain `pytest compat/` (gate_mode False) writes it
            there at the end when given (`--compat-report DIR`) and prints the summary whenever a
            row ran; the gate writes and prints it itself, the folder only names the page in JUnit.
        progress: where to print one character per check (the gate's progress line); nothing is
            printed before the inputs are known to be usable, so that an exit-2 run shows no dots.
        gate_mode: the gate (`python -m compat`) drives the session.
        options: the gate's parsed and checked options, handed to the suite as they are (the
            `compat_options` fixture reads them); None for plain `pytest compat/`, whose
            `--compat-*` options are parsed by pytest.
    """

    def __init__(
        self,
        report_folder: str | None = None,
        progress=None,
        gate_mode: bool = False,
        options: CompatOptions | None = None,
    ):
        self.options = options
        self.row_of: dict[str, str] = {}
        self.outcomes: dict[str, CheckOutcome] = {}
        self.kills: list[dict] = []
        self.other_failures: list[str] = []
        self.context: dict[str, str] = {}
        self.input_error: GateInputError | None = None
        self.report_folder = report_folder
        self.gate_mode = gate_mode
        self.progress = progress
        self.pending_progress = ""
        self.progress_started = False
        self.written: dict[str, Path] = {}
        self.exit_code: int | None = None
        self.session = None
        self.started = time.perf_counter()

    def pytest_sessionstart(self, session):
        self.session = session

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
        outcome.headline = [value for name, value in props if name == HEADLINE]
        outcome.figures = {
            name.removeprefix(FIGURE_PREFIX): json.loads(value)
            for name, value in props
            if name.startswith(FIGURE_PREFIX)
        }
        for name, value in props:
            if name == "kill":
                kill = json.loads(value)
                if kill not in self.kills:
                    self.kills.append(kill)
        if report.outcome == "failed" and report.nodeid not in self.row_of and report.nodeid not in self.other_failures:
            self.other_failures.append(report.nodeid)
        if report.when == "call" or report.outcome != "passed":
            self._progress({"passed": ".", "failed": "F", "skipped": "s"}.get(report.outcome, "?"), report)

    def _progress(self, mark: str, report) -> None:
        """One character per check, held back until the inputs are known to be usable."""
        if self.progress is None or self.session is None or report.nodeid not in self.row_of:
            return
        stash = self.session.config.stash
        if stash.get(INPUT_ERROR_KEY, None) is not None:
            self.progress = None  # exit 2: its problem block, not progress, is what the user sees
            return
        self.pending_progress += mark
        if stash.get(CONTEXT_KEY, None) is None:
            return
        if not self.progress_started:
            self.progress.write(f"checking {len(set(self.row_of.values()))} rows ({len(self.row_of)} checks): ")
            self.progress_started = True
        self.progress.write(self.pending_progress)
        self.progress.flush()
        self.pending_progress = ""

    def end_progress(self) -> None:
        """Ends the progress line, if one was started."""
        if self.progress is not None and self.progress_started:
            self.progress.write("\n")
            self.progress.flush()

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session, exitstatus):
        checked = session.config.stash.get(CONTEXT_KEY, None)
        self.context = checked.describe() if checked is not None else {}
        self.input_error = session.config.stash.get(INPUT_ERROR_KEY, None)
        rows = self.rows()
        html = Path(self.report_folder or DEFAULT_REPORT) / "index.html"
        add_junit_suite_properties(session.config, rows, html if (self.gate_mode or self.report_folder) else None)
        if self.gate_mode or not self.row_of or session.config.option.collectonly:
            return  # `--collect-only` lists the checks and runs none: no matrix, pytest's exit status
        # Plain `pytest compat/`: its exit status as conftest's pytest_sessionfinish will leave it, or 2
        # when a row that should have run did not (e.g. a failed harness control) and nothing failed.
        self.exit_code = session_exit_status(exitstatus, self.input_error)
        if self.exit_code == EXIT_OK and exit_code(rows, self.input_error, self.other_failures) == EXIT_CANNOT_CHECK:
            session.exitstatus = self.exit_code = EXIT_CANNOT_CHECK
        if self.report_folder is not None:
            context = run_context(self, time.perf_counter() - self.started)
            self.written = write_report(self.report_folder, rows, context, self, self.exit_code)

    def pytest_terminal_summary(self, terminalreporter):
        """Plain `pytest compat/`: the gate's summary after pytest's own (the gate prints its own)."""
        if self.gate_mode or not self.row_of or terminalreporter.config.option.collectonly:
            return
        matrix = matrix_of(self.rows(), run_context(self, time.perf_counter() - self.started), self, self.exit_code)
        terminalreporter.write_sep("=", "compat matrix")
        for line in render_terminal(matrix).splitlines():
            terminalreporter.write_line(line)
        for path in self.written.values():
            terminalreporter.write_line(f"wrote {path}")
        terminalreporter.write_line(summarize(matrix).exit_line)

    def rows(self) -> list[RowResult]:
        by_row: dict[str, list[CheckOutcome]] = defaultdict(list)
        for nodeid, row in self.row_of.items():
            if nodeid in self.outcomes:
                by_row[row].append(self.outcomes[nodeid])
        return [row_result(row, by_row.get(row.id, []), row.module.is_file()) for row in ROWS]


def add_junit_suite_properties(config, rows: list[RowResult], html: Path | None = None) -> None:
    """With --junitxml, each row's verdict and measured values as suite properties
    (`compat.<row>.verdict`, `compat.<row>.measured`) and the report page's path (`compat.report.html`):
    valid in every junit family (xunit2 allows no properties on test cases; those carry
    `measured.<name>` for the legacy families)."""
    try:
        from _pytest.junitxml import xml_key
    except ImportError:  # pytest moved its internals: the per-test properties remain
        return
    xml = config.stash.get(xml_key, None)
    if xml is None:
        return
    if html is not None:
        xml.add_global_property("compat.report.html", str(html.resolve()))
    for r in rows:
        xml.add_global_property(f"compat.{r.id}.verdict", r.verdict)
        xml.add_global_property(f"compat.{r.id}.measured", r.measured)


def _failure_message(report) -> str:
    """The message of the exception that ended the check (the last of a chain), on one line,
    without pytest's `AssertionError: ` prefix and rewritten `assert ...` explanation (torch's
    comparison details stay: the verbose text and the page show them)."""
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    message = getattr(crash, "message", None)
    if message:
        return clean_message(message, keep_details=True)
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


def row_result(row, tests: list[CheckOutcome], module_present: bool = True) -> RowResult:
    """A row's verdict from its checks: any failure -> INCOMPATIBLE; none ran -> NOT RUN with the
    reason; some skipped -> REVIEW listing them; a measured risk -> REVIEW; otherwise OK (every
    check of the row that applies to this setup ran and passed; checks not applicable by design,
    e.g. a CUDA comparison on a CPU run, are listed as n/a).

    Args:
        row: the row of `rows.py`.
        tests: the outcomes of the row's checks that were collected.
        module_present: whether the row's test module exists. A row with no collected check is
            "not selected" (harmless: a run narrowed with -k) only when its module exists; a missing
            module means the row cannot be checked at all (exit 2), never a silent pass.
    """
    ran = [t for t in tests if t.outcome != "skipped"]
    failed = [t for t in tests if t.outcome in ("failed", "error")]
    skipped = [t for t in tests if t.outcome == "skipped"]
    inapplicable = [t for t in skipped if t.skip_kind == NOT_APPLICABLE]  # not a check of this setup
    measured = []
    for t in tests:
        measured.extend(f"{name}={_format_value(value)}" for name, value in t.measured)
    controls = [t for t in skipped if is_control_failure(t.skip_kind, t.message)]
    kind = None
    if not tests and not module_present:
        verdict, kind = NOT_RUN, CANNOT_CHECK
        note = (
            f"{CANNOT_CHECK}: the row's test module compat/test_row_{row.id}.py is missing, so none of its "
            "checks exists; restore it from the repository (git checkout -- compat/)"
        )
    elif not tests:
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


# -- rendering (compat.report renders the matrix; this builds it) --------------------------------------
def matrix_of(
    rows: list[RowResult],
    context: dict,
    collector: "MatrixCollector | None",
    code: int | None,
    problem: GateInputError | None = None,
) -> dict:
    """The matrix as compat-matrix.json holds it: the source every view is rendered from.

    Args:
        rows: every row's result.
        context: the matrix header (`run_context`).
        collector: the session's collector (input error, kills, other failures), if any.
        code: the exit code of the run.
        problem: why the run could not check (exit 2), when that is not the input error itself.
    """
    error = collector.input_error if collector is not None else None
    problem = problem or error
    return {
        "context": context,
        "exit_code": code,
        "rows": [asdict(r) for r in rows],
        "input_error": {"problem": error.problem, "fix": error.fix} if error else None,
        "problem": {"problem": problem.problem, "fix": problem.fix} if problem else None,
        "kills": collector.kills if collector else [],
        "other_failures": collector.other_failures if collector else [],
    }


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


def write_report(
    folder: str | Path,
    rows: list[RowResult],
    context: dict,
    collector: "MatrixCollector | None" = None,
    code: int | None = None,
) -> dict[str, Path]:
    """compat-matrix.json, compat-matrix.md and index.html in `folder` (`compat.report.write_report`).

    Args:
        folder: the report folder.
        rows: every row's result.
        context: the matrix header (`run_context`).
        collector: the session's collector (input error, kills, other failures), if any.
        code: the exit code of the run.
    Returns:
        the paths written, by kind ("json", "markdown", "html").
    """
    return write_report_files(folder, matrix_of(rows, context, collector, code))


def installed_versions_line() -> str:
    """torch, mmdit, hyper-connections and x-transformers as installed (read without importing them)."""
    found = []
    for name in VERSION_PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


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
    context["versions"] = installed_versions_line()
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
    p.add_argument(
        "--report",
        default=DEFAULT_REPORT,
        metavar="DIR",
        help="folder for index.html (the page), compat-matrix.md / .json and pytest-output.txt",
    )
    p.add_argument("--kill-table", action="store_true", help="also run every planted defect and print the kill table")
    p.add_argument("--quiet", action="store_true", help="no progress line (and pass -q -q to pytest)")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also print every row's full measured text, and pytest's own output (tracebacks) as it runs",
    )
    p.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments (e.g. -k, -x)")
    return p


def pytest_arguments(args) -> list[str]:
    """pytest's arguments for the gate's session: the suite and pytest's own flags. The compat
    options are not among them: the session reads the gate's `CompatOptions` from its collector."""
    argv = [str(COMPAT_DIR), "-p", "no:cacheprovider", "-q", "--no-header", "-rN"]
    if args.quiet:
        argv.append("-q")
    if not args.kill_table:
        argv += ["-m", "not mutants"]
    return argv + list(args.pytest_args)


def _report_folder(argv: list[str] | None) -> str:
    """--report from an argument list that may not parse as a whole."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--report", default=DEFAULT_REPORT)
    known, _ = pre.parse_known_args(argv)
    return known.report


def _stop(
    folder: str, error: GateInputError, started: float, options: CompatOptions | None = None, verbose: bool = False
) -> int:
    """Exit 2 before pytest runs: the matrix written with every row NOT RUN, the problem block."""
    collector = MatrixCollector()
    collector.input_error = error
    matrix = matrix_of(
        not_run_rows(error.one_line()),
        run_context(None, time.perf_counter() - started, options),
        collector,
        EXIT_CANNOT_CHECK,
    )
    paths = write_report_files(folder, matrix)
    print(render_terminal(matrix, verbose=verbose))
    print(f"\nwrote {paths['html']} (the page), {paths['markdown'].name} and {paths['json'].name}")
    print(render_problem_block(matrix), file=sys.stderr)
    return EXIT_CANNOT_CHECK


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except GateUsageError as exc:
        return _stop(_report_folder(argv), GateInputError(f"usage: {exc}", "see `python -m compat --help`"), started)
    stray = [a.split("=", 1)[0] for a in args.pytest_args if a.startswith("--compat-")]
    if stray:  # pytest would parse them, and the session reads the gate's own options instead
        return _stop(
            args.report,
            GateInputError(
                f"{', '.join(stray)} after -- is pytest's spelling of a gate option, and the gate does not read it there",
                f"pass it before --, as the gate's own option: {stray[0].replace('--compat-', '--')} VALUE",
            ),
            started,
            verbose=args.verbose,
        )
    options = CompatOptions(**{o.dest: getattr(args, o.dest) for o in OPTIONS})
    from compat.inputs import check_options

    try:
        check_options(options)
    except GateInputError as error:
        return _stop(args.report, error, started, options, args.verbose)
    quiet_progress = args.quiet or args.verbose  # --verbose shows pytest's own progress and output
    collector = MatrixCollector(
        args.report, progress=None if quiet_progress else sys.stdout, gate_mode=True, options=options
    )
    pytest_output = io.StringIO()
    # pytest's own output (progress dots, tracebacks, warning summary) goes to the report folder
    # unless --verbose: the summary below says what the run found, and an exit-2 run shows its problem.
    with contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(pytest_output):
        rc = pytest.main(pytest_arguments(args), plugins=[collector])
    collector.end_progress()
    output_file = Path(args.report) / PYTEST_OUTPUT
    if not args.verbose:
        output_file.parent.mkdir(parents=True, exist_ok=True)
        output_file.write_text(pytest_output.getvalue())
    if rc in (pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.USAGE_ERROR, pytest.ExitCode.INTERRUPTED):
        collector.input_error = collector.input_error or GateInputError(
            f"pytest stopped with exit code {int(rc)} ({rc.name.lower().replace('_', ' ')}) before the matrix was complete",
            "read pytest's message "
            + ("above" if args.verbose else f"in {output_file}")
            + "; extra pytest arguments after -- must be valid",
        )
    rows = collector.rows()
    code = exit_code(rows, collector.input_error, collector.other_failures)
    context = run_context(collector, time.perf_counter() - started, options)
    problem = None
    if code == EXIT_CANNOT_CHECK and collector.input_error is None:
        problem = GateInputError(
            _cannot_check_summary(rows, collector.other_failures),
            "see the NOT RUN rows' reasons in the matrix"
            + ("" if args.verbose else f" and pytest's output in {output_file}"),
        )
    matrix = matrix_of(rows, context, collector, code, problem)
    paths = write_report_files(args.report, matrix)
    print()
    print(render_terminal(matrix, verbose=args.verbose))
    if args.kill_table:
        print()
        print(render_kill_table(collector.kills))
    print(f"\nwrote {paths['html']} (the page), {paths['markdown'].name} and {paths['json'].name}")
    block = render_problem_block(matrix)
    if code != EXIT_CANNOT_CHECK:
        print(summarize(matrix).exit_line)
    if block is not None:
        print(block, file=sys.stderr)
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
