"""The entry points' command line: `cli_main(entry, argv)` parses the arguments, resolves the config
(plain or Hydra YAML, overrides, a tokenizer folder), trains, and prints a one-line summary; a
user's mistake is one line on stderr and exit 1."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from omegaconf.errors import OmegaConfBaseException

from latentDLM_mmdit.checkpoints import CheckpointError
from latentDLM_mmdit.config import ConfigError, resolve_config
from latentDLM_mmdit.data import DataError
from latentDLM_mmdit.training.distributed import one_line
from latentDLM_mmdit.training.loop import TrainerEntry, run_training
from latentDLM_mmdit.training.loop_settings import TrainingError

logger = logging.getLogger(__name__)

USER_ERRORS = (
    ConfigError,
    DataError,
    CheckpointError,
    TrainingError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    OmegaConfBaseException,
)


def build_parser(entry: TrainerEntry) -> argparse.ArgumentParser:
    module, what = entry.module, entry.description
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=f"Train {what}. Config overrides are positional key.path=value arguments, e.g. "
        "training.num_train_steps=100 optimizer.lr=5e-5 model.n_blocks=1; an unknown key or a "
        "value of the wrong type is an error.",
        epilog="Multi-process: torchrun --nproc_per_node=N -m " + module + " ... (gloo on CPU, nccl on CUDA).",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. training.num_train_steps=10 loss.cycle_text_weight=0.2",
    )
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML config, plain or upstream's Hydra format with a defaults list "
        f"(default: the packaged {entry.default_config.name})",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        default=None,
        help="local tokenizer folder (tokenizer.json, or vocab.txt with special_tokens_map.json / "
        "tokenizer_config.json) giving tokenizer.vocab_size, mask_token_id and pad_token_id; "
        "replaces tokenizer.path",
    )
    data = parser.add_argument_group("data (one of)")
    data.add_argument("--synthetic", action="store_true", help="seeded synthetic samples (data.synthetic_*)")
    data.add_argument("--data-tokens", metavar="DIR", help="upstream token dir of <stem>_tokens.npz files")
    data.add_argument("--data-latents", metavar="DIR", help="upstream latent dir of <stem>.npy files")
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start from pretrained weights (strict load; .safetensors written here or an upstream .pt)",
    )
    start.add_argument("--resume", metavar="CKPT", help="continue a run from a checkpoint this loop wrote")
    parser.add_argument("--output-dir", metavar="DIR", help="default: <logging.log_dir>/<logging.run_name>")
    parser.add_argument(
        "--stop-at-step",
        type=int,
        metavar="N",
        help="stop after step N (the LR schedule still spans training.num_train_steps)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def cli_main(entry: TrainerEntry, argv: Sequence[str] | None = None) -> int:
    """The entry points' main: parses arguments, trains, prints a summary. Returns the exit code."""
    parser = build_parser(entry)
    args = parser.parse_args(argv)
    if args.synthetic and (args.data_tokens or args.data_latents):
        parser.error("--synthetic and --data-tokens / --data-latents exclude each other")
    if bool(args.data_tokens) != bool(args.data_latents):
        parser.error("--data-tokens and --data-latents go together")
    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config_path = args.config or entry.default_config
        resolved = resolve_config(config_path, args.overrides, tokenizer_dir=args.tokenizer)
        if is_main:
            for line in resolved.summary():
                logger.info("config %s: %s", config_path, line)
        config = resolved.config
        output_dir = (
            Path(args.output_dir) if args.output_dir else Path(config.logging.log_dir) / config.logging.run_name
        )
        result = run_training(
            config,
            trainer=entry,
            output_dir=output_dir,
            synthetic=args.synthetic,
            token_dir=args.data_tokens,
            latent_dir=args.data_latents,
            init_from=args.init_from,
            resume=args.resume,
            progress=not args.no_progress,
            stop_at_step=args.stop_at_step,
            device=args.device,
        )
    except USER_ERRORS as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    if is_main:
        last = result.metrics[-1] if result.metrics else {}
        print(
            f"{entry.kind} trainer: step {result.final_step}, final loss {last.get('loss', float('nan')):.6g}; "
            f"metrics {result.metrics_path}; "
            f"last checkpoint {result.checkpoints[-1] if result.checkpoints else 'none'}"
        )
    return 0
