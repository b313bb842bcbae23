"""The one renderer of the matrix: the terminal summary, `compat-matrix.md` and `index.html`, all
from the matrix as `compat-matrix.json` holds it (the machine-readable source; nothing here measures).

    python -m compat.report compat-report/compat-matrix.json [--verbose] [--html DIR]

The summary fits a screen: the setup once in a header, one line per row (id, verdict, one finding
of at most `FINDING_WIDTH` characters), the causes that failed several rows said once with their fix,
and the exit line. A row's finding:

- INCOMPATIBLE: the first sentence of its failed check's message (pytest's own noise removed), or
  the number of a shared cause ("one cause, said once": a message that failed 2 or more rows leads
  the summary with its fix and the rows it made INCOMPATIBLE; rows failing for another reason are
  marked `!` so that they stand out);
- REVIEW: what to review (the measured value flagged for review, or the check that was skipped);
- OK: the value the row marked `headline=True`, else its first measured value past the control;
- NOT RUN: the kind and the reason (rows not selected by -k are counted on one line).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compat.rows import INCOMPATIBLE, NOT_RUN, OK, REVIEW

FINDING_WIDTH = 100
HEADER_WIDTH = 118
NOT_SELECTED = "not selected"
NOT_APPLICABLE = "not applicable"
CONTROL_VALUES = ("sensitivity", "semantic_model")  # every semantics row's control: in the header, not a finding
SHARED_CAUSE_MIN_ROWS = 2
# The facts of the setup, in the header's order, with the label they get there.
HEADER_FACTS = (
    ("checkpoint", "checkpoint"),
    ("model", "model"),
    ("semantic model", "semantics"),
    ("cycle trainer", "cycle trainer"),
    ("stable trainer", "stable trainer"),
    ("cycle config", "cycle config"),
    ("stable config", "stable config"),
    ("data", "data"),
    ("batch", "batch"),
    ("vocabulary", "vocabulary"),
    ("device", "device"),
    ("versions", "versions"),
    ("wall seconds", "wall seconds"),
)
# Messages whose fix this project knows better than the message says.
KNOWN_FIXES = (
    (
        "Using a target size",
        "give the latent prediction the target's shape before the MSE ([B,1,D] against [B,D] broadcasts to [B,B,D])",
    ),
)
_ACTION_WORDS = ("use ", "set ", "pass ", "give ", "keep ", "re-record", "fix ", "install ", "remove ", "add ")
# The harness's own exception names (and a plain assert's) say nothing to the user.
_EXCEPTION_PREFIX = re.compile(r"^(?:[\w.]+\.)?(?:AssertionError|CandidateError|Incompatible|Failed)(?::\s*|$)")
_TORCH_CLOSE_NOISE = re.compile(r"\s*(?:Scalars|Tensor-likes) are not (?:close|equal)!.*$")
_SENTENCE_END = re.compile(r"(?<=[^\s.][^\s.])[.!?](?=\s+[A-Z(\[])")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.IGNORECASE)
# An exception named inside a message ("raised AttributeError in its step: ...", "KeyError: ..."): the
# innermost one is the cause, whichever check or wrapper (DDP worker, compiled run, loop) reported it.
_TYPED = re.compile(r"\b([A-Z]\w*(?:Error|Exception|Warning))\b(?: [^:]{0,40})?: ")
_WRAPPERS = ("AssertionError", "CandidateError")
_LOCATION = re.compile(r" at (\S+:\d+) in (\S+)$")
_OBJECT_OF = re.compile(r"'\w+' object")
_RAISED = re.compile(r"^the (\w+) trainer (\S+) raised (\w+) in its (\w+): (.*?)(?: at (\S+:\d+) in (\S+))?$")


def _wrap(text: str, width: int, **kwargs) -> list[str]:
    """textwrap.wrap that never splits an option like --mask-token-id at its hyphens."""
    return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False, **kwargs)


# -- findings ----------------------------------------------------------------------------------------
def clean_message(message: str, keep_details: bool = False) -> str:
    """A failure message without pytest's noise: the `AssertionError: ` prefix, a rewritten
    `assert ...` explanation and (unless `keep_details`) torch's `Scalars are not close!` block, on
    one line.

    Args:
        message: a check's failure message as pytest reported it (one line or several).
        keep_details: keep torch's comparison details (the verbose text and the page show them).
    """
    lines = [line.strip() for line in str(message).splitlines()]
    kept = []
    for i, line in enumerate(lines):
        if i > 0 and line.startswith("assert "):
            break  # pytest's rewritten comparison and its `+ where` lines follow the message
        if i > 0 and line.startswith(("+", "where ", "and ")):
            continue  # pytest's explanation of a bare `assert` (no message)
        kept.append(line)
    text = " ".join(" ".join(kept).split())
    text = _EXCEPTION_PREFIX.sub("", text, count=1)
    if not keep_details:
        text = _TORCH_CLOSE_NOISE.sub("", text)
    return text.strip() or " ".join(str(message).split())


def shorten(text: str, width: int = FINDING_WIDTH) -> str:
    """`text` on one line, cut at a word boundary to at most `width` characters ("..." marks a cut).

    Args:
        text: any text.
        width: the most characters kept, the "..." included.
    """
    text = " ".join(str(text).split())
    if len(text) <= width:
        return text
    cut = text[: width - 3]
    space = cut.rfind(" ")
    if space > width // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "..."


def first_sentence(message: str, width: int = FINDING_WIDTH) -> str:
    """The first sentence of a failure message, cleaned and shortened to `width`.

    Args:
        message: a check's failure message.
        width: the most characters kept.
    """
    text = clean_message(message)
    end = _SENTENCE_END.search(text)
    if end is not None:
        text = text[: end.start()]
    text = text.rstrip(".")
    if len(text) <= width:
        return text
    return _claim_and_action(text, width) or shorten(text, width)


_LEADING_CLAUSE = re.compile(r"^(?:with|when|if|under|in|at) [^,]{0,80}, ", re.IGNORECASE)
ACTION_WIDTH = 45


def _claim_and_action(text: str, width: int) -> str | None:
    """A long "claim: action" sentence kept as both: the action's first clause, and the claim
    without a leading condition ("with X and Y, ..."; the header says the setup); None when the
    sentence has no action or the claim would lose more than its tail."""
    claim, sep, action = text.rpartition(": ")
    if not sep or not action.lower().startswith(_ACTION_WORDS):
        return None
    action = shorten(re.split(r",? or |; ", action, maxsplit=1)[0], ACTION_WIDTH)
    claim = _LEADING_CLAUSE.sub("", claim)
    budget = width - len(action) - 2
    if budget < width // 2:
        return None
    return f"{shorten(claim, budget)}: {action}"


def cause_key(message: str) -> str:
    """What two failures must share to be one cause: the innermost exception the message names
    (its type and message; where it was raised and the class it was raised on left out), else the
    whole cleaned message; numbers masked (a batch size or a step count differs between rows, the
    cause does not).

    Args:
        message: a failed check's message.
    """
    text = clean_message(message)
    typed = [m for m in _TYPED.finditer(text) if m.group(1) not in _WRAPPERS]
    if typed:
        core = _LOCATION.sub("", text[typed[-1].end() :])
        text = f"{typed[-1].group(1)}: {_OBJECT_OF.sub('#', core)}"
    return _NUMBER.sub("#", text)


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _failed(row: dict) -> list[dict]:
    return [t for t in row.get("tests", []) if t.get("outcome") in ("failed", "error")]


def _check_name(test: dict) -> str:
    name = test.get("nodeid", "").split("::")[-1]
    return name[name.index("[") + 1 : -1] if "[" in name else name


def _measured(row: dict, skip_controls: bool = True) -> list[tuple[str, object]]:
    out = []
    for test in row.get("tests", []):
        for name, value in test.get("measured", []):
            if not (skip_controls and name in CONTROL_VALUES):
                out.append((name, value))
    return out


@dataclass
class Cause:
    """One failure message behind several INCOMPATIBLE rows, said once."""

    number: int
    message: str  # cleaned, whole
    label: str  # the short form each of its rows shows
    where: str | None  # file:line in function, when a trainer raised
    fix: str
    rows: list[str] = field(default_factory=list)


@dataclass
class Summary:
    """What the summary, the Markdown and the page say, computed once from the matrix."""

    findings: dict[str, str]
    causes: list[Cause]
    cause_of: dict[str, int]  # row id -> cause number, for rows that failed only on shared causes
    standout: list[str]  # INCOMPATIBLE rows that failed for a reason of their own while causes exist
    incompatible: list[str]
    review: list[str]
    not_selected: list[str]
    not_applicable: list[str]
    not_run: list[str]  # NOT RUN for another reason (could not check, blocked)
    exit_code: int | None
    exit_line: str


def _fix_for(message: str, raised: re.Match | None) -> str:
    for needle, fix in KNOWN_FIXES:
        if needle in message:
            return fix
    if raised is not None:
        place = " at that line" if raised.group(6) else ""
        return f"fix the {raised.group(1)} trainer's {raised.group(4)}{place}: every row listed fails on this one error"
    tail = message.rsplit(": ", 1)[-1] if ": " in message else ""
    if tail.lower().startswith(_ACTION_WORDS):
        return tail.rstrip(".")
    return "fix this first: every row listed fails on it"


def _make_cause(number: int, message: str, rows: list[str]) -> Cause:
    raised = _RAISED.match(message)
    if raised is not None:
        label = f"{raised.group(1)} trainer raised {raised.group(3)} in its {raised.group(4)}"
        where = f"{raised.group(6)} in {raised.group(7)}" if raised.group(6) else None
        message = _LOCATION.sub("", message)  # said on its own line
    else:
        label, where = first_sentence(message, 60), None
    return Cause(number, message, label, where, _fix_for(message, raised), rows)


def _causes(rows: list[dict]) -> list[Cause]:
    """Failure messages that failed SHARED_CAUSE_MIN_ROWS or more rows, most rows first."""
    rows_of: dict[str, list[str]] = {}
    message_of: dict[str, str] = {}
    for row in rows:
        if row["verdict"] != INCOMPATIBLE:
            continue
        for test in _failed(row):
            key = cause_key(test.get("message", ""))
            message = clean_message(test.get("message", ""))
            if key not in message_of or (_RAISED.match(message) and not _RAISED.match(message_of[key])):
                message_of[key] = message  # prefer the trainer's own "raised X in its step" form
            if row["id"] not in rows_of.setdefault(key, []):
                rows_of[key].append(row["id"])
    shared = [key for key, ids in rows_of.items() if len(ids) >= SHARED_CAUSE_MIN_ROWS]
    shared.sort(key=lambda key: -len(rows_of[key]))
    return [_make_cause(i + 1, message_of[key], rows_of[key]) for i, key in enumerate(shared)]


def row_finding(row: dict, causes: list[Cause], problem: str | None = None) -> tuple[str, int | None]:
    """A row's one finding (at most FINDING_WIDTH characters) and the shared cause it failed on
    alone (None when it failed for a reason of its own, or did not fail).

    Args:
        row: one row of compat-matrix.json.
        causes: the shared causes (`summarize`).
        problem: the run's input problem (exit 2), which NOT RUN rows then point at.
    """
    verdict = row["verdict"]
    if verdict == INCOMPATIBLE:
        failed = _failed(row)
        key_to_cause = {cause_key(c.message): c for c in causes}
        own = [t for t in failed if cause_key(t.get("message", "")) not in key_to_cause]
        if failed and not own:
            cause = key_to_cause[cause_key(failed[0].get("message", ""))]
            return shorten(f"[cause {cause.number}] {cause.label}"), cause.number
        if not failed:
            return shorten(row.get("measured", "")), None
        more = len({cause_key(t.get("message", "")) for t in failed}) - 1
        suffix = f" (+{more} more)" if more else ""
        return first_sentence(own[0].get("message", ""), FINDING_WIDTH - len(suffix)) + suffix, None
    if verdict == NOT_RUN:
        kind = row.get("not_run_kind") or ""
        if kind == NOT_SELECTED:
            return "not selected (-k)", None
        reason = row.get("measured", "").removeprefix(f"{kind}: ")
        tests = [t for t in row.get("tests", []) if t.get("skip_kind") == kind]
        if tests:
            reason = tests[0].get("message", reason)
        if problem and (problem in reason or not tests):
            return shorten(f"{kind}: see the problem"), None
        return shorten(f"{kind}: {reason}"), None
    if verdict == REVIEW:
        flagged = [name for t in row.get("tests", []) for name in t.get("review", [])]
        values = dict(_measured(row, skip_controls=False))
        if flagged:
            name = flagged[0]
            more = len(dict.fromkeys(flagged)) - 1
            suffix = f" (+{more} more)" if more else ""
            value = values.get(name)
            text = f"{name}: {_format_value(value)}" if value not in (None, "") else name
            return shorten(text, FINDING_WIDTH - len(suffix)) + suffix, None
        skipped = [
            t for t in row.get("tests", []) if t.get("outcome") == "skipped" and t.get("skip_kind") != NOT_APPLICABLE
        ]
        if skipped:
            t = skipped[0]
            return shorten(f"skipped {_check_name(t)} ({t.get('skip_kind')}: {t.get('message', '')})"), None
        return shorten(row.get("measured", "")), None
    headline = [name for t in row.get("tests", []) for name in t.get("headline", [])]
    values = dict(_measured(row, skip_controls=False))
    if headline and headline[0] in values:
        return shorten(f"{headline[0]} = {_format_value(values[headline[0]])}"), None
    measured = _measured(row)
    if measured:
        name, value = measured[0]
        return shorten(f"{name} = {_format_value(value)}"), None
    return "every check passed", None


def summarize(matrix: dict) -> Summary:
    """Findings, shared causes, the counts and the exit line, from the matrix.

    Args:
        matrix: compat-matrix.json as a dict.
    """
    rows = matrix.get("rows", [])
    causes = _causes(rows)
    error = matrix.get("problem") or matrix.get("input_error") or None
    problem = error.get("problem") if error else None
    findings, cause_of = {}, {}
    for row in rows:
        finding, number = row_finding(row, causes, problem)
        findings[row["id"]] = finding
        if number is not None:
            cause_of[row["id"]] = number
    by_verdict = {v: [r["id"] for r in rows if r["verdict"] == v] for v in (OK, REVIEW, INCOMPATIBLE, NOT_RUN)}
    not_run = [r for r in rows if r["verdict"] == NOT_RUN]
    summary = Summary(
        findings=findings,
        causes=causes,
        cause_of=cause_of,
        standout=[r for r in by_verdict[INCOMPATIBLE] if causes and r not in cause_of],
        incompatible=by_verdict[INCOMPATIBLE],
        review=by_verdict[REVIEW],
        not_selected=[r["id"] for r in not_run if r.get("not_run_kind") == NOT_SELECTED],
        not_applicable=[r["id"] for r in not_run if r.get("not_run_kind") == NOT_APPLICABLE],
        not_run=[r["id"] for r in not_run if r.get("not_run_kind") not in (NOT_SELECTED, NOT_APPLICABLE)],
        exit_code=matrix.get("exit_code"),
        exit_line="",
    )
    summary.exit_line = _exit_line(summary, len(rows))
    return summary


LISTED_MAX = 6  # row ids named in one part of the exit line; the rest counted


def _names(ids: list[str]) -> str:
    return ", ".join(ids[:LISTED_MAX]) + (f" and {len(ids) - LISTED_MAX} more" if len(ids) > LISTED_MAX else "")


def _listed(label: str, ids: list[str]) -> str:
    return f"{len(ids)} {label}: {_names(ids)}"


def _exit_line(s: Summary, total: int) -> str:
    code = s.exit_code
    parts = []
    if code == 2 and not s.incompatible:
        unrun = s.not_run
        if len(unrun) == total:
            parts.append("could not check: no row ran")
        else:
            parts.append("could not check" + (f": {_listed('rows not run', unrun)}" if unrun else ""))
        return "compat gate: " + "; ".join(parts) + " (exit 2)"
    if s.incompatible:
        if s.causes:
            from_causes = ", ".join(f"{len(c.rows)} from cause [{c.number}]" for c in s.causes)
            own = f"; {_listed('for another reason', s.standout)}" if s.standout else ""
            parts.append(f"{len(s.incompatible)} rows INCOMPATIBLE ({from_causes}{own})")
        else:
            parts.append(f"INCOMPATIBLE rows: {_names(s.incompatible)}")
    else:
        parts.append("no incompatible row")
    if s.review:
        parts.append(_listed("to review", s.review))
    if s.not_run:
        parts.append(_listed("not run", s.not_run))
    if s.not_selected:
        ran = total - len(s.not_selected)
        parts.append(f"{len(s.not_selected)} of {total} rows not selected (-k; {ran} ran)")
    elif code == 0:
        parts.insert(0, "every applicable row ran")
    if s.not_applicable:
        parts.append(_listed("not applicable", s.not_applicable))
    tail = f" (exit {code})" if code is not None else ""
    return "compat gate: " + "; ".join(parts) + tail


# -- terminal ----------------------------------------------------------------------------------------
def setup_facts(context: dict, compact: bool) -> list[tuple[str, str]]:
    """(label, value) of the setup, in HEADER_FACTS order. Compact (the terminal): the trainers
    without their step/draws protocol, data and batch on one line, no vocabulary and no timings
    but the wall time (--verbose and the page have them all).

    Args:
        context: the matrix's context.
        compact: the terminal's short form.
    """
    known = {key for key, _ in HEADER_FACTS}
    facts = [(label, str(context[key])) for key, label in HEADER_FACTS if context.get(key)]
    facts += [(key, str(value)) for key, value in context.items() if key not in known and value]
    if not compact:
        return facts
    out = []
    for label, value in facts:
        if label in ("vocabulary", "setup seconds", "batch"):
            continue
        if label.endswith("trainer"):
            value = value.split("; ", 1)[0]  # the class and its file @ commit; the protocol is in the page
        if label == "data" and context.get("batch"):
            value = f"{value}, batch {context['batch']}"
        out.append((label, value))
    return out


def render_header(context: dict, width: int = HEADER_WIDTH, compact: bool = True) -> list[str]:
    """The setup facts, once: `label  value` lines wrapped to `width`.

    Args:
        context: the matrix's context.
        width: the widest line.
        compact: the terminal's short form (`setup_facts`).
    """
    facts = setup_facts(context, compact)
    label_w = max([len(label) for label, _ in facts] + [10])
    lines = []
    for label, value in facts:
        wrapped = _wrap(str(value), width - label_w - 2) or [""]
        lines.append(f"{label:<{label_w}}  {wrapped[0]}")
        lines += [f"{'':<{label_w}}  {more}" for more in wrapped[1:]]
    return lines


def render_causes(summary: Summary, width: int = HEADER_WIDTH) -> list[str]:
    """Each shared cause once: its message, where it was raised, its fix and the rows it failed.

    Args:
        summary: `summarize`'s result.
        width: the widest line.
    """
    if not summary.causes:
        return []
    n_rows = sum(len(c.rows) for c in summary.causes)
    head = "1 cause" if len(summary.causes) == 1 else f"{len(summary.causes)} causes"
    lines = [f"{head} made {n_rows} rows INCOMPATIBLE (said once here):"]
    for c in summary.causes:
        lines += _wrap(c.message, width, initial_indent=f"  [{c.number}] ", subsequent_indent="      ")
        if c.where:
            lines += _wrap(f"where: {c.where}", width, initial_indent="      ", subsequent_indent="        ")
        lines += _wrap(f"fix: {c.fix}", width, initial_indent="      ", subsequent_indent="        ")
        lines += _wrap(
            f"rows ({len(c.rows)}): {', '.join(c.rows)}", width, initial_indent="      ", subsequent_indent="        "
        )
    if summary.standout:
        lines.append(f"  and {_listed('INCOMPATIBLE for another reason (marked !)', summary.standout)}")
    return lines


def render_rows(matrix: dict, summary: Summary) -> list[str]:
    """One line per row (id, verdict, finding); rows not selected by -k on one line at the end.

    Args:
        matrix: compat-matrix.json as a dict.
        summary: `summarize(matrix)`.
    """
    rows = matrix.get("rows", [])
    shown = [r for r in rows if r["id"] not in summary.not_selected]
    id_w = max([len(r["id"]) for r in rows] + [3])
    lines = [f"  {'row':<{id_w}}  {'verdict':<12}  finding"]
    if len(shown) > 1 and all(r["verdict"] == NOT_RUN for r in shown):
        if len({summary.findings[r["id"]] for r in shown}) == 1:  # one reason for all: said once
            return lines + [f"  {'every row':<{id_w}}  {NOT_RUN:<12}  {summary.findings[shown[0]['id']]}"]
    for r in shown:
        mark = "!" if r["id"] in summary.standout else " "
        lines.append(f"{mark} {r['id']:<{id_w}}  {r['verdict']:<12}  {summary.findings[r['id']]}")
    if summary.not_selected:
        lines += _wrap(
            f"{len(summary.not_selected)} rows not selected (-k): {', '.join(summary.not_selected)}",
            HEADER_WIDTH,
            initial_indent="  ",
            subsequent_indent="    ",
        )
    return lines


def render_problem_block(matrix: dict) -> str | None:
    """The exit-2 block (problem and fix), for stderr; None when the run had no problem.

    Args:
        matrix: compat-matrix.json as a dict.
    """
    error = matrix.get("problem") or matrix.get("input_error")
    if not error:
        return None
    return "\n".join(
        [
            "compat gate: could not check (exit 2)",
            *_wrap(f"problem: {error['problem']}", 100, subsequent_indent="  "),
            *_wrap(f"fix: {error['fix']}", 100, subsequent_indent="  "),
        ]
    )


def render_measured(matrix: dict, width: int = 60) -> str:
    """Every row's full measured text (the gate's --verbose table).

    Args:
        matrix: compat-matrix.json as a dict.
        width: the measured column's width.
    """
    rows = matrix.get("rows", [])
    id_w = max([22] + [len(r["id"]) for r in rows])
    topic_w = max([34] + [len(r["topic"]) for r in rows])
    header = f"{'row':<{id_w}} {'topic':<{topic_w}} {'verdict':<13} measured"
    lines = [header, "-" * len(header)]
    for r in rows:
        wrapped = _wrap(r.get("measured") or "-", width) or ["-"]
        lines.append(f"{r['id']:<{id_w}} {r['topic']:<{topic_w}} {r['verdict']:<13} {wrapped[0]}")
        lines.extend(f"{'':<{id_w}} {'':<{topic_w}} {'':<13} {more}" for more in wrapped[1:])
    return "\n".join(lines)


def render_terminal(matrix: dict, verbose: bool = False) -> str:
    """The summary that fits a screen: header, shared causes, one line per row, then (verbose)
    the full measured table. The exit line and the problem block are printed by the caller.

    Args:
        matrix: compat-matrix.json as a dict.
        verbose: also print every row's full measured text.
    """
    summary = summarize(matrix)
    context = matrix.get("context", {})
    lines = ["compat matrix: stable vs cycle trainer", *render_header(context, compact=not verbose), ""]
    causes = render_causes(summary)
    if causes:
        lines += [*causes, ""]
    lines += render_rows(matrix, summary)
    if verbose:
        lines += ["", render_measured(matrix)]
    return "\n".join(lines)


# -- Markdown ----------------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(matrix: dict) -> str:
    """compat-matrix.md: the setup, the matrix as the review lays it out (topic, stable, cycle,
    verdict, finding), the shared causes, the exit line and every row's measured values.

    Args:
        matrix: compat-matrix.json as a dict.
    """
    summary = summarize(matrix)
    out = ["# Compatibility matrix: stable vs cycle trainer", ""]
    out += [f"- {k}: {v}" for k, v in matrix.get("context", {}).items()]
    out += ["", f"**{summary.exit_line}**", ""]
    if summary.causes:
        for c in summary.causes:
            out.append(f"- **cause [{c.number}]** ({len(c.rows)} rows: {', '.join(c.rows)}): {c.message}")
            out += [f"  - where: {c.where}"] if c.where else []
            out.append(f"  - fix: {c.fix}")
        out.append("")
    error = matrix.get("problem") or matrix.get("input_error")
    if error:
        out += [f"**Could not check**: {error['problem']}", "", f"**Fix**: {error['fix']}", ""]
    out += [
        "Each row's checks are in `compat/test_row_<row>.py`; the page `index.html` beside this file has the figures.",
        "",
        "| Row | Topic | Stable | Cycle | Verdict | Finding |",
        "|---|---|---|---|---|---|",
    ]
    for r in matrix.get("rows", []):
        cells = [f"`{r['id']}`", r["topic"], r["stable"], r["cycle"], f"**{r['verdict']}**", summary.findings[r["id"]]]
        out.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    out += ["", "## Measured", ""]
    for r in matrix.get("rows", []):
        out.append(f"- `{r['id']}` ({r['verdict']}): {_md_cell(r.get('measured') or '-')}")
    return "\n".join(out) + "\n"


# -- HTML --------------------------------------------------------------------------------------------
VERDICT_STYLE = {  # class, symbol (the verdict is spelled out next to it: readable in grey-scale)
    OK: ("ok", "\u2713"),
    REVIEW: ("review", "!"),
    INCOMPATIBLE: ("incompatible", "\u2717"),
    NOT_RUN: ("notrun", "\u2013"),
}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px;color:#111;
 max-width:1400px;line-height:1.35}
h1{font-size:22px;margin:0 0 6px} h2{font-size:18px;margin:28px 0 8px}
.exit{font-size:16px;font-weight:600;padding:8px 12px;border-radius:4px;border:2px solid #444;display:inline-block}
.exit-0{background:#e6f4ea;border-color:#1e7b34}.exit-1{background:#fde7e7;border-color:#b3261e}
.exit-2{background:#fff4d6;border-color:#8a6100}
dl.setup{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:13px;margin:12px 0;color:#333}
dl.setup dt{font-weight:600} dl.setup dd{margin:0;word-break:break-word}
details.setup-more{font-size:13px;margin:-6px 0 10px} details.setup-more summary{color:#1a4d8f;cursor:pointer}
.problem,.cause{border-left:6px solid #b3261e;background:#fdf1f0;padding:8px 12px;margin:10px 0;font-size:14px}
.problem{border-color:#8a6100;background:#fff8e6}
table.matrix{border-collapse:collapse;width:100%;font-size:14px}
table.matrix th{text-align:left;background:#eee;border-bottom:2px solid #444;padding:6px}
table.matrix td{border-bottom:1px solid #ccc;padding:6px;vertical-align:top}
td.id code{font-size:13px;font-weight:600}
.badge{display:inline-block;padding:2px 8px;border-radius:3px;font-weight:700;white-space:nowrap;font-size:13px}
.v-ok .badge{background:#e6f4ea;color:#0d5a22;border:1px solid #1e7b34}
.v-review .badge{background:#fff4d6;color:#6b4b00;border:2px dashed #8a6100}
.v-incompatible .badge{background:#b3261e;color:#fff;border:2px solid #5c0f0a}
.v-notrun .badge{background:#f1f1f1;color:#444;border:1px dotted #666;font-style:italic;font-weight:400}
tr.v-incompatible td{background:#fdf1f0} tr.standout td.finding{font-weight:700}
td.finding{min-width:260px}
details{font-size:13px} details summary{cursor:pointer;color:#1a4d8f}
table.checks{border-collapse:collapse;margin:6px 0 4px;width:100%}
table.checks td,table.checks th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
table.checks td.measured{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;word-break:break-word}
.st-failed,.st-error{color:#b3261e;font-weight:700}.st-skipped{color:#555;font-style:italic}
figure{margin:18px 0;border:1px solid #ccc;padding:10px;max-width:1100px}
figure img{display:block;max-width:100%;height:auto}
figcaption{font-size:14px;margin-top:6px;color:#222}
.figures-missing{font-size:13px;color:#555}
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _html_header(matrix: dict, summary: Summary) -> list[str]:
    code = summary.exit_code
    out = [
        "<header>",
        "<h1>Compatibility matrix: stable vs cycle trainer</h1>",
        f'<p class="exit exit-{_e(code)}" id="exit-line">{_e(summary.exit_line)}</p>',
        '<dl class="setup">',
    ]
    context = matrix.get("context", {})
    top = dict(setup_facts(context, compact=True))
    out += [f"<dt>{_e(label)}</dt><dd>{_e(value)}</dd>" for label, value in top.items()]
    out += ["</dl>", '<details class="setup-more"><summary>the whole setup</summary><dl class="setup">']
    out += [f"<dt>{_e(label)}</dt><dd>{_e(value)}</dd>" for label, value in setup_facts(context, compact=False)]
    out += ["</dl></details>", "</header>"]
    error = matrix.get("problem") or matrix.get("input_error")
    if error:
        out.append(
            f'<div class="problem" role="alert"><b>Could not check (exit 2).</b> {_e(error["problem"])}'
            f"<br><b>Fix:</b> {_e(error['fix'])}</div>"
        )
    for c in summary.causes:
        where = f"<br><b>Where:</b> {_e(c.where)}" if c.where else ""
        out.append(
            f'<div class="cause" id="cause-{c.number}"><b>Cause [{c.number}]</b> made {len(c.rows)} rows '
            f"INCOMPATIBLE ({_e(', '.join(c.rows))}): {_e(c.message)}{where}<br><b>Fix:</b> {_e(c.fix)}</div>"
        )
    return out


def _finding_html(finding: str, cause: int | None) -> str:
    """The finding; a shared cause's number links to where the cause is said."""
    if cause is None:
        return _e(finding)
    tag = f"[cause {cause}]"
    return f'<a href="#cause-{cause}">{_e(tag)}</a>{_e(finding.removeprefix(tag))}'


def _check_rows(row: dict) -> list[str]:
    out = ['<table class="checks"><tr><th>check</th><th>status</th><th>measured / message</th><th>test</th></tr>']
    for t in row.get("tests", []):
        status = t.get("outcome", "")
        if status == "skipped":
            status = f"skipped ({t.get('skip_kind')})"
        measured = "; ".join(f"{n}={_format_value(v)}" for n, v in t.get("measured", []) if n != "semantic_model")
        message = clean_message(t["message"]) if t.get("message") else ""
        cell = "<br>".join(_e(x) for x in (message, measured) if x) or "-"
        nodeid = t.get("nodeid", "")
        path, _, test = nodeid.partition("::")
        out.append(
            f'<tr class="check"><td>{_e(_check_name(t))}</td><td class="st-{_e(t.get("outcome", ""))}">{_e(status)}</td>'
            f'<td class="measured">{cell}</td><td><code>{_e(path)}</code><br><code>{_e(test)}</code></td></tr>'
        )
    out.append("</table>")
    return out


def render_html(matrix: dict, figures: list | None = None) -> str:
    """index.html: one self-contained page (no script, no font or image fetched): the exit line and
    setup, the causes or the problem, the matrix (each row opens to its checks), then the figures.

    Args:
        matrix: compat-matrix.json as a dict.
        figures: `compat.figures.Figure`s, drawn from the matrix (None: none drawn).
    """
    summary = summarize(matrix)
    figures = figures or []
    figures_of: dict[str, list] = {}
    for f in figures:
        figures_of.setdefault(f.row, []).append(f)
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # No request may leave the page: nothing is loaded from anywhere, not even from this folder.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">",
        f"<title>mmdit-compat: {_e(summary.exit_line)}</title>",
        f"<style>{CSS}</style></head><body>",
        *_html_header(matrix, summary),
        '<h2 id="matrix">Matrix</h2>',
        '<table class="matrix" id="matrix-table"><thead><tr><th scope="col">Row</th><th scope="col">Topic</th>'
        '<th scope="col">Stable</th><th scope="col">Cycle</th><th scope="col">Verdict</th>'
        '<th scope="col">Finding</th></tr></thead><tbody>',
    ]
    for r in matrix.get("rows", []):
        css, symbol = VERDICT_STYLE.get(r["verdict"], ("notrun", "?"))
        standout = " standout" if r["id"] in summary.standout else ""
        n = len(r.get("tests", []))
        counts: dict[str, int] = {}
        for t in r.get("tests", []):
            counts[t.get("outcome", "")] = counts.get(t.get("outcome", ""), 0) + 1
        tally = ", ".join(f"{v} {k}" for k, v in counts.items())
        links = "".join(
            f' &middot; <a href="#fig-{_e(f.id)}">figure: {_e(f.title)}</a>' for f in figures_of.get(r["id"], [])
        )
        out += [
            f'<tr class="row v-{css}{standout}" id="row-{_e(r["id"])}" data-row="{_e(r["id"])}" '
            f'data-verdict="{_e(r["verdict"])}">',
            f'<td class="id"><code>{_e(r["id"])}</code></td><td>{_e(r["topic"])}</td><td>{_e(r["stable"])}</td>'
            f"<td>{_e(r['cycle'])}</td>",
            f'<td class="verdict"><span class="badge" aria-label="verdict {_e(r["verdict"])}">'
            f'<span aria-hidden="true">{symbol} </span>{_e(r["verdict"])}</span></td>',
            f'<td class="finding">{_finding_html(summary.findings[r["id"]], summary.cause_of.get(r["id"]))}',
            *(
                [
                    f"<details><summary>{n} check{'s' if n != 1 else ''} ({tally})</summary>{links}",
                    *_check_rows(r),
                    f"<p>all measured: <code>{_e(r.get('measured') or '-')}</code></p>" if r.get("measured") else "",
                    "</details>",
                ]
                if n
                else []
            ),
            "</td></tr>",
        ]
    out.append("</tbody></table>")
    out.append('<h2 id="figures">Figures</h2>')
    if not figures:
        out.append('<p class="figures-missing">No figure: no row that draws one ran.</p>')
    for f in figures:
        data = base64.b64encode(f.svg.encode()).decode()
        out += [
            f'<figure id="fig-{_e(f.id)}" data-row="{_e(f.row)}">',
            f'<img src="data:image/svg+xml;base64,{data}" alt="{_e(f.title)}: {_e(f.caption)}" '
            f'width="{f.width}" height="{f.height}">',
            f'<figcaption><b>{_e(f.title)}</b> (row <a href="#row-{_e(f.row)}"><code>{_e(f.row)}</code></a>). '
            f"{_e(f.caption)}</figcaption>",
            "</figure>",
        ]
    out += ["</body></html>"]
    return "\n".join(line for line in out if line) + "\n"


# -- files -------------------------------------------------------------------------------------------
def annotate(matrix: dict) -> dict:
    """The matrix with each row's finding and the summary (causes, counts, exit line) added, as
    compat-matrix.json stores them for machine readers.

    Args:
        matrix: the matrix (`compat.gate.matrix_of`), changed in place and returned.
    """
    summary = summarize(matrix)
    for r in matrix.get("rows", []):
        r["finding"] = summary.findings[r["id"]]
    matrix["summary"] = {
        "exit_line": summary.exit_line,
        "causes": [asdict(c) for c in summary.causes],
        "review": summary.review,
        "incompatible": summary.incompatible,
        "not_selected": summary.not_selected,
    }
    return matrix


def write_report(folder: str | Path, matrix: dict, html_page: bool = True) -> dict[str, Path]:
    """compat-matrix.json, compat-matrix.md and index.html (with its figures) in `folder`.

    Args:
        folder: the report folder (created).
        matrix: the matrix (`compat.gate.matrix_of`).
        html_page: also draw the figures and write index.html.
    Returns:
        the paths written, by kind ("json", "markdown", "html").
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    matrix = annotate(matrix)
    paths = {"json": folder / "compat-matrix.json", "markdown": folder / "compat-matrix.md"}
    paths["json"].write_text(json.dumps(matrix, indent=2, default=str))
    paths["markdown"].write_text(render_markdown(matrix))
    if html_page:
        from compat.figures import draw_figures

        paths["html"] = folder / "index.html"
        paths["html"].write_text(render_html(matrix, draw_figures(matrix)))
    return paths


def main(argv: list[str] | None = None) -> int:
    """Renders a saved compat-matrix.json again: the summary on stdout, and the page with --html.

    Args:
        argv: the command line (default: sys.argv[1:]).
    """
    parser = argparse.ArgumentParser(prog="python -m compat.report", description=main.__doc__.split("\n")[0])
    parser.add_argument("matrix", help="a compat-matrix.json written by the gate")
    parser.add_argument("--verbose", action="store_true", help="also print every row's full measured text")
    parser.add_argument("--html", metavar="DIR", help="write compat-matrix.md and index.html to DIR")
    args = parser.parse_args(argv)
    try:
        matrix = json.loads(Path(args.matrix).read_text())
        if not isinstance(matrix, dict) or not isinstance(matrix.get("rows"), list):
            raise ValueError("it holds no list of rows")
    except (OSError, ValueError) as exc:
        print(f"compat.report: cannot read {args.matrix} as a compat matrix: {exc}", file=sys.stderr)
        return 2
    print(render_terminal(matrix, verbose=args.verbose))
    block = render_problem_block(matrix)
    if block:
        print(block, file=sys.stderr)
    print(summarize(matrix).exit_line)
    if args.html:
        paths = write_report(args.html, matrix)
        print(f"wrote {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
