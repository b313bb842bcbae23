"""Train the stable L2T / T2L trainer.

    python -m latentDLM_mmdit.train_stable --synthetic training.num_train_steps=10
    python latentDLM_mmdit/train_stable.py --data-tokens DIR --data-latents DIR --output-dir runs/a
    torchrun --nproc_per_node=2 -m latentDLM_mmdit.train_stable --synthetic

Overrides are positional key.path=value arguments; see --help and `latentDLM_mmdit.training`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file: import the package from the repository root, not from this directory
    # (whose module names, e.g. config / data, must not shadow anything).
    _here, _root = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_root))

from latentDLM_mmdit.config import default_config_path  # noqa: E402
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer  # noqa: E402
from latentDLM_mmdit.training import TrainerEntry, cli_main  # noqa: E402

STABLE = TrainerEntry(
    "stable",
    MultimodalDiffusionTrainer,
    default_config_path("stable"),
    "latentDLM_mmdit.train_stable",
    "the stable L2T / T2L trainer",
)


def main(argv: list[str] | None = None) -> int:
    return cli_main(STABLE, argv)


if __name__ == "__main__":
    sys.exit(main())
