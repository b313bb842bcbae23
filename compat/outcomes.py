"""How a check ends when it does not simply pass or fail, and the gate's exit codes.

A check that cannot run says why, in one of three kinds, so that the matrix never shows a row as
checked when it was not, and the gate's exit code tells "incompatible" from "could not check":

- `not_applicable(reason)`: not run BY DESIGN on this setup (DDP rows on a CUDA device, a fixture
  that has nothing to refuse under the installed library). Does not change the exit code.
- `cannot_check(reason)`: the user's input made the check impossible (unreadable checkpoint, bad
  data, missing device). The gate exits 2.
- `blocked(reason)`: another row's failure made the check meaningless (a checkpoint that does not
  load, non-finite weights). That row is INCOMPATIBLE, so the gate exits 1.
- `control_failed(reason)`: a harness self-check failed (the model cannot see what the row compares,
  a measurement disagrees with its closed form, the reference's own loop does not match its replay):
  a "could not check" that makes the whole row NOT RUN, never a verdict on the user's trainer.

The kind travels as the prefix of pytest's skip message (it survives xdist and junitxml alike).
"""

from __future__ import annotations

from typing import NoReturn

import pytest

EXIT_OK = 0  # every applicable row ran, none INCOMPATIBLE
EXIT_INCOMPATIBLE = 1  # at least one row INCOMPATIBLE
EXIT_CANNOT_CHECK = 2  # usage error, unreadable or unsafe input, device missing, a row that should have run did not

NOT_APPLICABLE = "not applicable"
CANNOT_CHECK = "could not check"
BLOCKED = "blocked"
SKIP_KINDS = (NOT_APPLICABLE, CANNOT_CHECK, BLOCKED)
CONTROL_PREFIX = "harness control: "  # a could-not-check reason that comes from a failed harness control

# User properties a check records besides `measured.<name>` (see the `measure` fixture):
FIGURE_PREFIX = "figure."  # `figure.<name>`: one figure's data as JSON (compat-matrix.json; not measured text)
HEADLINE = "headline"  # names the measured value that is the row's finding when the row is OK


class GateInputError(Exception):
    """A problem with what the user passed (a file, a key, an option), and how to fix it.

    Args:
        problem: what is wrong, naming the file, key or option.
        fix: what to do about it (a concrete option, key or command).
    """

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem = " ".join(problem.split())
        self.fix = " ".join(fix.split())

    def one_line(self) -> str:
        return f"{self.problem} (fix: {self.fix})"


# What a session found, kept in pytest's stash for the matrix (the collector in `compat.gate` reads
# them, `compat/conftest.py` writes them: both import them from here).
CONTEXT_KEY = pytest.StashKey[object]()  # the CompatContext the session checked (the matrix header)
INPUT_ERROR_KEY = pytest.StashKey[GateInputError]()  # why it could not check, when it could not
PLANTED_SKIPPED_KEY = pytest.StashKey[int]()  # planted-defect tests not run on the user's inputs


def session_exit_status(exitstatus, error: GateInputError | None) -> int:
    """The exit status `pytest compat/` ends with: pytest's, or 2 when the inputs could not be used
    and nothing failed (conftest's `pytest_sessionfinish` sets it)."""
    if error is not None and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        return EXIT_CANNOT_CHECK
    return int(exitstatus)


def not_applicable(reason: str):
    pytest.skip(f"{NOT_APPLICABLE}: {reason}")


def cannot_check(reason: str):
    pytest.skip(f"{CANNOT_CHECK}: {reason}")


def blocked(reason: str):
    pytest.skip(f"{BLOCKED}: {reason}")


def control_failed(reason: str):
    """The harness's own control of a measurement failed: the row cannot judge (see the module docstring)."""
    pytest.skip(f"{CANNOT_CHECK}: {CONTROL_PREFIX}{reason}")


def is_control_failure(kind: str | None, reason: str) -> bool:
    return kind == CANNOT_CHECK and reason.startswith(CONTROL_PREFIX)


def skip_kind(message: str) -> tuple[str, str]:
    """(kind, reason) of a skip message; a plain `pytest.skip` is kind "skipped"."""
    for kind in SKIP_KINDS:
        if message.startswith(f"{kind}: "):
            return kind, message[len(kind) + 2 :]
    return "skipped", message


class Incompatible(AssertionError):
    """A check's finding against the trainer or config under test, said the way a researcher acts on
    it: what is wrong, in the trainer's or the config's own terms, and the fix, then the numbers.
    The row is INCOMPATIBLE and its line begins with `problem: fix.`

    Args:
        problem: what is wrong (e.g. "cycle_text conditions on an x0 whose error is amplified 6.4e4x").
        fix: what to change (a config key and value, or the trainer's code and how).
        details: the measured numbers behind it (optional).
    """

    def __init__(self, problem: str, fix: str, details: str = ""):
        self.problem = " ".join(problem.split())
        self.fix = " ".join(fix.split())
        self.details = " ".join(details.split())
        if not self.problem or not self.fix:
            raise ValueError("Incompatible needs both a problem and a fix")
        super().__init__(f"{self.problem}: {self.fix}." + (f" {self.details}" if self.details else ""))


def incompatible(problem: str, fix: str, details: str = "") -> NoReturn:
    """Fails the check with `Incompatible(problem, fix, details)`."""
    raise Incompatible(problem, fix, details)


def expect(condition: bool, problem: str, fix: str, details: str = "") -> None:
    """`incompatible(problem, fix, details)` unless `condition` holds."""
    if not condition:
        raise Incompatible(problem, fix, details)


COMPARISON_HEADERS = (
    "Scalars are not close!",
    "Tensor-likes are not close!",
    "Tensor-likes are not equal!",
    "Scalars are not equal!",
)


def comparison_details(message: str) -> str:
    """torch.testing.assert_close's message as one line of numbers, its header dropped."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return "; ".join(line for line in lines if line not in COMPARISON_HEADERS)


def expect_close(actual, expected, *, rtol: float, atol: float, problem: str, fix: str, details: str = "") -> None:
    """`torch.testing.assert_close(actual, expected, rtol, atol)`, failing as `Incompatible(problem, fix)`
    with the comparison's numbers after `details`."""
    import torch

    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as exc:
        numbers = comparison_details(str(exc))
        raise Incompatible(problem, fix, f"{details} {numbers}".strip()) from None
