"""Reading what the user passes to the gate: options, configs, the checkpoint, the data, the device.

Every problem here is a `GateInputError` naming the file, key or option and the fix: the gate then
exits 2 ("could not check") with the matrix written and every row NOT RUN for that one reason. No
input is modified; the checkpoint is only read safely (see `latentDLM_mmdit.checkpoints`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from compat.options import CompatOptions
from compat.outcomes import GateInputError
from latentDLM_mmdit.settings import COMPILE_BACKENDS

COMPILE_SCOPES = ("full", "trainer")

DATA_SAMPLES = 64  # samples the rows draw their batches from
SYNTHETIC_SEQ_LEN = 16


def check_options(options: CompatOptions) -> None:
    """The checks that need no file read: paired data options, paths that exist, sizes, device."""
    if bool(options.data_tokens) != bool(options.data_latents):
        given, missing = (
            ("--data-tokens", "--data-latents") if options.data_tokens else ("--data-latents", "--data-tokens")
        )
        raise GateInputError(
            f"{given} was given without {missing}: the rows need both halves of upstream's data layout",
            f"pass {missing} DIR too, or neither to use synthetic batches",
        )
    for flag, value, kind in (
        ("--checkpoint", options.checkpoint, "path"),
        ("--stable-config", options.stable_config, "file"),
        ("--cycle-config", options.cycle_config, "file"),
        ("--data-tokens", options.data_tokens, "dir"),
        ("--data-latents", options.data_latents, "dir"),
    ):
        if not value:
            continue
        path = Path(value)
        if not path.exists():
            raise GateInputError(f"{flag} {path}: no such file or directory", f"check the path given to {flag}")
        if kind == "file" and not path.is_file():
            raise GateInputError(f"{flag} {path} is a directory, not a YAML file", f"pass the YAML file to {flag}")
        if kind == "dir" and not path.is_dir():
            raise GateInputError(
                f"{flag} {path} is a file, not a directory",
                f"pass the folder that holds the {'*.npz' if 'tokens' in flag else '*.npy'} files",
            )
    if options.batch_size < 2:
        raise GateInputError(
            f"--batch-size {options.batch_size}: the rows compare a batch with its samples "
            "run one at a time, so a batch needs at least 2 samples",
            "pass --batch-size 2 or more",
        )
    if options.seq_len is not None and options.seq_len < 1:
        raise GateInputError(f"--seq-len {options.seq_len} must be >= 1", "pass a positive --seq-len, or omit it")
    if options.compile_backend is not None and options.compile_backend not in COMPILE_BACKENDS:
        raise GateInputError(
            f"--compile-backend {options.compile_backend!r} is not one the compiled_trainer row runs",
            f"pass one of {', '.join(COMPILE_BACKENDS)}, or omit it (aot_eager on cpu, inductor on cuda)",
        )
    if options.compile_scope is not None and options.compile_scope not in COMPILE_SCOPES:
        raise GateInputError(
            f"--compile-scope {options.compile_scope!r} is not a scope of the compiled_trainer row",
            f"pass one of {', '.join(COMPILE_SCOPES)}, or omit it (full on cuda, trainer on cpu)",
        )
    if options.gpu_memory is not None:
        gpu_memory_bytes(options.gpu_memory)
    if options.gpu_tflops is not None and not (math.isfinite(options.gpu_tflops) and options.gpu_tflops > 0):
        raise GateInputError(
            f"--gpu-tflops {options.gpu_tflops}: a GPU's throughput is a positive number of TFLOP/s",
            "pass the card's dense bf16 TFLOP/s, e.g. --gpu-tflops 989 (H100 SXM), or omit it",
        )
    resolve_device(options.device)


def gpu_memory_bytes(size: str) -> int:
    """Bytes of `--gpu-memory SIZE`; GateInputError naming the option and an example when it is not a size."""
    from compat.resources import parse_size

    try:
        return parse_size(size)
    except ValueError as exc:
        raise GateInputError(
            f"--gpu-memory {size!r} is not a memory size: {exc}",
            "pass the GPU's memory with its unit, e.g. --gpu-memory 80GiB (or 24GB, 81920MiB)",
        ) from None


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
        raise GateInputError(
            f"--device {spec}: CUDA is not available on this machine "
            f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)",
            "run the gate on a CUDA machine, or pass --device cpu",
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise GateInputError(
            f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)",
            f"pass an index below {torch.cuda.device_count()}",
        )
    return device


def load_user_config(path: str | None, kind: str) -> tuple[DictConfig, str]:
    """(config, path) of the stable or cycle config: the user's (plain YAML or upstream's Hydra
    file), else the packaged tiny default. Validated by the settings schema; the vocabulary is not
    filled here (`resolve_gate_vocab` takes its size from the checkpoint)."""
    from cycle_vae_impl.configs import config_path
    from latentDLM_mmdit.config import ConfigError, resolve_config

    resolved = Path(path) if path else Path(config_path(kind))
    try:
        return resolve_config(resolved, vocab=False).config, str(resolved)
    except ConfigError as exc:
        raise GateInputError(
            f"--{kind}-config {resolved}: {exc}", f"fix the {kind} config file (or pass another with --{kind}-config)"
        ) from None


def explicit_tokenizer_value(config: DictConfig, key: str, tokenizer_given: bool = False) -> int | None:
    """The config's own tokenizer.<key>, when it is the one its runs use: not when a tokenizer.path is
    set or a tokenizer folder is given (`--tokenizer`, which the entry points take as tokenizer.path):
    upstream's entry points, and this project's, then take every id from the tokenizer folder."""
    tokenizer = config.get("tokenizer") or {}
    if tokenizer_given or tokenizer.get("path"):
        return None
    value = tokenizer.get(key)
    return None if value is None else int(value)


@dataclass(frozen=True)
class GateVocab:
    """The vocabulary the rows use, and where each value came from."""

    vocab: Any  # latentDLM_mmdit.tokenizer.SyntheticVocab
    sources: dict[str, str]


def resolve_gate_vocab(options: CompatOptions, vocab_size: int, configs: dict[str, DictConfig]) -> GateVocab:
    """vocab_size from the checkpoint's embedding; mask and pad ids from --mask-token-id /
    --pad-token-id, else the configs' tokenizer sections (cycle, then stable), else a tokenizer
    folder (--tokenizer DIR, else a config's tokenizer.path that exists here). Values given twice
    must agree; a folder's vocabulary must have the checkpoint's size.

    As upstream's entry points, a config with a tokenizer.path (or any config, when --tokenizer DIR is
    given: the entry points take it as tokenizer.path) takes its ids from that tokenizer: its own
    tokenizer.vocab_size / mask_token_id / pad_token_id (upstream's dummy-tokenizer fallback) are not
    used then."""
    from latentDLM_mmdit.settings import ConfigError
    from latentDLM_mmdit.tokenizer import SyntheticVocab, read_tokenizer_folder

    values: dict[str, int] = {}
    sources: dict[str, str] = {"vocab_size": "the checkpoint's text_encoder.token_embed.weight"}
    for key in ("mask_token_id", "pad_token_id"):
        flag = getattr(options, key)
        if flag is not None:
            values[key], sources[key] = int(flag), f"--{key.replace('_', '-')}"
        for kind in ("cycle", "stable"):  # the two configs disagreeing is the config-resolution row's verdict
            given = explicit_tokenizer_value(configs[kind], key, tokenizer_given=options.tokenizer is not None)
            if given is None:
                continue
            if flag is not None and int(flag) != int(given):
                raise GateInputError(
                    f"tokenizer.{key}={given} in the {kind} config, but --{key.replace('_', '-')} gives {flag}",
                    "make them agree (the checkpoint was trained with one id)",
                )
            values.setdefault(key, int(given))
            sources.setdefault(key, f"tokenizer.{key} of the {kind} config")
    folder = options.tokenizer
    if folder is None:
        paths = [configs[k].tokenizer.get("path") for k in ("cycle", "stable")]
        folder = next((p for p in paths if p and Path(p).is_dir()), None)
    missing = [k for k in ("mask_token_id", "pad_token_id") if k not in values]
    if folder is not None and (missing or options.tokenizer):
        add_mask = bool(configs["cycle"].tokenizer.get("add_mask_token", True))
        try:
            read = read_tokenizer_folder(folder, add_mask)
        except (ConfigError, OSError, ValueError) as exc:
            raise GateInputError(f"--tokenizer {folder}: {exc}", "pass a local tokenizer folder") from None
        added_mask = "added as a new id" in read.described.get("mask_token_id", "")
        if added_mask and "mask_token_id" in values:  # the mask id is given: nothing to add to the folder
            read = dataclasses.replace(read, vocab_size=read.vocab_size - 1, mask_token_id=values["mask_token_id"])
            added_mask = False
        if read.vocab_size != vocab_size and added_mask and read.vocab_size == vocab_size + 1:
            raise GateInputError(
                f"the tokenizer folder {folder} declares no mask token and has no [MASK], so it is read as "
                f"upstream's get_tokenizer did: [MASK] added as id {read.mask_token_id}, {read.vocab_size} ids; "
                f"the checkpoint's embedding has {vocab_size} rows, so it was trained without that added token",
                "pass --mask-token-id ID (the mask id the checkpoint was trained with), or the tokenizer folder "
                "of its training run",
            )
        if read.vocab_size != vocab_size:
            raise GateInputError(
                f"the tokenizer folder {folder} has {read.vocab_size} ids"
                + (" (with the [MASK] upstream adds)" if added_mask else "")
                + f", the checkpoint's embedding {vocab_size} rows: it is not the tokenizer this checkpoint "
                "was trained with",
                "pass the tokenizer folder of the checkpoint's training run",
            )
        for key in ("mask_token_id", "pad_token_id"):
            value = getattr(read, key)
            if value is not None and key in values and values[key] != value:
                raise GateInputError(
                    f"the tokenizer folder {folder} gives {key}={value}, {sources[key]} gives {values[key]}",
                    "make them agree (or leave one out)",
                )
            if key not in values and value is not None:
                values[key], sources[key] = int(value), f"tokenizer folder {read.described[key]}"
    missing = [k for k in ("mask_token_id", "pad_token_id") if k not in values]
    if missing and folder is not None:
        flags = " ".join(f"--{k.replace('_', '-')} ID" for k in missing)
        raise GateInputError(
            f"the tokenizer folder {folder} declares no {' or '.join(k.removesuffix('_id') for k in missing)} "
            "(neither special_tokens_map.json nor tokenizer_config.json names one), and the configs do not give "
            f"{'them' if len(missing) > 1 else 'it'}",
            f"pass {flags} (the id the checkpoint was trained with; BERT's [PAD] is 0)",
        )
    if missing:
        flags = " ".join(f"--{k.replace('_', '-')} ID" for k in missing)
        raise GateInputError(
            f"no {' or '.join(missing)}: the configs do not give "
            f"{'them' if len(missing) > 1 else 'it'} (upstream's configs hold only a tokenizer path, "
            f"{[configs[k].tokenizer.get('path') for k in ('cycle', 'stable')]}, not on this machine)",
            f"pass --tokenizer DIR (the local copy of the training run's tokenizer folder), or {flags}",
        )
    try:
        vocab = SyntheticVocab(vocab_size, values["mask_token_id"], values["pad_token_id"])
    except ValueError as exc:
        raise GateInputError(
            f"the vocabulary ({', '.join(f'{k} from {v}' for k, v in sources.items())}) does "
            f"not fit the checkpoint: {exc}",
            "pass the ids the checkpoint was trained with",
        ) from None
    return GateVocab(vocab, sources)


def open_user_checkpoint(path: Path):
    """The opened checkpoint (`latentDLM_mmdit.checkpoints.CheckpointSource`): read safely, never executed."""
    from latentDLM_mmdit.checkpoints import CheckpointError, open_checkpoint

    try:
        return open_checkpoint(path)
    except CheckpointError as exc:
        raise GateInputError(
            f"--checkpoint {path} cannot be used: {exc}",
            "follow the advice above or pass another checkpoint; `python -m "
            "latentDLM_mmdit.checkpoints inspect FILE` says what a file holds",
        ) from None


NAMED_PROBLEMS = 5  # unusable data samples named one by one in the error; the rest are counted


def read_data_samples(options: CompatOptions, vocab: Any, max_seq_len: int, latent_dim: int) -> list[dict]:
    """Up to DATA_SAMPLES samples of the user's upstream-format data, each checked (ids inside the
    vocabulary, latent width, at least one real token)."""
    from latentDLM_mmdit.data import DataError, UpstreamLatentDataset

    fix = "fix or remove that file (the gate reads the first samples in sorted name order)"
    try:
        dataset = UpstreamLatentDataset(options.data_tokens, options.data_latents, max_seq_len, vocab)
    except DataError as exc:
        raise GateInputError(f"data: {exc}", fix) from None
    samples, problems = [], []
    count = min(len(dataset), DATA_SAMPLES)
    for i in range(count):  # every unusable sample of those read is named, not only the first
        try:
            samples.append(dataset[i])
        except DataError as exc:
            problems.append(str(exc))
    if len(problems) == 1:
        raise GateInputError(f"data: {problems[0]}", fix)
    if problems:
        shown = "; ".join(problems[:NAMED_PROBLEMS])
        more = f"; and {len(problems) - NAMED_PROBLEMS} more" if len(problems) > NAMED_PROBLEMS else ""
        raise GateInputError(
            f"data: {len(problems)} of the first {count} samples cannot be used: {shown}{more}",
            "fix or remove those files (the gate reads the first samples in sorted name order)",
        )
    if dataset.latent_dim != latent_dim:
        raise GateInputError(
            f"data: latents in {options.data_latents} have width {dataset.latent_dim}, the "
            f"checkpoint's model takes {latent_dim}",
            "pass the latent folder that matches this checkpoint",
        )
    empty = [str(dataset.pairs[i][0]) for i, s in enumerate(samples) if int(s["attention_mask"].sum()) == 0]
    if empty:
        raise GateInputError(
            f"data: {len(empty)} sample(s) have an all-zero attention_mask (no real token), first {empty[0]}", fix
        )
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
