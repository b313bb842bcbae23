"""The run directory: metrics.jsonl (one strict-JSON line per step), the published checkpoints in
checkpoints/, and readying the directory for a fresh run or a resume (one history: what a resume
abandons moves to abandoned/)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

from latentDLM_mmdit.checkpoints import remove_interrupted_saves, train_state_path
from latentDLM_mmdit.training.loop_settings import TrainingError

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
ABANDONED_DIR = "abandoned"  # what a resume set aside: the abandoned run's later metrics and checkpoints
CHECKPOINT_FILE = re.compile(r"^step_(\d+)\.safetensors$")


def metrics_line(record: Mapping[str, Any]) -> str:
    """`record` as one line of strict JSON: a non-finite float is written as null, and
    `nonfinite_values` maps its key (dotted / indexed when nested) to "nan", "inf" or "-inf"."""
    flagged: dict[str, str] = {}

    def clean(value: Any, key: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            flagged[key] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
            return None
        if isinstance(value, Mapping):
            return {k: clean(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    line = {k: clean(v, str(k)) for k, v in record.items()}
    if flagged:
        line["nonfinite_values"] = flagged
    return json.dumps(line, allow_nan=False)


def published_checkpoints(directory: Path) -> dict[int, Path]:
    """{step: weights file} of the checkpoints this loop published in `directory`."""
    if not directory.is_dir():
        return {}
    found = {}
    for entry in directory.iterdir():
        match = CHECKPOINT_FILE.match(entry.name)
        if match:
            found[int(match.group(1))] = entry
    return found


def _metrics_step(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line that is not a record (cut by a kill)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _fresh_dir(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`, ... : the first that does not exist, created."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    candidate.mkdir(parents=True)
    return candidate


def _write_durably(path: Path, text: str) -> None:
    """Replaces `path` by `text` atomically: a temporary, fsynced, renamed, the directory fsynced."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_output_dir(output_dir: Path, resume: Path | None, resume_step: int | None) -> Path | None:
    """Readies `output_dir` for a run (rank 0); returns the folder things were set aside in, if any.

    A fresh run (`resume` None) needs a directory without metrics.jsonl or checkpoints. A resume
    into a directory that holds a run needs a checkpoint of that run (in its checkpoints/). Then
    what interrupted saves left is removed (`remove_interrupted_saves`), and the history is made
    one again: the metrics lines after `resume_step` (and any line cut by a kill) and the
    checkpoints after it move to `abandoned/after_step_<N>[-n]/` (metrics.jsonl, checkpoints/),
    with a warning naming them; metrics.jsonl keeps the steps up to `resume_step`.
    """
    metrics_path, ckpt_dir = output_dir / METRICS_NAME, output_dir / CHECKPOINT_DIR
    published = published_checkpoints(ckpt_dir)
    held = ([METRICS_NAME] if metrics_path.exists() else []) + (
        [f"{len(published)} checkpoint(s) in {CHECKPOINT_DIR}/"] if published else []
    )
    if resume is None:
        if held:
            raise TrainingError(
                f"{output_dir} already holds a run ({', '.join(held)}); choose another output "
                "directory, or --resume one of its checkpoints"
            )
        remove_interrupted_saves(ckpt_dir)
        return None
    if held and resume.resolve().parent != ckpt_dir.resolve():
        raise TrainingError(
            f"{output_dir} holds another run ({', '.join(held)}) than the one {resume} belongs to; "
            f"resume into an empty output directory, or into the run of that checkpoint"
        )
    remove_interrupted_saves(ckpt_dir)
    later = [published[s] for s in sorted(published) if s > resume_step]
    lines = metrics_path.read_text(encoding="utf-8").splitlines(keepends=True) if metrics_path.exists() else []
    steps = [_metrics_step(line) for line in lines]
    keep = [line for line, s in zip(lines, steps) if s is not None and s <= resume_step]
    dropped = [line for line, s in zip(lines, steps) if s is None or s > resume_step]
    if not later and not dropped:
        return None
    aside = _fresh_dir(output_dir / ABANDONED_DIR / f"after_step_{resume_step:08d}")
    if dropped:
        _write_durably(aside / METRICS_NAME, "".join(dropped))
    if later:
        (aside / CHECKPOINT_DIR).mkdir()
        for weights in later:  # the train state first: a weights file never stays without it
            state = train_state_path(weights)
            if state.exists():
                os.replace(state, aside / CHECKPOINT_DIR / state.name)
            os.replace(weights, aside / CHECKPOINT_DIR / weights.name)
    if dropped:
        _write_durably(metrics_path, "".join(keep))
    logger.warning(
        "resuming %s at step %d: the abandoned run's %d metrics line(s) after it and %d later "
        "checkpoint(s) (%s) were moved to %s",
        output_dir,
        resume_step,
        len(dropped),
        len(later),
        ", ".join(p.name for p in later) or "none",
        aside,
    )
    return aside
