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

from latentDLM_mmdit.training import cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli_main("cycle", argv)


if __name__ == "__main__":
    sys.exit(main())
