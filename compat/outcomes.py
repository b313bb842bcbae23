"""How a check ends when it does not simply pass or fail, and the gate's exit codes.

A check that cannot run says why, in one of three kinds, so that the matrix never shows a row as
checked when it was not, and the gate's exit code tells "incompatible" from "could not check":

- `not_applicable(reason)`: not run BY DESIGN on this setup (DDP rows on a CUDA device, a fixture
  that has nothing to refuse under the installed library). Does not change the exit code.
- `cannot_check(reason)`: the user's input made the check impossible (unreadable checkpoint, bad
  data, missing device). The gate exits 2.
- `blocked(reason)`: another row's failure made the check meaningless (a checkpoint that does not
  load, non-finite weights). That row is INCOMPATIBLE, so the gate exits 1.

The kind travels as the prefix of pytest's skip message (it survives xdist and junitxml alike).
"""

from __future__ import annotations

import pytest

EXIT_OK = 0  # every applicable row ran, none INCOMPATIBLE
EXIT_INCOMPATIBLE = 1  # at least one row INCOMPATIBLE
EXIT_CANNOT_CHECK = 2  # usage error, unreadable or unsafe input, device missing, a row that should have run did not

NOT_APPLICABLE = "not applicable"
CANNOT_CHECK = "could not check"
BLOCKED = "blocked"
SKIP_KINDS = (NOT_APPLICABLE, CANNOT_CHECK, BLOCKED)

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


def not_applicable(reason: str):
    pytest.skip(f"{NOT_APPLICABLE}: {reason}")


def cannot_check(reason: str):
    pytest.skip(f"{CANNOT_CHECK}: {reason}")


def blocked(reason: str):
    pytest.skip(f"{BLOCKED}: {reason}")


def skip_kind(message: str) -> tuple[str, str]:
    """(kind, reason) of a skip message; a plain `pytest.skip` is kind "skipped"."""
    for kind in SKIP_KINDS:
        if message.startswith(f"{kind}: "):
            return kind, message[len(kind) + 2 :]
    return "skipped", message
