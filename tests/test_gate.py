"""The gate end to end: verdicts, the report files and the exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from compat.gate import CheckOutcome, RowResult, exit_code, row_result
from compat.outcomes import GateInputError
from compat.rows import INCOMPATIBLE, NOT_RUN, OK, REVIEW, ROWS, ROWS_BY_ID
from cycle_vae_impl.configs import config_path
from latentDLM_mmdit.config import load_config

REPO = Path(__file__).resolve().parents[1]
ROW = ROWS_BY_ID["t2l_latent_timestep"]


def skipped(kind: str, reason: str = "why") -> CheckOutcome:
    return CheckOutcome("row::test[x]", "skipped", reason, skip_kind=kind)


@pytest.mark.parametrize(
    "outcomes, verdict, kind",
    [
        ([], NOT_RUN, "not selected"),
        ([skipped("could not check", "no data")], NOT_RUN, "could not check"),
        ([skipped("not applicable", "DDP on CUDA")], NOT_RUN, "not applicable"),
        ([skipped("not applicable"), skipped("blocked")], NOT_RUN, "blocked"),
        ([CheckOutcome("a", "passed"), skipped("could not check")], REVIEW, None),
        ([CheckOutcome("a", "passed"), skipped("not applicable", "CUDA missing")], OK, None),
        ([CheckOutcome("a", "passed", review=["x"])], REVIEW, None),
        ([CheckOutcome("a", "passed", review=["x"]), CheckOutcome("b", "failed", "boom")], INCOMPATIBLE, None),
        ([CheckOutcome("a", "error", "fixture broke")], INCOMPATIBLE, None),
        (
            [CheckOutcome("a", "passed"), skipped("could not check", "harness control: replay differs")],
            NOT_RUN,
            "could not check",
        ),
    ],
    ids=[
        "nothing-selected",
        "could-not-check",
        "by-design",
        "blocked-wins",
        "pass-and-skip-is-review",
        "pass-and-not-applicable-is-ok",
        "review",
        "failure-wins",
        "setup-error",
        "control-failed-beats-pass",
    ],
)
def test_row_verdicts(outcomes, verdict, kind):
    result = row_result(ROW, outcomes)
    assert (result.verdict, result.not_run_kind) == (verdict, kind)
    if verdict in (NOT_RUN, REVIEW) or any(o.outcome == "skipped" for o in outcomes):
        assert result.measured, "a row that did not run, or skipped a check, must say why"


def test_a_row_whose_module_is_missing_cannot_be_checked():
    """A deleted row module is not 'not selected' (harmless, exit 0) but could-not-check (exit 2),
    naming the file; a present module with nothing collected stays harmless (a run narrowed by -k)."""
    missing = row_result(ROW, [], module_present=False)
    assert (missing.verdict, missing.not_run_kind) == (NOT_RUN, "could not check")
    assert "compat/test_row_t2l_latent_timestep.py is missing" in missing.measured
    assert exit_code([missing, _row(OK)], None, []) == 2
    narrowed = row_result(ROW, [], module_present=True)
    assert exit_code([narrowed, _row(OK)], None, []) == 0


def test_rows_and_row_modules_agree_one_to_one():
    """Each row of rows.py has its module, each module marks the row it belongs to, and no module
    is left over: the two are tied only by strings, so a rename on one side must fail here."""
    modules = {p.stem.removeprefix("test_row_") for p in (REPO / "compat").glob("test_row_*.py")}
    assert modules == {r.id for r in ROWS}
    for row in ROWS:
        assert row.module.is_file()
        assert f'pytest.mark.compat_row("{row.id}")' in row.module.read_text(), row.module


def _row(verdict: str, kind: str | None = None) -> RowResult:
    return RowResult("r", "topic", "-", "-", "why", verdict, kind, [])


@pytest.mark.parametrize(
    "verdicts, input_error, other, code",
    [
        ([(OK, None), (REVIEW, None)], None, [], 0),
        ([(OK, None), (NOT_RUN, "not applicable"), (NOT_RUN, "not selected")], None, [], 0),
        ([(OK, None), (INCOMPATIBLE, None), (NOT_RUN, "blocked")], None, [], 1),
        ([(INCOMPATIBLE, None), (NOT_RUN, "could not check")], GateInputError("p", "f"), [], 1),
        ([(NOT_RUN, "could not check")] * 3, GateInputError("p", "f"), [], 2),
        ([(OK, None), (NOT_RUN, "could not check")], None, [], 2),
        ([(OK, None), (NOT_RUN, "blocked")], None, [], 2),
        ([(NOT_RUN, "not selected"), (NOT_RUN, "not applicable")], None, [], 2),
        ([(OK, None)], None, ["compat/test_mutants.py::x"], 2),
    ],
    ids=[
        "ok-and-review",
        "harmless-not-run",
        "incompatible",
        "incompatible-beats-input-error",
        "input-error",
        "unrun-row",
        "blocked-without-failure",
        "nothing-checked",
        "suite-self-check-failed",
    ],
)
def test_exit_code_contract(verdicts, input_error, other, code):
    assert exit_code([_row(v, k) for v, k in verdicts], input_error, other) == code


def test_collect_only_lists_the_checks_and_keeps_pytests_exit_status():
    """`pytest compat/ --collect-only` (IDEs, test listing, mutmut's test discovery) runs no check:
    it is not a gate run that checked nothing (exit 2), it prints no matrix, and it exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "compat/", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "compat matrix" not in proc.stdout and "tests collected" in proc.stdout


def run_gate(tmp_path: Path, *args: str) -> tuple[int, dict, str]:
    report = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "compat", "--report", str(report), "--quiet", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    matrix = json.loads((report / "compat-matrix.json").read_text())
    assert (report / "compat-matrix.md").read_text().startswith("# Compatibility matrix")
    return proc.returncode, {r["id"]: r for r in matrix["rows"]}, proc.stdout


@pytest.mark.slow
def test_gate_fails_on_random_latent_t_and_marks_unrun_rows(tmp_path):
    config = load_config(config_path("cycle"), ["loss.latent_t_mode=random"])
    cycle_yaml = tmp_path / "cycle_random.yaml"
    OmegaConf.save(config, cycle_yaml)
    code, rows, stdout = run_gate(tmp_path, "--cycle-config", str(cycle_yaml), "--", "-k", "t2l_latent_timestep")
    assert code == 1, stdout[-2000:]
    assert rows["t2l_latent_timestep"]["verdict"] == INCOMPATIBLE
    assert "distribution shift" in rows["t2l_latent_timestep"]["measured"]
    others = [r for r in ROWS if r.id != "t2l_latent_timestep"]
    assert all(rows[r.id]["verdict"] == NOT_RUN for r in others), {r.id: rows[r.id]["verdict"] for r in others}


@pytest.mark.slow
def test_gate_passes_the_embedded_default_row(tmp_path):
    code, rows, stdout = run_gate(tmp_path, "--", "-k", "l2t_masking")
    assert code == 0, stdout[-2000:]
    assert rows["l2t_masking"]["verdict"] == OK
    assert "l2t_loss_stable" in rows["l2t_masking"]["measured"]


@pytest.mark.slow
def test_gate_draws_batches_from_upstream_format_data(tmp_path):
    from latentDLM_mmdit.data import write_upstream_format
    from latentDLM_mmdit.tokenizer import vocab_from_config
    from tests.builders import tiny_batch

    config = load_config(config_path("cycle"))
    samples = tiny_batch(6, 20, int(config.model.latent_dim), 5, vocab_from_config(config))
    tokens, latents = write_upstream_format(tmp_path / "data", samples)
    code, rows, stdout = run_gate(
        tmp_path, "--data-tokens", str(tokens), "--data-latents", str(latents), "--", "-k", "l2t_masking or cycle_terms"
    )
    assert code == 0, stdout[-3000:]
    assert rows["l2t_masking"]["verdict"] == OK and rows["cycle_terms"]["verdict"] == OK


def test_each_option_is_one_field_with_its_default_declared_once():
    """The gate's flags, pytest's --compat-* options and CompatOptions are one list: same names in
    the same order, and the parsers' defaults are the dataclass's (declared nowhere else)."""
    from dataclasses import fields

    from compat.gate import build_parser
    from compat.options import OPTIONS, CompatOptions

    assert [o.dest for o in OPTIONS] == [f.name for f in fields(CompatOptions)]
    parsed = build_parser().parse_args([])
    assert CompatOptions(**{o.dest: getattr(parsed, o.dest) for o in OPTIONS}) == CompatOptions()
