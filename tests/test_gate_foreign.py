"""The gate judges trainer classes it has never seen, given by path, with no adapter:
`python -m compat --cycle-trainer path/to/file.py:Class`, for each foreign trainer under
`tests/foreign_trainers/` (none imports this project's cycle package), with the verdicts its
docstring states. Each runs in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compat.trainer_spec import TrainerSpec

REPO = Path(__file__).resolve().parents[1]
FOREIGN = Path(__file__).resolve().parent / "foreign_trainers"

pytestmark = pytest.mark.slow


def run_gate(tmp_path: Path, spec: str, *pytest_args: str) -> tuple[int, dict, str]:
    report = tmp_path / "report"
    args = [sys.executable, "-m", "compat", "--report", str(report), "--quiet", "--cycle-trainer", spec]
    if pytest_args:
        args += ["--", *pytest_args]
    proc = subprocess.run(
        args, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(REPO))
    )
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-4000:]
    return proc.returncode, json.loads((report / "compat-matrix.json").read_text()), output


def verdicts(matrix: dict) -> dict[str, str]:
    return {r["id"]: r["verdict"] for r in matrix["rows"]}


def test_a_correct_trainer_written_differently_passes_every_row(tmp_path):
    spec = f"{FOREIGN / 'functional_cycle' / 'trainer.py'}:FunctionalCycleTrainer"
    code, matrix, output = run_gate(tmp_path, spec)
    got = verdicts(matrix)
    assert code == 0, ({r["id"]: r["measured"][:300] for r in matrix["rows"] if r["verdict"] != "OK"}, output[-2000:])
    assert set(got.values()) <= {"OK", "REVIEW"}, got
    rows = {r["id"]: r for r in matrix["rows"]}
    assert "global RNG" in rows["determinism"]["measured"], rows["determinism"]["measured"]
    assert "trainer_takes_step=no" in rows["recommended_settings"]["measured"]
    assert "FunctionalCycleTrainer" in matrix["context"]["cycle trainer"]


@pytest.mark.parametrize(
    "folder, spec, rows, expected",
    [
        (
            "broadcast_cycle",
            "trainers/cycle_vae_trainer.py:CycleVAETrainer",
            "forward_contract",
            {"forward_contract": "batching_cycle"},
        ),
        (
            "uniform_t_cycle",
            "uniform_t_trainer.py:UniformTimeCycleTrainer",
            "t2l_latent_timestep",
            {"t2l_latent_timestep": "cycle_distribution"},
        ),
        ("no_stopgrad_cycle", "cycle.py:NoStopGradCycleTrainer", "cycle_terms", {"cycle_terms": "stop_grad"}),
    ],
    ids=["broadcast", "uniform-t", "no-stopgrad"],
)
def test_a_defective_trainer_is_caught_by_its_row(tmp_path, folder, spec, rows, expected):
    code, matrix, output = run_gate(tmp_path, f"{FOREIGN / folder / spec}", "-k", rows)
    assert code == 1, output[-3000:]
    got = {r["id"]: r for r in matrix["rows"]}
    for row, check in expected.items():
        assert got[row]["verdict"] == "INCOMPATIBLE", got[row]
        assert f"FAILED {check}" in got[row]["measured"], got[row]["measured"][:500]


def test_a_trainer_that_raises_gives_verdicts_not_a_crash(tmp_path):
    spec = f"{FOREIGN / 'raises_cycle' / 'train_cycle.py'}:CycleTrainer"
    code, matrix, output = run_gate(tmp_path, spec, "-k", "not ddp")
    assert code == 1, output[-3000:]
    rows = {r["id"]: r for r in matrix["rows"]}
    assert rows["l2t_masking"]["verdict"] == "INCOMPATIBLE"
    message = rows["l2t_masking"]["measured"]
    assert "raised AttributeError in its step" in message and "current_step" in message
    assert "train_cycle.py:" in message  # the last frame in the trainer's own file
    assert rows["reference_integrity"]["verdict"] == "OK" and rows["dependency_versions"]["verdict"] == "OK"


def test_an_unloadable_spec_is_a_usage_error(tmp_path):
    code, matrix, output = run_gate(tmp_path, f"{FOREIGN / 'functional_cycle' / 'trainer.py'}:NoSuchTrainer")
    assert code == 2, output[-2000:]
    assert "no class 'NoSuchTrainer'" in " ".join(output.split())


def test_the_foreign_trainers_are_inspected_not_named():
    spec = TrainerSpec.load(f"{FOREIGN / 'functional_cycle' / 'trainer.py'}:FunctionalCycleTrainer")
    assert not spec.accepts_step and not spec.accepts_draws
    spec = TrainerSpec.load(f"{FOREIGN / 'uniform_t_cycle' / 'uniform_t_trainer.py'}:UniformTimeCycleTrainer")
    assert spec.accepts_step and spec.accepts_draws and "latent_t" in spec.draw_names
