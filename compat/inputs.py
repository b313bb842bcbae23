"""Reading what the user passes to the gate: options, configs, the checkpoint, the data, the device.

Every problem here is a `GateInputError` naming the file, key or option and the fix: the gate then
exits 2 ("could not check") with the matrix written and every row NOT RUN for that one reason. No
input is modified; the checkpoint is only read safely (see `latentDLM_mmdit.checkpoints`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from compat.options import CompatOptions
from compat.outcomes import GateInputError

DATA_SAMPLES = 64  # samples the rows draw their batches from
SYNTHETIC_SEQ_LEN = 16


def check_options(options: CompatOptions) -> None:
    """The checks that need no file read: paired data options, paths that exist, sizes, device."""
    if bool(options.data_tokens) != bool(options.data_latents):
        given, missing = (("--data-tokens", "--data-latents") if options.data_tokens
                          else ("--data-latents", "--data-tokens"))
        raise GateInputError(f"{given} was given without {missing}: the rows need both halves of upstream's "
                             "data layout", f"pass {missing} DIR too, or neither to use synthetic batches")
    for flag, value, kind in (("--checkpoint", options.checkpoint, "path"),
                              ("--stable-config", options.stable_config, "file"),
                              ("--cycle-config", options.cycle_config, "file"),
                              ("--data-tokens", options.data_tokens, "dir"),
                              ("--data-latents", options.data_latents, "dir")):
        if not value:
            continue
        path = Path(value)
        if not path.exists():
            raise GateInputError(f"{flag} {path}: no such file or directory", f"check the path given to {flag}")
        if kind == "file" and not path.is_file():
            raise GateInputError(f"{flag} {path} is a directory, not a YAML file", f"pass the YAML file to {flag}")
        if kind == "dir" and not path.is_dir():
            raise GateInputError(f"{flag} {path} is a file, not a directory",
                                 f"pass the folder that holds the {'*.npz' if 'tokens' in flag else '*.npy'} files")
    if options.batch_size < 2:
        raise GateInputError(f"--batch-size {options.batch_size}: the rows compare a batch with its samples "
                             "run one at a time, so a batch needs at least 2 samples", "pass --batch-size 2 or more")
    if options.seq_len is not None and options.seq_len < 1:
        raise GateInputError(f"--seq-len {options.seq_len} must be >= 1", "pass a positive --seq-len, or omit it")
    resolve_device(options.device)


def resolve_device(spec: str) -> torch.device:
    """The torch device for `--device`; GateInputError when it is malformed or not available here."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise GateInputError(f"--device {spec!r} is not a device ({exc})", "pass cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise GateInputError(f"--device {spec}: only cpu and cuda devices are supported", "pass cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise GateInputError(f"--device {spec}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)",
                             "run the gate on a CUDA machine, or pass --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise GateInputError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                             f"pass an index below {torch.cuda.device_count()}")
    return device


def load_user_config(path: str | None, kind: str) -> tuple[DictConfig, str]:
    """(config, path) of the stable or cycle config: the user's, else the packaged tiny default."""
    from cycle_vae_impl.configs import config_path
    from latentDLM_mmdit.config import ConfigError, load_config

    resolved = Path(path) if path else Path(config_path(kind))
    try:
        return load_config(resolved), str(resolved)
    except ConfigError as exc:
        raise GateInputError(f"--{kind}-config {resolved}: {exc}",
                             f"fix the {kind} config file (or pass another with --{kind}-config)") from None


def open_user_checkpoint(path: Path):
    """The opened checkpoint (`latentDLM_mmdit.checkpoints.CheckpointSource`): read safely, never executed."""
    from latentDLM_mmdit.checkpoints import CheckpointError, open_checkpoint

    try:
        return open_checkpoint(path)
    except CheckpointError as exc:
        raise GateInputError(f"--checkpoint {path} cannot be used: {exc}",
                             "follow the advice above or pass another checkpoint; `python -m "
                             "latentDLM_mmdit.checkpoints inspect FILE` says what a file holds") from None


def read_data_samples(options: CompatOptions, vocab: Any, max_seq_len: int, latent_dim: int) -> list[dict]:
    """Up to DATA_SAMPLES samples of the user's upstream-format data, each checked (ids inside the
    vocabulary, latent width, at least one real token)."""
    from latentDLM_mmdit.data import DataError, UpstreamLatentDataset

    fix = "fix or remove that file (the gate reads the first samples in sorted name order)"
    try:
        dataset = UpstreamLatentDataset(options.data_tokens, options.data_latents, max_seq_len, vocab)
        samples = [dataset[i] for i in range(min(len(dataset), DATA_SAMPLES))]
    except DataError as exc:
        raise GateInputError(f"data: {exc}", fix) from None
    if dataset.latent_dim != latent_dim:
        raise GateInputError(f"data: latents in {options.data_latents} have width {dataset.latent_dim}, the "
                             f"checkpoint's model takes {latent_dim}",
                             "pass the latent folder that matches this checkpoint")
    empty = [str(dataset.pairs[i][0]) for i, s in enumerate(samples) if int(s["attention_mask"].sum()) == 0]
    if empty:
        raise GateInputError(f"data: {len(empty)} sample(s) have an all-zero attention_mask (no real token), "
                             f"first {empty[0]}", fix)
    return samples


def default_seq_len(options: CompatOptions, samples: list[dict] | None, max_seq_len: int) -> tuple[int, str]:
    """The rows' sequence length and why: --seq-len, else on data the longest sample's real length
    (so the other samples keep padding to check), else 16; always capped by model.max_seq_len and
    by the length of the data files."""
    if options.seq_len is not None:
        wanted, why = int(options.seq_len), "--seq-len"
    elif samples:
        wanted = max(int(s["attention_mask"].sum()) for s in samples)
        why = f"the longest real length of the {len(samples)} data samples read"
    else:
        wanted, why = SYNTHETIC_SEQ_LEN, "synthetic default"
    if samples and wanted > int(samples[0]["input_ids"].shape[0]):
        return int(samples[0]["input_ids"].shape[0]), f"{why}, capped by the data files' length"
    if wanted > max_seq_len:
        return max_seq_len, f"{why}, capped by model.max_seq_len"
    return wanted, why


def vocab_for(config: DictConfig, vocab_size: int):
    """The vocabulary spec the rows use: `vocab_size` rows (the checkpoint's embedding), the mask
    and pad ids of the cycle config's tokenizer section."""
    from latentDLM_mmdit.tokenizer import SyntheticVocab

    tokenizer = config.get("tokenizer") or {}
    missing = [key for key in ("mask_token_id", "pad_token_id") if tokenizer.get(key) is None]
    if missing:
        raise GateInputError(f"the cycle config has no tokenizer.{' or tokenizer.'.join(missing)}, and the rows must "
                             "mask and pad tokens with the ids the checkpoint was trained with",
                             f"add tokenizer.{' and tokenizer.'.join(missing)} to the cycle config")
    try:
        return SyntheticVocab(int(vocab_size), int(tokenizer.mask_token_id), int(tokenizer.pad_token_id))
    except ValueError as exc:
        raise GateInputError(f"the cycle config's tokenizer ids do not fit the checkpoint's vocabulary of "
                             f"{vocab_size} ids: {exc}", "fix tokenizer.mask_token_id / pad_token_id") from None
