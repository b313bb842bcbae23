"""--resume keeps one history: resuming into the run's own directory ends metrics.jsonl at the
resumed step and sets the abandoned run's later metrics lines and checkpoints aside (logged, nothing
deleted); a directory holding another run is refused; a weights file is resumed only with its own
train state."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from cycle_vae_impl.configs import config_path
from latentDLM_mmdit.checkpoints import (
    CheckpointError,
    load_train_state,
    train_state_path,
)
from latentDLM_mmdit.config import load_config
from latentDLM_mmdit.train_stable import STABLE
from latentDLM_mmdit.training import TrainingError, run_training

TINY = ["model.n_blocks=1", "model.hidden_size=32", "model.cond_dim=32"]


def _train(output_dir: Path, steps: int = 6, **kwargs):
    config = load_config(config_path("stable"), TINY + [f"training.num_train_steps={steps}", "logging.save_every=2"])
    return run_training(
        config, trainer=STABLE, output_dir=output_dir, synthetic=True, progress=False, device="cpu", **kwargs
    )


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}.safetensors"


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _fingerprint(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A finished 6-step run (checkpoints at 2, 4, 6), copied by each test that changes it."""
    run_dir = tmp_path_factory.mktemp("history") / "run"
    _train(run_dir)
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def test_resume_into_the_same_run_keeps_one_history(six_steps, tmp_path, caplog):
    run_dir = _copy(six_steps, tmp_path)
    original = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')  # a line cut by a kill mid-write
    later = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for s in (4, 6)
        for p in (_ckpt(run_dir, s), train_state_path(_ckpt(run_dir, s)))
    }

    caplog.set_level("WARNING")
    result = _train(run_dir, resume=_ckpt(run_dir, 2), stop_at_step=3)
    assert result.final_step == 3
    # metrics.jsonl: the resumed run's steps 1-2, then the new step 3, once each.
    assert _steps(run_dir / "metrics.jsonl") == [1, 2, 3]
    assert (run_dir / "metrics.jsonl").read_text().startswith("".join(original[:2]))
    # The abandoned run's later lines and checkpoints are set aside, byte for byte.
    aside = run_dir / "abandoned" / "after_step_00000002"
    assert (aside / "metrics.jsonl").read_text() == "".join(original[2:]) + '{"step": 7, "lo'
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (aside / "checkpoints").iterdir()} == later
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_00000002.safetensors",
        "step_00000002.train_state.pt",
        "step_00000003.safetensors",
        "step_00000003.train_state.pt",
    ]
    assert "moved to" in caplog.text and str(aside) in caplog.text
    # A second resume from the same step keeps the first set-aside folder and opens another.
    _train(run_dir, resume=_ckpt(run_dir, 2), stop_at_step=3)
    assert _steps(run_dir / "abandoned" / "after_step_00000002-2" / "metrics.jsonl") == [3]
    assert _steps(run_dir / "metrics.jsonl") == [1, 2, 3]


def test_resume_at_the_last_recorded_step_moves_nothing(six_steps, tmp_path):
    run_dir = _copy(six_steps, tmp_path)
    _train(run_dir, steps=8, resume=_ckpt(run_dir, 6))
    assert _steps(run_dir / "metrics.jsonl") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert not (run_dir / "abandoned").exists()


def test_a_directory_of_another_run_is_refused(six_steps, tmp_path):
    other = tmp_path / "other"
    _train(other, steps=2)
    before = _fingerprint(other)
    with pytest.raises(TrainingError, match="holds another run"):
        _train(other, resume=_ckpt(six_steps, 4))
    assert _fingerprint(other) == before


def test_a_fresh_run_into_a_directory_with_checkpoints_is_refused(six_steps, tmp_path):
    run_dir = _copy(six_steps, tmp_path)
    (run_dir / "metrics.jsonl").unlink()
    with pytest.raises(TrainingError, match="already holds a run .*checkpoint"):
        _train(run_dir)


def test_a_train_state_of_another_save_is_refused(six_steps, tmp_path):
    run_dir = _copy(six_steps, tmp_path)
    shutil.copyfile(train_state_path(_ckpt(run_dir, 4)), train_state_path(_ckpt(run_dir, 2)))
    with pytest.raises(CheckpointError, match="is not the train state of .*step_00000002.safetensors"):
        load_train_state(_ckpt(run_dir, 2))
    with pytest.raises(CheckpointError, match="is not the train state"):
        _train(run_dir, resume=_ckpt(run_dir, 2))
    # Same step, another save (a save of step 4 interrupted after its train state was published).
    shutil.copytree(six_steps, tmp_path / "again", dirs_exist_ok=False)
    twin = tmp_path / "twin"
    _train(twin, steps=4)
    shutil.copyfile(train_state_path(_ckpt(twin, 4)), train_state_path(_ckpt(tmp_path / "again", 4)))
    with pytest.raises(CheckpointError, match="pair"):
        load_train_state(_ckpt(tmp_path / "again", 4))
