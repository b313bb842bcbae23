"""Teeth: every planted defect in `compat.mutants` is caught by the check meant for it.

Each case first runs that check unmutated (the control: it must pass, or the kill would prove
nothing; a pass of the same check with the same trainer subjects earlier in the session, e.g. by
its row's own test, is that control), then applies one mutant and runs the check again: it must fail the way the mutant says
(its own assertion; for a defect that makes the trainer raise, the check reporting that; for a defect in
the reference the gate measures against, the row's harness control failing: could not check, exit 2). An
error of another kind, a skip or a pass is not a catch. Every case runs twice: with the built-in
cycle trainer, and with the same class given as a SPEC through the plug-in path
(`--cycle-trainer`), so that both paths are shown to have the same teeth. A check's outcome is
decided by the check and by how it drives the trainers (class, step and draws protocol, draw
names, role: `CompatContext.check_key`): when the SPEC yields a subject driven exactly as the
built-in one, that equality is what the plug-in case shows, and the mutated run of the built-in
case (same defect, same key) is its verdict; a SPEC that yields anything else (another class, a
protocol read differently) runs the check again. The results form the kill table the gate prints
with `--kill-table`; every row has at least one mutant (checked).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
import importlib
import json
import warnings

import pytest

from compat.mutants import ASSERTION, CONTROL, MUTANTS, REVIEWED, TRAINER_ERROR, fresh_runs
from compat.outcomes import CONTROL_PREFIX, Incompatible
from compat.rows import ROWS
from compat.subjects import CandidateError, Subject
from compat.trainer_spec import TrainerSpec

pytestmark = pytest.mark.mutants

BUILT_IN_SPEC = "cycle_vae_impl.trainers.cycle_vae_trainer:CycleVAETrainer"
PATHS = ("built-in", "plug-in")


@contextlib.contextmanager
def cycle_trainer_path(ctx, path: str):
    """The built-in cycle trainer, or the same class loaded from its SPEC as a user's would be."""
    saved = ctx.cycle_subject
    if path == "plug-in":
        ctx.cycle_subject = Subject(TrainerSpec.load(BUILT_IN_SPEC), "cycle")
    try:
        yield
    finally:
        ctx.cycle_subject = saved


def check_of(row: str, check: str):
    """The check function `check` of row `row`."""
    return importlib.import_module(f"compat.test_row_{row}").CHECKS[check]


def run_check(ctx, row: str, check: str) -> tuple[str, ...]:
    """Runs the check; returns the review items it flagged."""
    flagged = []

    def measure(name, value, review=False, **kwargs):
        if review:
            flagged.append(name)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Using a target size")
        check_of(row, check)(ctx, measure)
    return tuple(flagged)


@dataclass(frozen=True)
class Outcome:
    """How a check ended: "passed" | "assertion" | "trainer error" | "harness control" | "skipped" |
    "bare assertion" | "other error", what it said, and the review items it flagged when it passed.
    "assertion" is an `Incompatible`: the row's line then begins with the problem and its fix (never
    "AssertionError" or a comparison's "Scalars are not close")."""

    kind: str
    detail: str
    reviews: tuple[str, ...] = ()


def control_outcome(ctx, row: str, check: str) -> Outcome:
    """The check unmutated: a pass of it recorded in this session with the same trainers driven the
    same way (its row's own test, or the control of the other path: the plug-in path loads the same
    class), else a run of it now."""
    key = ctx.check_key(check_of(row, check))
    if key in ctx.passed_checks:
        return Outcome("passed", "the row's own test passed it in this session", ctx.passed_checks[key])
    outcome = outcome_of(ctx, row, check)
    if outcome.kind == "passed":
        ctx.passed_checks[key] = outcome.reviews
    return outcome


def outcome_of(ctx, row: str, check: str) -> Outcome:
    try:
        reviews = run_check(ctx, row, check)
    except pytest.skip.Exception as exc:
        return Outcome(CONTROL if CONTROL_PREFIX in str(exc) else "skipped", str(exc))
    except CandidateError as exc:
        return Outcome(TRAINER_ERROR, str(exc).splitlines()[0])
    except Incompatible as exc:  # the check's finding, said as the user acts on it (problem: fix. numbers)
        return Outcome(ASSERTION, str(exc))
    except AssertionError as exc:  # a bare assert: a finding without its fix is not how a row may fail
        return Outcome("bare assertion", (str(exc).strip().splitlines() or [""])[0])
    except Exception as exc:  # noqa: BLE001 - reported, and not counted as a catch
        return Outcome("other error", f"{type(exc).__name__}: {exc}")
    return Outcome("passed", "the check passed" + (f" (review: {', '.join(reviews)})" if reviews else ""), reviews)


def mutated_outcome(ctx, mutant, path: str) -> Outcome:
    """The check's outcome under `mutant`: a run now, or the run of the other path when both paths
    drive the same trainer the same way (the same check key: the same computation)."""
    key = (mutant.name, ctx.check_key(check_of(mutant.row, mutant.check)))
    if key in ctx.mutated_outcomes:
        outcome, ran_on = ctx.mutated_outcomes[key]
        return Outcome(outcome.kind, f"= {ran_on} run (trainer driven the same way): {outcome.detail}", outcome.reviews)
    with mutant.apply(), fresh_runs(ctx, mutant):
        outcome = outcome_of(ctx, mutant.row, mutant.check)
    ctx.mutated_outcomes[key] = (outcome, path)
    return outcome


def caught_as(mutant, outcome: Outcome) -> str:
    """How the mutated check ended, as the mutant's `expect` names it: a defect that is a cost is
    caught when the check passes flagging the mutant's review item."""
    if mutant.expect == REVIEWED and outcome.kind == "passed" and mutant.review in outcome.reviews:
        return REVIEWED
    return outcome.kind


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_caught(ctx, mutant, path, request):
    with cycle_trainer_path(ctx, path):
        control = control_outcome(ctx, mutant.row, mutant.check)
        assert control.kind == "passed" and mutant.review not in control.reviews, (
            f"control: {mutant.row}/{mutant.check} does not pass clean unmutated ({control.kind}: "
            f"{control.detail}), so a failure under the mutant would prove nothing"
        )
        mutated = mutated_outcome(ctx, mutant, path)
    got = caught_as(mutant, mutated)
    caught = got == mutant.expect
    request.node.user_properties.append(
        (
            "kill",
            json.dumps(
                {
                    "mutant": mutant.name,
                    "row": mutant.row,
                    "check": mutant.check,
                    "path": path,
                    "caught": caught,
                    "how": got,
                    "detail": mutated.detail,
                }
            ),
        )
    )
    assert caught, (
        f"mutant {mutant.name} ({mutant.description}) was not caught by {mutant.row}/{mutant.check} "
        f"on the {path} path: expected {mutant.expect}, got {got}: {mutated.detail}"
    )


def test_every_row_has_a_planted_defect():
    covered = {m.row for m in MUTANTS}
    missing = [row.id for row in ROWS if row.id not in covered]
    assert not missing, f"rows without a planted defect (their teeth are unproven): {missing}"


def test_every_mutant_names_a_real_check():
    for m in MUTANTS:
        module = importlib.import_module(f"compat.test_row_{m.row}")
        assert m.check in module.CHECKS, f"mutant {m.name}: {m.row} has no check {m.check!r} ({sorted(module.CHECKS)})"
