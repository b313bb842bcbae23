"""Planted defects in the gate's own code: one or more per gate module, each with the test that
must catch it (its guard) and what a user would see if nothing did.

`compat/mutants.py` plants defects in the trainers and the rows prove they catch them; this table
plants defects in the judge itself (verdict rules, pass observer, draw capture, trainer
inspection, inputs, harness, terms, oracle, trajectories replay, checkpoint reader), and
`tests/test_gate_defects.py` shows each caught by its guard after the guard passed unplanted.

Loaded as a pytest plugin (`-p gate_defects`, with `tests/` on the path) it plants the defect named
by the environment variable GATE_DEFECT for the whole session, before any test runs. A function's
defect replaces its code object (`__code__`): every module that imported the function by name runs
the defect too, as a mutation of the source would. The replacement runs in the original module's
globals, so it is written with that module's names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Callable
from unittest import mock

ENV = "GATE_DEFECT"

# What a user would see if the defect went uncaught (issue 20's classes).
FALSE_PASS = "false pass"  # OK or exit 0 where the truth is INCOMPATIBLE or could-not-check
FALSE_ALARM = "false alarm"  # INCOMPATIBLE where the trainer is compatible
WRONG_VERDICT = "wrong verdict"  # another verdict or finding than the truth, neither of the above
SELF_CHECK = "harness control"  # the harness's own control fails: could-not-check (exit 2), by design


@dataclass(frozen=True)
class GateDefect:
    """One planted defect.

    Args:
        name: readable id.
        module: the gate module it is planted in.
        description: the defect, as a reviewer would describe the bug.
        plant: returns the context managers that plant it.
        guard: pytest arguments selecting the tests that must catch it (under `tests/`, or a compat
            row with `-k`).
        expect: text the guard's failure must contain (the intended assertion, not any crash).
        direction: what a user would see if nothing caught it.
        row: for a guard in `compat/`: the row whose verdict must change; `verdict` / `kind` the
            verdict and NOT RUN kind it must then have (read from compat-matrix.json).
    """

    name: str
    module: str
    description: str
    plant: Callable[[], list]
    guard: tuple[str, ...]
    expect: str
    direction: str
    row: str | None = None
    verdict: str | None = None
    kind: str | None = None


@contextlib.contextmanager
def code_of(function, replacement):
    """`function` runs `replacement`'s code (in its own module's globals) while active."""
    target = getattr(function, "__func__", function)  # a classmethod's function
    saved = target.__code__
    if saved.co_freevars or replacement.__code__.co_freevars:
        raise TypeError(f"{target.__qualname__}: a code swap needs functions without closures")
    target.__code__ = replacement.__code__
    try:
        yield
    finally:
        target.__code__ = saved


# -- the replacements (each runs in the globals of the module named in its defect) --------------------
def _never_a_control_failure(kind, reason):  # compat/outcomes.py
    return False


def _cycle_text_named_l2t(passes, batch, mask_token_id):  # compat/observe.py
    ids = batch["input_ids"].detach().cpu()
    seen_t2l = False
    for p in passes:
        tokens = p.text_tokens.detach().cpu()
        if tokens.shape != ids.shape:
            p.kind = "unknown"
            continue
        masked = tokens == mask_token_id
        if bool(masked.all()):
            p.kind = L2T  # noqa: F821  (the defect: latents not looked at, the cycle_text pass is called L2T)
        elif torch.equal(tokens, ids):  # noqa: F821
            p.kind = CYCLE_LATENT if seen_t2l else T2L  # noqa: F821
            seen_t2l = True
        elif bool(masked.any()) and torch.equal(tokens[~masked], ids[~masked]):  # noqa: F821
            p.kind = MASKED  # noqa: F821
        else:
            p.kind = CYCLE_LATENT  # noqa: F821
    return passes


def _nothing_served(self, func, args, kwargs):  # compat/draw_capture.py
    return None


def _every_sample_gets_sample_0(draws, i):  # compat/subjects.py
    return {k: v[0:1] for k, v in draws.items()}


def _cuda_taken_on_trust(spec):  # compat/inputs.py: the availability check dropped
    try:
        device = torch.device(spec)  # noqa: F821
    except (RuntimeError, TypeError) as exc:
        raise GateInputError(f"--device {spec!r} is not a device ({exc})", "pass cpu, cuda or cuda:N") from None  # noqa: F821
    if device.type not in ("cpu", "cuda"):
        raise GateInputError(f"--device {spec}: only cpu and cuda devices are supported", "pass cpu, cuda or cuda:N")  # noqa: F821
    return device


def _copy_not_perturbed(model, scale=0.05):  # compat/harness.py
    return copy.deepcopy(model)  # noqa: F821


def _weights_without_warmup(config, step):  # compat/terms.py: the schedule's warmup and ramp ignored
    loss = config.loss
    out = {"latent_loss_weight": float(loss.latent_loss_weight)}
    for term in ("cycle_text", "cycle_latent"):
        out[term] = float(loss[f"{term}_weight"])
    return out


def _tolerances_a_million_times_looser(name):  # compat/oracle.py
    entry = TOLERANCES[name]  # noqa: F821
    if isinstance(entry, Derived):  # noqa: F821
        raise TypeError(f"tolerance {name!r} is derived ({entry.formula}): use derived_tol({name!r}, ...)")
    rtol, atol = entry
    return {"rtol": rtol * 1e6, "atol": atol * 1e6}


def _lr_one_step_ahead(step, config):  # compat/trajectories.py
    base = float(config.optimizer.lr)
    warmup = int(config.training.warmup_steps)
    total = int(config.training.num_train_steps)
    step = step + 1  # the defect
    if step < warmup:
        return base * (step + 1) / warmup
    if str(config.training.lr_schedule) == "constant":
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))  # noqa: F821


def _no_tensor_is_non_finite(checkpoint):  # latentDLM_mmdit/checkpoints/nonfinite.py
    return []


# -- the table ---------------------------------------------------------------------------------------
def _defects() -> tuple[GateDefect, ...]:
    import compat.draw_capture as draw_capture
    import compat.gate as gate
    import compat.harness as harness
    import compat.inputs as inputs
    import compat.observe as observe
    import compat.oracle as oracle
    import compat.outcomes as outcomes
    import compat.subjects as subjects
    import compat.terms as terms
    import compat.trainer_spec as trainer_spec
    import compat.trajectories as trajectories
    import latentDLM_mmdit.checkpoints as checkpoints

    spec_of = trainer_spec.TrainerSpec.of.__func__

    def _blind_spec(cls, trainer_cls, spec=None):
        found = spec_of(cls, trainer_cls, spec)
        return dataclasses.replace(found, accepts_draws=False, draw_names=())

    return (
        GateDefect(
            "could_not_check_counted_harmless",
            "compat/gate.py",
            "the exit code treats a could-not-check row like a not-applicable one (exit 0)",
            lambda: [mock.patch.object(gate, "HARMLESS_NOT_RUN", (*gate.HARMLESS_NOT_RUN, outcomes.CANNOT_CHECK))],
            ("tests/test_gate.py::test_exit_code_contract",),
            "unrun-row",
            FALSE_PASS,
        ),
        GateDefect(
            "control_failure_not_recognised",
            "compat/outcomes.py",
            "a failed harness control is read as an ordinary skip: a row with a passing check and a failed "
            "control is REVIEW (exit 0) instead of NOT RUN could-not-check",
            lambda: [code_of(outcomes.is_control_failure, _never_a_control_failure)],
            ("tests/test_gate.py::test_row_verdicts",),
            "control-failed-beats-pass",
            FALSE_PASS,
        ),
        GateDefect(
            "cycle_text_named_l2t",
            "compat/observe.py",
            "the observer names the cycle_text pass (all tokens masked, reconstructed latents) L2T: the base "
            "L2T checks would judge the cycle pass",
            lambda: [code_of(observe.classify_passes, _cycle_text_named_l2t)],
            ("tests/test_observe.py::test_cycle_passes_are_named_by_what_they_are_given",),
            "At index 2 diff: 'L2T' != 'cycle_text'",
            WRONG_VERDICT,
        ),
        GateDefect(
            "served_draws_ignored",
            "compat/draw_capture.py",
            "the capture never serves the harness's prepared draws: a trainer drawing from the global RNG "
            "gets other numbers than the injected ones",
            lambda: [mock.patch.object(draw_capture.DrawCapture, "_served", _nothing_served)],
            ("tests/test_observe.py::test_served_draws_go_to_standard_draws_of_their_size_in_order",),
            "Tensor-likes are not equal",
            FALSE_ALARM,
        ),
        GateDefect(
            "one_sample_draws_from_sample_0",
            "compat/subjects.py",
            "running one sample of a batch alone gives it sample 0's draws",
            lambda: [code_of(subjects.sample_draws, _every_sample_gets_sample_0)],
            ("compat/", "-k", "forward_contract"),
            "",
            FALSE_ALARM,
            row="forward_contract",
            verdict="INCOMPATIBLE",
        ),
        GateDefect(
            "draw_names_not_inspected",
            "compat/trainer_spec.py",
            "the trainer's DRAW_NAMES are not read: the harness cannot inject identical draws",
            lambda: [mock.patch.object(trainer_spec.TrainerSpec, "of", classmethod(_blind_spec))],
            ("tests/test_observe.py::test_trainer_spec_inspects_instead_of_asking",),
            "accepts_draws",
            WRONG_VERDICT,
        ),
        GateDefect(
            "cuda_taken_on_trust",
            "compat/inputs.py",
            "--device cuda on a machine without CUDA (or an index past the last device) is accepted",
            lambda: [code_of(inputs.resolve_device, _cuda_taken_on_trust)],
            ("tests/test_gate_inputs.py::test_device_refusals_name_the_device",),
            "DID NOT RAISE",
            FALSE_PASS,
        ),
        GateDefect(
            "sensitized_copy_unperturbed",
            "compat/harness.py",
            "the sensitized copy is an unperturbed copy: the rows judge on a model blind to timesteps",
            lambda: [code_of(harness.sensitized_copy, _copy_not_perturbed)],
            ("tests/test_sensitivity.py::test_the_semantic_model_sees_every_compared_input",),
            "assert",
            FALSE_PASS,
        ),
        GateDefect(
            "weights_without_warmup",
            "compat/terms.py",
            "the expected cycle weights ignore the warmup and ramp",
            lambda: [code_of(terms.cycle_weights, _weights_without_warmup)],
            ("compat/", "-k", "cycle_terms"),
            "",
            FALSE_ALARM,
            row="cycle_terms",
            verdict="INCOMPATIBLE",
        ),
        GateDefect(
            "tolerances_loosened",
            "compat/oracle.py",
            "every tabled tolerance a million times looser: comparisons cannot fail",
            lambda: [code_of(oracle.tol, _tolerances_a_million_times_looser)],
            ("compat/test_mutants.py", "-k", "upstream_defect_4"),
            "was not caught by config_resolution",
            FALSE_PASS,
        ),
        GateDefect(
            "replay_lr_one_step_ahead",
            "compat/trajectories.py",
            "the float64 replay uses the next step's learning rate",
            lambda: [code_of(trajectories.oracle_lr, _lr_one_step_ahead)],
            ("compat/", "-k", "trajectories"),
            "does not match its AdamW/clipping/schedule replay",
            SELF_CHECK,
            row="trajectories",
            verdict="NOT RUN",
            kind="could not check",
        ),
        GateDefect(
            "non_finite_scan_blind",
            "latentDLM_mmdit/checkpoints/nonfinite.py",
            "the checkpoint's non-finite scan finds nothing: a NaN checkpoint passes",
            lambda: [code_of(checkpoints.find_non_finite, _no_tensor_is_non_finite)],
            ("tests/test_checkpoints_validation.py::test_non_finite_tensors_are_listed_with_counts",),
            "assert",
            FALSE_PASS,
        ),
    )


def gate_defects() -> dict[str, GateDefect]:
    return {d.name: d for d in _defects()}


_planted: contextlib.ExitStack | None = None


def pytest_configure(config):
    global _planted
    name = os.environ.get(ENV)
    if not name:
        return
    defects = gate_defects()
    if name not in defects:
        raise ValueError(f"{ENV}={name!r} is not a planted gate defect; known: {', '.join(defects)}")
    _planted = contextlib.ExitStack()
    for patch in defects[name].plant():
        _planted.enter_context(patch)


def pytest_unconfigure(config):
    global _planted
    if _planted is not None:
        _planted.close()
        _planted = None
