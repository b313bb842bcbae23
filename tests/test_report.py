"""The summary's rules, from matrices built the way the gate builds them (`row_result`, `matrix_of`):
one line per row with one finding, a cause shared by several rows said once, the exit line's
counts, and the figures drawn from the JSON's data alone."""

from __future__ import annotations

import json

import pytest
import torch

from compat import figure_data
from compat.figures import FIGURES, draw_figures
from compat.gate import CheckOutcome, matrix_of, not_run_rows, row_result
from compat.outcomes import GateInputError
from compat.report import (
    FINDING_WIDTH,
    annotate,
    clean_message,
    first_sentence,
    render_html,
    render_markdown,
    render_problem_block,
    render_terminal,
    summarize,
)
from compat.rows import INCOMPATIBLE, NOT_RUN, OK, REVIEW, ROWS, ROWS_BY_ID
from compat.terms import LatentSchedule

RAISED = (
    "the cycle trainer CycleVAETrainer raised UserWarning in its step: Using a target size "
    "(torch.Size([{b}, 1, 16])) that is different to the input size (torch.Size([{b}, 16])). This will likely "
    "lead to incorrect results due to broadcasting. Please ensure they have the same size. at "
    "/home/me/cycle/trainers/cycle_vae_trainer.py:88 in _latent_loss"
)
X0 = (
    "AssertionError: cycle_text conditions on x0 whose error is amplified 6.4e4x at t = 1 (epsilon, cosine): use "
    "v_param or x0 parameterization, or cycle_text_weight=0. The review said medium.\nassert 64000.0 <= 100.0"
)


def passed(check: str, measured=(), review=(), headline=(), figures=None) -> CheckOutcome:
    return CheckOutcome(
        f"compat/test_row_x.py::test_x[{check}]",
        "passed",
        measured=list(measured),
        review=list(review),
        headline=list(headline),
        figures=figures or {},
    )


def failed(check: str, message: str) -> CheckOutcome:
    return CheckOutcome(f"compat/test_row_x.py::test_x[{check}]", "failed", message)


def matrix(outcomes: dict[str, list[CheckOutcome]], code: int, default=None, error=None) -> dict:
    """Every row of ROWS: the given outcomes, else `default` (None: not selected)."""
    rows = [row_result(r, outcomes.get(r.id, default(r.id) if default else [])) for r in ROWS]
    context = {"checkpoint": "embedded default", "semantic model": "a sensitized copy (why)", "device": "cpu"}
    made = matrix_of(rows, context, None, code)
    if error is not None:
        made["input_error"] = made["problem"] = {"problem": error.problem, "fix": error.fix}
    return json.loads(json.dumps(made))  # as compat-matrix.json holds it


def all_ok(row_id: str) -> list[CheckOutcome]:
    return [passed("a", measured=[("sensitivity", "latents 0.3"), (f"{row_id}_value", 0.125)])]


def row_line(text: str, row_id: str) -> str:
    return next(line for line in text.splitlines() if line[2:].startswith(row_id + " "))


def test_one_cause_is_said_once_and_the_other_failure_stands_out():
    raising = ("forward_contract", "none_timesteps", "l2t_masking", "cycle_terms")
    outcomes = {r: [failed("step", RAISED.format(b=4 if i % 2 else 2))] for i, r in enumerate(raising)}
    outcomes["x0_reconstruction"] = [failed("gain_at_t1", X0)]
    m = matrix(outcomes, 1, default=all_ok)
    summary = summarize(m)
    assert [c.rows for c in summary.causes] == [list(raising)]  # batch sizes differ: still one cause
    assert "[B,1,D]" in summary.causes[0].fix and summary.causes[0].where.endswith(
        "cycle_vae_trainer.py:88 in _latent_loss"
    )
    text = render_terminal(m)
    assert text.count("Using a target size") == 1, text
    for r in raising:
        line = row_line(text, r)
        finding = line.split(INCOMPATIBLE, 1)[1].strip()
        assert finding.startswith("[cause 1]") and "Using a target size" not in line and len(finding) <= 60, line
    x0_line = next(line for line in text.splitlines() if "x0_reconstruction " in line and "INCOMPATIBLE" in line)
    assert x0_line.startswith("!"), x0_line
    finding = x0_line.split(INCOMPATIBLE, 1)[1].strip()
    assert finding.startswith("cycle_text conditions on x0 whose error is amplified 6.4e4x at t = 1 (epsilon, cosine)")
    assert len(finding) <= FINDING_WIDTH and "The review said" not in finding
    assert summary.exit_line == (
        "compat gate: 5 rows INCOMPATIBLE (4 from cause [1]; 1 for another reason: x0_reconstruction) (exit 1)"
    )


def test_a_single_failure_is_not_a_shared_cause():
    m = matrix({"x0_reconstruction": [failed("gain_at_t1", X0)]}, 1, default=all_ok)
    summary = summarize(m)
    assert summary.causes == [] and summary.standout == []
    assert summary.exit_line == "compat gate: INCOMPATIBLE rows: x0_reconstruction (exit 1)"
    assert not row_line(render_terminal(m), "x0_reconstruction").startswith("!")


def test_review_rows_are_counted_in_the_exit_line():
    review = [
        passed(
            "cycle_terms",
            measured=[("base_T2L_beyond_stable_t2l", "also updates text (text_encoder), frozen by stable t2l")],
            review=["base_T2L_beyond_stable_t2l"],
        )
    ]
    m = matrix({"gradient_flow": review}, 0, default=all_ok)
    summary = summarize(m)
    assert (
        summary.exit_line
        == "compat gate: every applicable row ran; no incompatible row; 1 to review: gradient_flow (exit 0)"
    )
    assert summary.findings["gradient_flow"] == (
        "base_T2L_beyond_stable_t2l: also updates text (text_encoder), frozen by stable t2l"
    )


def test_a_run_narrowed_with_k_says_how_many_rows_were_not_selected():
    m = matrix({"l2t_masking": all_ok("l2t_masking"), "none_timesteps": all_ok("none_timesteps")}, 0)
    summary = summarize(m)
    assert len(summary.not_selected) == len(ROWS) - 2
    assert "every applicable row ran" not in summary.exit_line
    assert f"{len(ROWS) - 2} of {len(ROWS)} rows not selected (-k; 2 ran)" in summary.exit_line
    text = render_terminal(m)
    assert sum("not selected" in line for line in text.splitlines()) == 1, text  # one line, not 16
    assert row_line(text, "l2t_masking").split()[1] == OK


def test_ok_row_finding_is_its_headline_else_its_first_value_past_the_control():
    with_headline = [passed("a", measured=[("sensitivity", "x"), ("a", 1), ("b", 2.345678)], headline=["b"])]
    without = [passed("a", measured=[("sensitivity", "x"), ("semantic_model", "copy"), ("a", 1), ("b", 2.0)])]
    m = matrix({"l2t_masking": with_headline, "none_timesteps": without}, 0)
    findings = summarize(m).findings
    assert findings["l2t_masking"] == "b = 2.346"
    assert findings["none_timesteps"] == "a = 1"


@pytest.mark.parametrize(
    "message, finding",
    [
        (X0, "cycle_text conditions on x0 whose error is amplified 6.4e4x at t = 1 (epsilon, cosine): use v_param"),
        (
            "with latent_t_mode=full and cycle_text_weight=1.0, cycle_text conditions on x0 whose error is amplified "
            "6.42e+04x (epsilon, cosine): use v_param or x0 parameterization, or cycle_text_weight=0",
            "cycle_text conditions on x0 whose error is amplified 6.42e+04x (epsilon, cosine): use v_param",
        ),
        (
            "after 6 steps the cycle run's base t2l loss is 0.5 against the stable continuation's 0.1, far above the "
            "limit of the row, so that fine-tuning with this trainer and config undoes the pretraining",
            "after 6 steps the cycle run's base t2l loss is 0.5 against the stable continuation's 0.1, far...",
        ),
        (
            "AssertionError: full mode: the T2L prediction differs from stable t2l's on the same batch and noise\n"
            "Tensor-likes are not close!\n\nMismatched elements: 3 / 4 (75.0%)\nGreatest absolute difference: 0.5",
            "full mode: the T2L prediction differs from stable t2l's on the same batch and noise",
        ),
        (
            "AssertionError: step 3: the total does not follow the ramped weights {'cycle_text': 0.2}\n"
            "Scalars are not close!\n\nExpected 1.0 but got 0.5.",
            "step 3: the total does not follow the ramped weights {'cycle_text': 0.2}",
        ),
        ("AssertionError: assert 3 == 4\n +  where 3 = len([1, 2, 3])", "assert 3 == 4"),
        (
            "compat.subjects.CandidateError: the cycle trainer T raised KeyError in its step: 'x'",
            "the cycle trainer T raised KeyError in its step: 'x'",
        ),
        ("RuntimeError: e.g. a shape mismatch. Second sentence", "RuntimeError: e.g. a shape mismatch"),
    ],
    ids=[
        "claim-and-action",
        "leading-condition-dropped",
        "long-cut-at-a-word",
        "tensor-block",
        "scalar-block",
        "bare-assert",
        "candidate-error",
        "two-sentences",
    ],
)
def test_first_sentence_drops_pytest_noise(message, finding):
    got = first_sentence(message)
    assert len(got) <= FINDING_WIDTH
    assert got == finding


def test_clean_message_keeps_torch_details_only_when_asked():
    message = "AssertionError: loss differs\nScalars are not close!\n\nExpected 1.0 but got 0.5.\nassert False"
    assert clean_message(message) == "loss differs"
    assert clean_message(message, keep_details=True) == "loss differs Scalars are not close! Expected 1.0 but got 0.5."


def test_a_run_that_could_not_check_names_its_problem_once():
    error = GateInputError("--checkpoint nope.pt: no such file", "pass the checkpoint's path")
    rows = not_run_rows(error.one_line())
    m = json.loads(json.dumps(matrix_of(rows, {"checkpoint": "nope.pt"}, None, 2, error)))
    text = render_terminal(m)
    assert text.count("no such file") == 0, text  # the problem block (stderr) says it, once
    assert sum(NOT_RUN in line for line in text.splitlines()) == 1, text
    assert summarize(m).exit_line == "compat gate: could not check: no row ran (exit 2)"
    block = render_problem_block(m)
    assert block.splitlines()[0] == "compat gate: could not check (exit 2)"
    assert "no such file" in block and "pass the checkpoint's path" in block
    page = render_html(m)
    assert page.count('class="row v-notrun"') == len(ROWS) and "no such file" in page


def test_verbose_adds_the_full_measured_text():
    m = matrix({}, 0, default=all_ok)
    short, verbose = render_terminal(m), render_terminal(m, verbose=True)
    assert "sensitivity=latents 0.3" not in short
    assert "sensitivity=latents 0.3" in verbose
    rows = [line for line in short.splitlines() if line[2:].split(" ")[0] in {r.id for r in ROWS}]
    assert len(rows) == len(ROWS) and all(line in verbose.splitlines() for line in rows)


def test_markdown_and_json_carry_the_findings():
    m = annotate(matrix({"x0_reconstruction": [failed("gain_at_t1", X0)]}, 1, default=all_ok))
    assert m["rows"][[r.id for r in ROWS].index("x0_reconstruction")]["finding"].startswith("cycle_text conditions")
    assert m["summary"]["incompatible"] == ["x0_reconstruction"]
    markdown = render_markdown(m)
    assert markdown.startswith("# Compatibility matrix") and "| **INCOMPATIBLE** | cycle_text conditions" in markdown


# -- figures ------------------------------------------------------------------------------------------
class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.text_encoder = torch.nn.Linear(2, 2)
        self.latent_encoder = torch.nn.Linear(2, 2)
        self.mmdit = torch.nn.Linear(2, 2)


class _Run:
    def __init__(self, losses, norms):
        self.losses, self.grad_norms = losses, norms


def every_figure_data() -> dict[str, list[CheckOutcome]]:
    """Figure data for every figure, built with the helpers the rows use."""
    model = _Tiny()
    names = [n for n, _ in model.named_parameters()]
    loss = {
        "cycle_text_weight": 0.1,
        "cycle_text_warmup_steps": 2,
        "cycle_text_ramp_steps": 20,
        "cycle_latent_weight": 0.05,
        "cycle_latent_warmup_steps": 4,
        "cycle_latent_ramp_steps": 12,
    }
    schedule = LatentSchedule(None, 1000, "epsilon", "cosine")
    return {
        "trajectories": [
            passed(
                "cycle_keeps_base_losses",
                figures={
                    "steps": figure_data.trajectory_steps(
                        _Run([4, 0.01, 3.9], [1.5, 0.1, 1.7]), _Run([4, 3.9, 3.8], [1.5, 1.3, 1.7])
                    ),
                    "base_losses": {
                        "start": {"l2t": 3.6, "t2l": 0.013},
                        "stable": {"l2t": 3.64, "t2l": 0.0131},
                        "cycle": {"l2t": 3.61, "t2l": 0.0121},
                        "limit": 0.25,
                    },
                    "golden": figure_data.golden_band(
                        {
                            "stable": {"losses": [4, 0.01, 3.9], "grad_norms": [1.5, 0.1, 1.7]},
                            "cycle": {"losses": [4, 3.9, 3.8], "grad_norms": [1.5, 1.3, 1.7]},
                        },
                        1e-4,
                        1e-6,
                        "golden.json",
                    ),
                },
            )
        ],
        "t2l_latent_timestep": [
            passed("stable_uses_t1", figures={"stable_latent_t": [1.0] * 4}),
            passed("cycle_distribution", figures={"cycle_latent_t": {"mode": "random", "t": [0.3, 0.5, 0.7, 1.0]}}),
            passed(
                "random_mode_is_a_shift",
                figures={"random_mode_latent_t": {"t": [0.25, 0.45], "t_min": 0.2, "t_max": 0.7}},
            ),
        ],
        "x0_reconstruction": [
            passed("gain_at_t1", figures={"x0_gain": figure_data.x0_gain_curves(schedule, 1.0, 6.4e4, 10.0, 100.0)})
        ],
        "gradient_flow": [
            passed("stable_modes", figures={"reach_stable_l2t": figure_data.parameter_reach(names[:2], model)}),
            passed("cycle_terms", figures={"reach_cycle": {"base_T2L": figure_data.parameter_reach(names, model)}}),
        ],
        "cycle_terms": [
            passed(
                "ramp",
                figures={
                    "ramp_applied": {
                        "steps": [0, 3, 6, 100],
                        "cycle_text": [0, 0, 0.2, 0.4],
                        "cycle_latent": [0, 0, 0.02, 0.25],
                    }
                },
            )
        ],
        "recommended_settings": [
            passed(
                "trainer_honours_config",
                figures={
                    "config_weights": figure_data.weight_schedule(
                        loss, 15, {"cycle_text": 0.065, "cycle_latent": 0.046}
                    )
                },
            )
        ],
    }


def with_resources(m: dict) -> dict:
    m["rows"].append(
        {
            "id": "resources",
            "topic": "Resources",
            "stable": "-",
            "cycle": "-",
            "measured": "",
            "verdict": OK,
            "not_run_kind": None,
            "tests": [
                {
                    "nodeid": "compat/test_row_resources.py::t[memory]",
                    "outcome": "passed",
                    "measured": [],
                    "figures": {
                        "memory": {
                            "stable": {"weights": 2**22, "activations": 2**23},
                            "cycle": {"weights": 2**22, "activations": 2**24},
                        }
                    },
                }
            ],
        }
    )
    return m


def test_every_figure_is_drawn_from_its_json_data_alone():
    m = with_resources(matrix(every_figure_data(), 0, default=all_ok))
    drawn = draw_figures(json.loads(json.dumps(m)))
    assert [f.id for f in drawn] == [figure_id for figure_id, *_ in FIGURES]
    for f in drawn:
        assert f.svg.lstrip().startswith("<?xml") and "</svg>" in f.svg and f.width > 300 and f.height > 100
        assert "http" not in f.svg.replace("http://www.w3.org", "").replace("http://purl.org", "").replace(
            "http://creativecommons.org", ""
        ).replace("https://matplotlib.org", ""), f.id  # nothing to fetch: namespaces and the creator only
        assert "Look for" in f.caption


def test_a_figure_without_its_data_is_left_out():
    figures = every_figure_data()
    del figures["x0_reconstruction"]
    drawn = {f.id for f in draw_figures(matrix(figures, 0, default=all_ok))}
    assert "x0_gain" not in drawn and "resources" not in drawn and "trajectories" in drawn
    assert draw_figures(matrix({}, 0, default=all_ok)) == []


@pytest.mark.parametrize("verdict", [OK, REVIEW, INCOMPATIBLE, NOT_RUN])
def test_the_page_spells_each_verdict_out(verdict):
    outcomes = {
        OK: all_ok("l2t_masking"),
        REVIEW: [passed("a", measured=[("x", 1)], review=["x"])],
        INCOMPATIBLE: [failed("a", X0)],
        NOT_RUN: [],
    }[verdict]
    m = matrix({"l2t_masking": outcomes}, 0, default=all_ok)
    page = render_html(m)
    row = page[page.index('id="row-l2t_masking"') :]
    row = row[: row.index("</tr>")]
    assert (
        f'data-verdict="{verdict}"' in row and f'aria-label="verdict {verdict}"' in row and f">{verdict}</span>" in row
    )
    assert ROWS_BY_ID["l2t_masking"].topic in row


def test_one_exception_reported_through_different_wrappers_is_one_cause():
    core = "'CycleTrainer' object has no attribute 'current_step'"
    where = " at /x/train_cycle.py:57 in forward"
    raised = f"the cycle trainer CycleTrainer raised AttributeError in its step: {core}{where}"
    outcomes = {
        "l2t_masking": [failed("a", raised)],
        "ddp": [failed("b", f"DDP workers failed: rank 0 raised: compat.subjects.CandidateError: {raised}")],
        "trajectories": [failed("c", "AttributeError: 'RecordingCycleTrainer' object has no attribute 'current_step'")],
        "compiled_trainer": [failed("d", f"the cycle trainer CycleTrainer raised AttributeError eager: {core}")],
        "cycle_terms": [failed("e", "AttributeError: 'CycleTrainer' object has no attribute 'other_step'")],
    }
    summary = summarize(matrix(outcomes, 1, default=all_ok))
    assert [c.rows for c in summary.causes] == [["l2t_masking", "compiled_trainer", "ddp", "trajectories"]]
    cause = summary.causes[0]
    assert cause.message == f"the cycle trainer CycleTrainer raised AttributeError in its step: {core}"
    assert cause.where == "/x/train_cycle.py:57 in forward" and summary.standout == ["cycle_terms"]


@pytest.mark.parametrize("content", [None, "not json", '{"rows": 3}'], ids=["missing", "not-json", "no-rows"])
def test_rendering_a_file_that_is_not_a_matrix_says_so(tmp_path, capsys, content):
    from compat.report import main

    path = tmp_path / "compat-matrix.json"
    if content is not None:
        path.write_text(content)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"compat.report: cannot read {path} as a compat matrix") and "Traceback" not in err


def test_rendering_a_saved_matrix_again(tmp_path, capsys):
    from compat.report import main

    path = tmp_path / "compat-matrix.json"
    path.write_text(json.dumps(matrix({"x0_reconstruction": [failed("gain_at_t1", X0)]}, 1, default=all_ok)))
    assert main([str(path), "--html", str(tmp_path / "again")]) == 0
    out = capsys.readouterr().out
    assert "compat gate: INCOMPATIBLE rows: x0_reconstruction (exit 1)" in out
    assert (tmp_path / "again" / "index.html").read_text().count('class="row ') == len(ROWS)
