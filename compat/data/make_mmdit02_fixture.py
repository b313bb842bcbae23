"""Makes `mmdit02_layout_h16.safetensors`: a small MultimodalMMDiT checkpoint in mmdit 0.2.x layout.

What it is
    A real checkpoint, written by `latentDLM_mmdit.checkpoints.save_checkpoint`, of
    `MultimodalMMDiT(config, vocab_size=64, latent_dim=16)` built under **mmdit 0.2.2** with
    hidden_size 16, n_blocks 2, cond_dim 16, max_seq_len 32, dropout 0.0, num_residual_streams 2
    (see Size below), freshly initialised after `seed_everything(0)` (no training).
    Under mmdit 0.2.x the residual streams are `hyper_connections.HyperConnections`
    (`*.dynamic_alpha_scale`, `*.dynamic_beta_scale`, `dynamic_alpha_fn` [d, k], `dynamic_beta_fn`
    [d], `static_beta` [n]); mmdit 0.3.x uses `ManifoldConstrainedHyperConnections` with another
    layout. The compat suite loads this file under the project's pinned mmdit 0.3.0 and expects
    `load_checkpoint_into` to fail with a CheckpointError that names the differing keys and says the
    checkpoint was probably written with another mmdit version. The metadata records the versions
    used (read by `installed_versions()` through importlib.metadata).

Versions used to write the files here
    mmdit 0.2.2, hyper-connections 0.3.16 (mmdit 0.2.2 requires hyper-connections>=0.0.15; 0.1.15,
    0.2.1, 0.3.16 and 0.4.11 all import and give the identical 0.2.x state-dict layout), with the
    main environment's torch and x-transformers (2.31.10).

How to re-run (the main environment is left untouched; the old packages shadow the new ones)
    mkdir -p /tmp/mmdit022 && cd /tmp/mmdit022
    /work/venv/bin/pip download --no-deps mmdit==0.2.2 hyper-connections==0.3.16 -d dl
    /work/venv/bin/pip install --no-deps --target site dl/mmdit-0.2.2-py3-none-any.whl \\
        dl/hyper_connections-0.3.16-py3-none-any.whl
    PYTHONPATH=/tmp/mmdit022/site:/work/main /work/venv/bin/python \\
        /work/main/compat/data/make_mmdit02_fixture.py --hidden-size 16

Size
    The tiny default config has 881,376 parameters (the backbone always uses the library's 8 heads of
    64 dims, so the attention projections dominate): 3.5 MB in float32. A variant under 1 MB with the
    same 129 keys, the same depth 2 and the same 0.2.x layout, differing only in widths:
        ... make_mmdit02_fixture.py --hidden-size 16 \\
            --out /work/main/compat/data/mmdit02_layout_h16.safetensors     (163,632 parameters, 0.65 MB)

The script refuses to run unless the importable mmdit is 0.2.x (by its distribution metadata and
by the location of the imported module), and checks that what it wrote has the 0.2.x layout.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "mmdit02_layout_h16.safetensors"
SEED = 0
VOCAB_SIZE = 64
LATENT_DIM = 16
MODEL_CONFIG = {
    "hidden_size": 16,
    "n_blocks": 2,
    "cond_dim": 16,
    "max_seq_len": 32,
    "dropout": 0.0,
    "num_residual_streams": 2,
    "latent_dim": LATENT_DIM,
    "cluster_size": 0,
}


def require_mmdit_02() -> str:
    """Returns the mmdit version, or exits with a message when the importable mmdit is not 0.2.x."""
    try:
        version = importlib_metadata.version("mmdit")
    except importlib_metadata.PackageNotFoundError:
        sys.exit(
            "make_mmdit02_fixture: mmdit is not installed; this script needs mmdit 0.2.x "
            "(see the module docstring for how to put it on PYTHONPATH)"
        )
    if not version.startswith("0.2."):
        sys.exit(
            f"make_mmdit02_fixture: refusing to run: the importable mmdit is {version}, "
            f"this fixture must be written with mmdit 0.2.x. Put mmdit 0.2.2 first on "
            f"PYTHONPATH (see the module docstring); the main environment is not to be changed."
        )
    import mmdit

    expected = Path(importlib_metadata.distribution("mmdit").locate_file("mmdit/__init__.py")).resolve()
    if Path(mmdit.__file__).resolve() != expected:
        sys.exit(
            f"make_mmdit02_fixture: refusing to run: the mmdit metadata says {version} "
            f"({expected}) but the imported module is {mmdit.__file__}"
        )
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"target file (default {DEFAULT_OUT})")
    parser.add_argument(
        "--hidden-size",
        type=int,
        default=MODEL_CONFIG["hidden_size"],
        help="model.hidden_size (default %(default)s, the committed fixture)",
    )
    parser.add_argument("--cond-dim", type=int, default=None, help="model.cond_dim (default: the hidden size)")
    args = parser.parse_args(argv)
    model_config = dict(
        MODEL_CONFIG,
        hidden_size=args.hidden_size,
        cond_dim=args.hidden_size if args.cond_dim is None else args.cond_dim,
    )

    mmdit_version = require_mmdit_02()

    from latentDLM_mmdit.checkpoints import (
        MMDIT_02_MARKERS,
        MMDIT_03_MARKERS,
        installed_versions,
        open_checkpoint,
        save_checkpoint,
    )
    from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
    from latentDLM_mmdit.seeding import seed_everything

    seed_everything(SEED)
    model = MultimodalMMDiT(dict(model_config), vocab_size=VOCAB_SIZE, latent_dim=LATENT_DIM)
    config = {
        "model": dict(model_config),
        "tokenizer": {"vocab_size": VOCAB_SIZE},
        "fixture": {"seed": SEED, "purpose": "mmdit 0.2.x layout, for the layout-mismatch test"},
    }
    path = save_checkpoint(args.out, model, config=config, trainer_kind="stable", step=0)

    with open_checkpoint(path) as source:
        keys = set(source.shapes)
        recorded = source.metadata.get("versions") or {}
    if not any(m in k for k in keys for m in MMDIT_02_MARKERS) or any(m in k for k in keys for m in MMDIT_03_MARKERS):
        sys.exit(f"make_mmdit02_fixture: {path} does not have the mmdit 0.2.x residual-stream layout")
    if recorded.get("mmdit") != mmdit_version or recorded != installed_versions():
        sys.exit(f"make_mmdit02_fixture: recorded versions {recorded} differ from the installed ones")
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(keys)} tensors); versions {recorded}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
