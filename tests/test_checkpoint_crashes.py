"""A training run SIGKILLed while it saves a checkpoint, in each phase of the save: a published
weights file always has its own train state, the previous checkpoint is intact, the next start
removes what the interrupted save left, and --resume from the previous checkpoint continues
bit-exactly like a run that was never interrupted.

The kill lands deterministically: the subprocess below wraps the functions a save goes through
(safetensors' save_file, torch.save, os.replace) so that, in the save of step 4 only, the chosen
phase writes a marker file and sleeps; the test kills the process once the marker appears."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cycle_vae_impl.configs import config_path
from latentDLM_mmdit.checkpoints import load_train_state
from latentDLM_mmdit.config import load_config
from latentDLM_mmdit.train_stable import STABLE
from latentDLM_mmdit.training import run_training

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "model.n_blocks=1",
    "model.hidden_size=32",
    "model.cond_dim=32",
    "training.num_train_steps=4",
    "logging.save_every=2",
]
KILL_STEP, PREVIOUS = 4, 2
# The phases of a save, whatever order the writer goes through them in.
PHASES = ("state_write", "weights_write", "rename_1", "rename_2", "published")

SAVER = """
import os, sys, time
from pathlib import Path
import torch
import latentDLM_mmdit.checkpoints.saving as checkpoint_saving  # where the weights are written
import latentDLM_mmdit.training as training
import latentDLM_mmdit.training.checkpointing as training_checkpointing  # where the loop saves
from cycle_vae_impl.configs import config_path
from latentDLM_mmdit.config import load_config
from latentDLM_mmdit.train_stable import STABLE

phase, out_dir, marker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
overrides, kill_step = sys.argv[4].split(","), int(sys.argv[5])
armed, renames = False, 0


def hold():
    marker.write_text(phase)
    time.sleep(600)


def partial(target, data):
    handle = open(target, "wb") if isinstance(target, (str, os.PathLike)) else target
    handle.write(data)
    handle.flush()


real_save = training_checkpointing.save_checkpoint
def save(path, model, **kwargs):
    global armed
    armed = kwargs["step"] == kill_step
    result = real_save(path, model, **kwargs)
    if armed and phase == "published":
        hold()
    return result


real_save_file = checkpoint_saving.save_file
def save_file(tensors, filename, metadata=None):
    if armed and phase == "weights_write":
        partial(filename, b"\\0" * 4096)
        hold()
    return real_save_file(tensors, filename, metadata=metadata)


real_torch_save = torch.save
def torch_save(obj, f, *args, **kwargs):
    if armed and phase == "state_write":
        partial(f, b"PK\\x03\\x04" + b"\\0" * 512)
        hold()
    return real_torch_save(obj, f, *args, **kwargs)


real_replace = os.replace
def replace(src, dst):
    global renames
    if armed:
        renames += 1
        if phase == f"rename_{renames}":
            hold()
    return real_replace(src, dst)


training_checkpointing.save_checkpoint, checkpoint_saving.save_file, torch.save, os.replace = (
    save, save_file, torch_save, replace)
training.run_training(load_config(config_path("stable"), overrides), trainer=STABLE, output_dir=out_dir,
                      synthetic=True, progress=False, device="cpu")
sys.exit(3)  # the phase was never reached
"""


def _config():
    return load_config(config_path("stable"), OVERRIDES)


def _train_in_process(output_dir: Path, **kwargs):
    """run_training on one thread, as the subprocesses (OMP_NUM_THREADS=1): the same sums, the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_training(
            _config(), trainer=STABLE, output_dir=output_dir, synthetic=True, progress=False, device="cpu", **kwargs
        )
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """{phase: output dir of a run killed in that phase of its step-4 save}, and an uninterrupted run."""
    root = tmp_path_factory.mktemp("kills")
    script = root / "saver.py"
    script.write_text(SAVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("WORLD_SIZE", None)
    started = {}
    for phase in PHASES:
        marker = root / f"{phase}.reached"
        command = [
            sys.executable,
            str(script),
            phase,
            str(root / phase),
            str(marker),
            ",".join(OVERRIDES),
            str(KILL_STEP),
        ]
        started[phase] = (
            subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            marker,
        )
    reference = _train_in_process(root / "reference")
    deadline = time.monotonic() + 300
    for phase, (process, marker) in started.items():
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        _, err = process.communicate()
        assert marker.exists(), f"phase {phase} was never reached (exit {process.returncode}):\n{err[-3000:]}"
        assert process.returncode == -signal.SIGKILL, (phase, process.returncode)
    return {phase: root / phase for phase in PHASES}, reference


def _checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_a_kill_while_saving_leaves_a_resumable_run(killed, phase, caplog):
    dirs, reference = killed
    run_dir = dirs[phase]
    ckpt_dir = run_dir / "checkpoints"
    # A reader never sees a weights file without its own train state.
    for weights in sorted(ckpt_dir.glob("step_*.safetensors")):
        state = load_train_state(weights)
        assert state["step"] == int(weights.stem.removeprefix("step_")), weights
    if phase == "published":
        assert _checkpoint(run_dir, KILL_STEP).is_file()
    # The previous checkpoint is intact: its weights are the uninterrupted run's.
    previous, expected = load_file(str(_checkpoint(run_dir, PREVIOUS))), load_file(str(reference.checkpoints[0]))
    assert previous.keys() == expected.keys() and all(torch.equal(previous[k], expected[k]) for k in expected)

    caplog.set_level("WARNING")
    resumed = _train_in_process(run_dir, resume=_checkpoint(run_dir, PREVIOUS))
    # The next start removed what the save left (temporaries, a train state without its weights).
    leftovers = [p.name for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
    orphans = [
        p.name
        for p in ckpt_dir.glob("step_*.train_state.pt")
        if not p.with_name(p.name.removesuffix(".train_state.pt") + ".safetensors").exists()
    ]
    assert leftovers == [] and orphans == [], (leftovers, orphans)
    if phase in ("state_write", "weights_write", "rename_1"):
        assert "left by an interrupted save" in caplog.text
    # The resumed run is the uninterrupted one, to the bit, with one history.
    assert resumed.final_step == KILL_STEP
    assert (run_dir / "metrics.jsonl").read_text() == reference.metrics_path.read_text()
    final, expected = load_file(str(_checkpoint(run_dir, KILL_STEP))), load_file(str(reference.checkpoints[-1]))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    assert any(not torch.equal(final[k], previous[k]) for k in final)  # it trained: the check can fail
