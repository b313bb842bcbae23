"""Train the cycle trainer (base T2L + base L2T + cycle_text + cycle_latent).

    python -m cycle_vae_impl.entrypoints.train_cycle_vae --synthetic --init-from stable.safetensors
    python cycle_vae_impl/entrypoints/train_cycle_vae.py --config cycle_vae_impl/configs/mmdit_cycle_vae_cluster.yaml \
        --data-tokens DIR --data-latents DIR --init-from CKPT
    torchrun --nproc_per_node=8 -m cycle_vae_impl.entrypoints.train_cycle_vae ...

Overrides are positional key.path=value arguments; see --help and `latentDLM_mmdit.training`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file: import the packages from the repository root, not from this directory.
    _here, _root = Path(__file__).resolve().parent, Path(__file__).resolve().parents[2]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_root))

from cycle_vae_impl.configs import default_config_path  # noqa: E402
from cycle_vae_impl.trainers.cycle_vae_trainer import CycleVAETrainer  # noqa: E402
from latentDLM_mmdit.training import TrainerEntry, cli_main  # noqa: E402

CYCLE = TrainerEntry(
    "cycle",
    CycleVAETrainer,
    default_config_path("cycle"),
    "cycle_vae_impl.entrypoints.train_cycle_vae",
    "the cycle trainer (T2L + L2T + cycle terms)",
)


def main(argv: list[str] | None = None) -> int:
    return cli_main(CYCLE, argv)


if __name__ == "__main__":
    sys.exit(main())
