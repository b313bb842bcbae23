"""The gate: runs the compatibility suite and prints the matrix.

    python -m compat [--checkpoint CKPT] [--stable-config YAML] [--cycle-config YAML]
                     [--data-tokens DIR --data-latents DIR] [--device cpu|cuda]
                     [--report DIR] [--kill-table] [-- extra pytest args]

Prints topic / stable / cycle / measured / verdict for every row, writes the matrix as Markdown
and JSON (default folder `compat-report/`), and exits 1 when any row is INCOMPATIBLE (or a test
outside the rows failed), 2 on a usage or internal error, 0 otherwise. A row none of whose tests
ran is NOT RUN, never OK.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from compat.rows import INCOMPATIBLE, NOT_RUN, OK, REVIEW, ROWS

COMPAT_DIR = Path(__file__).resolve().parent


@dataclass
class CheckOutcome:
    nodeid: str
    outcome: str  # passed | failed | skipped | error
    message: str = ""
    measured: list = field(default_factory=list)
    review: list = field(default_factory=list)


@dataclass
class RowResult:
    id: str
    topic: str
    stable: str
    cycle: str
    measured: str
    verdict: str
    tests: list


class MatrixCollector:
    """pytest plugin: gathers each test's outcome and measured values by row."""

    def __init__(self):
        self.row_of: dict[str, str] = {}
        self.outcomes: dict[str, CheckOutcome] = {}
        self.kills: list[dict] = []
        self.other_failures: list[str] = []

    def pytest_collection_modifyitems(self, items):
        for item in items:
            mark = item.get_closest_marker("compat_row")
            if mark is not None:
                self.row_of[item.nodeid] = mark.args[0]

    def pytest_deselected(self, items):
        for item in items:
            self.row_of.pop(item.nodeid, None)

    def pytest_runtest_logreport(self, report):
        props = list(report.user_properties)
        outcome = self.outcomes.setdefault(report.nodeid, CheckOutcome(report.nodeid, "passed"))
        if report.when == "call" or report.outcome != "passed":
            if report.outcome == "failed":
                outcome.outcome = "failed" if report.when == "call" else "error"
                outcome.message = _first_line(report.longreprtext)
            elif report.outcome == "skipped" and outcome.outcome == "passed":
                outcome.outcome = "skipped"
                outcome.message = _skip_reason(report)
        outcome.measured = [(p[1], p[2]) for p in props if p[0] == "measured"]
        outcome.review = [p[2] for p in props if p[0] == "verdict_hint"]
        self.kills.extend(p[1] for p in props if p[0] == "kill" and p[1] not in self.kills)
        if report.outcome == "failed" and report.nodeid not in self.row_of:
            self.other_failures.append(report.nodeid)

    def rows(self) -> list[RowResult]:
        by_row: dict[str, list[CheckOutcome]] = defaultdict(list)
        for nodeid, row in self.row_of.items():
            if nodeid in self.outcomes:
                by_row[row].append(self.outcomes[nodeid])
        return [_row_result(row, by_row.get(row.id, [])) for row in ROWS]


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


def _row_result(row, tests: list[CheckOutcome]) -> RowResult:
    ran = [t for t in tests if t.outcome != "skipped"]
    failed = [t for t in tests if t.outcome in ("failed", "error")]
    measured = []
    for t in tests:
        measured.extend(f"{name}={_format_value(value)}" for name, value in t.measured)
    if not tests:
        verdict, note = NOT_RUN, "no test selected"
    elif failed:
        verdict, note = INCOMPATIBLE, "; ".join(f"FAILED {t.nodeid.split('::')[-1]}: {t.message}" for t in failed)
    elif not ran:
        verdict, note = NOT_RUN, tests[0].message
    elif any(t.review for t in ran):
        verdict, note = REVIEW, "review: " + ", ".join(sorted({r for t in ran for r in t.review}))
    else:
        verdict, note = OK, ""
    skipped = len(tests) - len(ran)
    if skipped and verdict in (OK, REVIEW, INCOMPATIBLE):
        note = (note + "; " if note else "") + f"{skipped} of {len(tests)} checks skipped"
    text = "; ".join(dict.fromkeys(measured))
    if note:
        text = f"{note} | {text}" if text else note
    return RowResult(row.id, row.topic, row.stable, row.cycle, text, verdict, [asdict(t) for t in tests])


# -- rendering -------------------------------------------------------------------------------------
def render_text(rows: list[RowResult], width: int = 60) -> str:
    header = f"{'topic':<34} {'verdict':<13} measured"
    lines = [header, "-" * len(header)]
    for r in rows:
        wrapped = textwrap.wrap(r.measured or "-", width) or ["-"]
        lines.append(f"{r.topic:<34} {r.verdict:<13} {wrapped[0]}")
        lines.extend(f"{'':<34} {'':<13} {more}" for more in wrapped[1:])
    return "\n".join(lines)


def render_markdown(rows: list[RowResult], context: dict) -> str:
    out = ["# Compatibility matrix: stable vs cycle trainer", ""]
    out += [f"- {k}: {v}" for k, v in context.items()]
    out += ["", "| Topic | Stable | Cycle | Measured | Verdict |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [r.topic, r.stable, r.cycle, r.measured or "-", f"**{r.verdict}**"]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


def render_kill_table(kills: list[dict]) -> str:
    if not kills:
        return "kill table: no mutant was run (use --kill-table)"
    lines = [f"{'mutant':<34} {'meant for row':<24} caught", "-" * 72]
    for k in kills:
        lines.append(f"{k['mutant']:<34} {k['row']:<24} {'yes' if k['caught'] else 'NO'}  {k.get('detail', '')[:80]}")
    return "\n".join(lines)


def write_report(folder: str | Path, rows: list[RowResult], context: dict, collector: "MatrixCollector") -> Path:
    """compat-matrix.md and compat-matrix.json in `folder`; returns the Markdown path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compat-matrix.md").write_text(render_markdown(rows, context))
    (folder / "compat-matrix.json").write_text(json.dumps(
        {"context": context, "rows": [asdict(r) for r in rows], "kills": collector.kills,
         "other_failures": collector.other_failures}, indent=2, default=str))
    return folder / "compat-matrix.md"


def run_context(options: dict, seconds: float) -> dict:
    from compat import harness

    return {
        "checkpoint": options.get("checkpoint") or "embedded default (stable trainer, synthetic pretrain)",
        "stable config": options.get("stable_config") or "packaged tiny default",
        "cycle config": options.get("cycle_config") or "packaged tiny default",
        "device": options.get("device") or "cpu",
        "model": harness.LAST_CONTEXT.model_note if harness.LAST_CONTEXT is not None else "not built",
        "wall seconds": f"{seconds:.1f}",
    }


# -- entry point -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compat", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint to check (.safetensors or upstream .pt)")
    p.add_argument("--stable-config", help="the stable trainer's YAML")
    p.add_argument("--cycle-config", help="the cycle trainer's YAML")
    p.add_argument("--data-tokens", help="upstream-format token dir (*.npz)")
    p.add_argument("--data-latents", help="upstream-format latent dir (*.npy)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--report", default="compat-report", help="folder for compat-matrix.md / .json")
    p.add_argument("--kill-table", action="store_true", help="also run every planted defect and print the kill table")
    p.add_argument("--quiet", action="store_true", help="pass -q -q to pytest")
    p.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments (e.g. -k, -x)")
    return p


def pytest_arguments(args) -> list[str]:
    argv = [str(COMPAT_DIR), "-p", "no:cacheprovider", "-q", "--no-header", "-rN"]
    if args.quiet:
        argv.append("-q")
    for flag in ("checkpoint", "stable_config", "cycle_config", "data_tokens", "data_latents"):
        value = getattr(args, flag)
        if value:
            argv.append(f"--compat-{flag.replace('_', '-')}={Path(value).resolve()}")
    argv += [f"--compat-device={args.device}", f"--compat-batch-size={args.batch_size}",
             f"--compat-seq-len={args.seq_len}"]
    if not args.kill_table:
        argv += ["-m", "not mutants"]
    return argv + list(args.pytest_args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    collector = MatrixCollector()
    started = time.perf_counter()
    rc = pytest.main(pytest_arguments(args), plugins=[collector])
    seconds = time.perf_counter() - started
    if rc in (pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.USAGE_ERROR, pytest.ExitCode.INTERRUPTED):
        print(f"compat gate: pytest stopped with exit code {int(rc)}", file=sys.stderr)
        return 2
    rows = collector.rows()
    context = run_context(vars(args), seconds)
    print()
    print(render_text(rows))
    print(f"\nmodel: {context['model']}")
    if args.kill_table:
        print()
        print(render_kill_table(collector.kills))
    markdown = write_report(args.report, rows, context, collector)
    incompatible = [r.id for r in rows if r.verdict == INCOMPATIBLE]
    print(f"\nwrote {markdown} and {markdown.with_suffix('.json')}")
    if incompatible or collector.other_failures:
        print(f"compat gate: INCOMPATIBLE rows: {', '.join(incompatible) or '-'}; "
              f"other failures: {', '.join(collector.other_failures) or '-'}")
        return 1
    print("compat gate: no incompatible row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
