"""Training data: upstream's on-disk layout, seeded synthetic samples, and a writer for the layout.

Upstream layout (what upstream's preprocessing wrote and its loader read):

    token_dir/<stem>_tokens.npz   input_ids [S] (or [1,S]) integer, attention_mask same shape (0/1)
    latent_dir/<stem>.npy         the latent, [D] or [1,D], floating point

`x_tokens.npz` pairs with `x.npy` (a token file without the `_tokens` suffix pairs with the latent
of the same stem). Upstream's loader returned a zero sample (512 zero tokens, a zero 1024-dim
latent) whenever a file could not be read (upstream defect 7), which trains on garbage without a
word. Here every problem is a `DataError` naming the file: a missing pair, an unreadable file, a
missing key, a mis-shaped array, token ids outside the vocabulary, a sequence longer than
`max_seq_len` or of another length than the others, a non-finite latent.

Every sample is a dict: `input_ids` [S] int64, `attention_mask` [S] int64, `latent` [1,D] float32;
`collate` stacks samples into a batch with `latent` [B,1,D], the layout the trainers take.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentDLM_mmdit.draws import make_generator
from latentDLM_mmdit.synthetic import synthetic_batch
from latentDLM_mmdit.tokenizer import VocabSpec, check_vocab

logger = logging.getLogger(__name__)

TOKEN_SUFFIX = "_tokens"
TOKEN_KEYS = ("input_ids", "attention_mask")


class DataError(ValueError):
    """A data file or directory that cannot be used (the message names it)."""


def _read_tokens(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"token file {path} cannot be read as .npz ({type(exc).__name__}: {exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"token file {path} is a single .npy array, not an .npz archive with {' and '.join(TOKEN_KEYS)}"
        )
    try:
        with archive:
            missing = [k for k in TOKEN_KEYS if k not in archive.files]
            if missing:
                raise DataError(
                    f"token file {path} lacks {', '.join(missing)} (it holds: {', '.join(archive.files) or 'nothing'})"
                )
            arrays = []
            for key in TOKEN_KEYS:
                try:
                    arrays.append(archive[key])
                except ValueError as exc:
                    if "allow_pickle" not in str(exc):
                        raise
                    raise DataError(
                        f"token file {path}: {key} is an object array (pickled Python objects), which "
                        "is never unpickled here; re-save it as an integer array, e.g. np.savez(path, "
                        f"{key}=np.asarray(values, dtype=np.int64), ...)"
                    ) from None
            return arrays[0], arrays[1]
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"token file {path} cannot be read as .npz ({type(exc).__name__}: {exc})") from exc


def _read_latent(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"latent file {path} cannot be read as .npy ({type(exc).__name__}: {exc})") from exc


def _as_row(array: np.ndarray, what: str, path: Path) -> np.ndarray:
    """[N] or [1,N] -> [N]; anything else is a DataError."""
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1 or array.shape[0] == 0:
        raise DataError(f"{what} in {path} must have shape [N] or [1,N] with N > 0, got {list(array.shape)}")
    return array


def _names_ending(directory: Path, suffix: str) -> list[str]:
    """Names in `directory` of the form <stem><suffix> with a non-empty stem (listed, never read)."""
    with os.scandir(directory) as entries:
        return [e.name for e in entries if e.name.endswith(suffix) and len(e.name) > len(suffix)]


class FilePairs(Sequence):
    """The (token file, latent file) paths of a dataset, held as two arrays (encoded stems and a
    flag for the `_tokens` suffix) rather than millions of Python objects: a DataLoader worker
    forked from the training process then shares them instead of copying them page by page as
    reference counts change."""

    def __init__(self, token_dir: Path, latent_dir: Path, stems: list[str], suffixed: list[bool]):
        self.token_dir, self.latent_dir = token_dir, latent_dir
        self.stems = np.array([os.fsencode(stem) for stem in stems], dtype=np.bytes_)  # [N]
        self.suffixed = np.array(suffixed, dtype=bool)  # [N]

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> tuple[Path, Path]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"pair {index} out of range for {len(self)} pairs")
        stem = os.fsdecode(bytes(self.stems[index]))
        token_name = stem + (TOKEN_SUFFIX if self.suffixed[index] else "") + ".npz"
        return self.token_dir / token_name, self.latent_dir / (stem + ".npy")


REFERENCE_SCAN = 64  # samples tried for the first readable one (its length and latent width are the reference)


class UpstreamLatentDataset(torch.utils.data.Dataset):
    """Pairs of token and latent files in upstream's layout (see the module docstring).

    Args:
        token_dir: directory of `*.npz` token files.
        latent_dir: directory of `*.npy` latents with matching stems.
        max_seq_len: the model's `max_seq_len`; a longer sequence is an error.
        vocab: vocabulary spec (`__len__`, mask and pad ids); token ids must lie in [0, len(vocab)).

    The pairing is checked when the dataset is built, and the first pair is read to fix the
    sequence length S and latent width D; every other file is checked against them when read
    (`validate()` reads them all now). Files are visited in sorted name order.
    """

    def __init__(self, token_dir: str | Path, latent_dir: str | Path, max_seq_len: int, vocab: VocabSpec):
        check_vocab(vocab)
        self.token_dir, self.latent_dir = Path(token_dir), Path(latent_dir)
        for name, directory in (("token", self.token_dir), ("latent", self.latent_dir)):
            if not directory.is_dir():
                raise DataError(f"{name} directory {directory} does not exist or is not a directory")
        if int(max_seq_len) < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.max_seq_len = int(max_seq_len)
        self.vocab_size = len(vocab)
        token_names = sorted(_names_ending(self.token_dir, ".npz"))
        if not token_names:
            raise DataError(f"token directory {self.token_dir} holds no *.npz files")
        latent_stems = {name.removesuffix(".npy") for name in _names_ending(self.latent_dir, ".npy")}
        stems, suffixed, seen = [], [], {}
        for name in token_names:
            stem = name.removesuffix(".npz")
            suffixed.append(stem.endswith(TOKEN_SUFFIX))
            stem = stem.removesuffix(TOKEN_SUFFIX)
            if stem in seen:
                raise DataError(
                    f"token files {self.token_dir / seen[stem]} and {self.token_dir / name} both pair "
                    f"with latent stem {stem!r}"
                )
            seen[stem] = name
            if stem not in latent_stems:
                raise DataError(
                    f"token file {self.token_dir / name} has no latent: expected {self.latent_dir / (stem + '.npy')}"
                )
            stems.append(stem)
        orphans = sorted(latent_stems - set(seen))
        if orphans:
            raise DataError(
                f"latent file {self.latent_dir / (orphans[0] + '.npy')} has no token file (expected "
                f"{self.token_dir / (orphans[0] + TOKEN_SUFFIX + '.npz')}); {len(orphans)} latent(s) without tokens"
            )
        self.pairs = FilePairs(self.token_dir, self.latent_dir, stems, suffixed)
        self.seq_len: int | None = None
        self.latent_dim: int | None = None
        first, problems = None, []
        for index in range(min(len(self.pairs), REFERENCE_SCAN)):  # the lengths of the first sample that reads
            try:
                first = self._load(index)
                break
            except DataError as exc:
                problems.append(str(exc))
        if first is None:
            more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise DataError(
                f"none of the first {len(problems)} samples can be used: {'; '.join(problems[:3])}{more}"
                if len(problems) > 1
                else problems[0]
            )
        self.seq_len, self.latent_dim = int(first["input_ids"].shape[0]), int(first["latent"].shape[-1])

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, index: int) -> dict[str, torch.Tensor]:
        token_file, latent_file = self.pairs[index]
        ids, mask = _read_tokens(token_file)
        ids = _as_row(ids, "input_ids", token_file)
        mask = _as_row(mask, "attention_mask", token_file)
        if ids.shape != mask.shape:
            raise DataError(
                f"token file {token_file}: input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} differ in shape"
            )
        if not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"token file {token_file}: input_ids must be integers, got dtype {ids.dtype}")
        if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
            raise DataError(
                f"token file {token_file}: attention_mask must be integers or bools, got dtype {mask.dtype}"
            )
        length = int(ids.shape[0])
        if length > self.max_seq_len:
            raise DataError(
                f"token file {token_file}: sequence length {length} exceeds model.max_seq_len={self.max_seq_len}"
            )
        if self.seq_len is not None and length != self.seq_len:
            raise DataError(
                f"token file {token_file}: sequence length {length} differs from {self.seq_len} "
                f"(of {self.pairs[0][0]}); every file must hold the same length (pad when writing)"
            )
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise DataError(f"token file {token_file}: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        mask_values = set(np.unique(mask.astype(np.int64)).tolist())
        if not mask_values <= {0, 1}:
            raise DataError(f"token file {token_file}: attention_mask must hold 0/1, got values {sorted(mask_values)}")

        latent = _read_latent(latent_file)
        latent = _as_row(latent, "latent", latent_file)
        if not np.issubdtype(latent.dtype, np.floating):
            raise DataError(f"latent file {latent_file}: must be floating point, got dtype {latent.dtype}")
        if self.latent_dim is not None and latent.shape[0] != self.latent_dim:
            raise DataError(
                f"latent file {latent_file}: width {latent.shape[0]} differs from {self.latent_dim} (of {self.pairs[0][1]})"
            )
        if not np.isfinite(latent).all():
            raise DataError(f"latent file {latent_file}: holds non-finite values")
        return {
            "input_ids": torch.from_numpy(ids.astype(np.int64)),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "latent": torch.from_numpy(latent.astype(np.float32)).reshape(1, -1),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return self._load(index % len(self))

    def validate(self) -> None:
        """Reads every pair now; raises DataError naming the first bad file."""
        for index in range(len(self)):
            self._load(index)


class SyntheticDataset(torch.utils.data.Dataset):
    """`num_samples` seeded synthetic samples (`latentDLM_mmdit.synthetic`), the same for the
    same arguments on every machine and rank; uses its own generator, never the global RNG."""

    def __init__(self, vocab: VocabSpec, num_samples: int, seq_len: int, latent_dim: int, seed: int):
        check_vocab(vocab)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        batch = synthetic_batch(vocab, int(num_samples), int(seq_len), int(latent_dim), make_generator(int(seed)))
        self.samples = batch
        self.seq_len, self.latent_dim = int(seq_len), int(latent_dim)

    def __len__(self) -> int:
        return int(self.samples["input_ids"].shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return {k: v[index].clone() for k, v in self.samples.items()}  # latent [1, D]


def collate(samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks samples: input_ids [B,S], attention_mask [B,S], latent [B,1,D]."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    return {key: torch.stack([s[key] for s in samples]) for key in ("input_ids", "attention_mask", "latent")}


def _numpy(value: Any) -> np.ndarray:
    if torch.is_tensor(value):
        return value.detach().cpu().numpy().copy()
    return np.array(value)


def _samples(samples: Any) -> list[dict[str, np.ndarray]]:
    """Per-sample numpy copies from a batch mapping ([B,...] tensors) or an iterable of samples."""
    if isinstance(samples, Mapping):
        missing = [k for k in ("input_ids", "attention_mask", "latent") if k not in samples]
        if missing:
            raise KeyError(f"samples lack {missing}")
        count = len(samples["input_ids"])
        return [{k: _numpy(samples[k][i]) for k in ("input_ids", "attention_mask", "latent")} for i in range(count)]
    out = []
    for i, sample in enumerate(samples):
        missing = [k for k in ("input_ids", "attention_mask", "latent") if k not in sample]
        if missing:
            raise KeyError(f"sample {i} lacks {missing}")
        out.append({k: _numpy(sample[k]) for k in ("input_ids", "attention_mask", "latent")})
    return out


def write_upstream_format(
    directory: str | Path, samples: Any, *, flat_latents: bool = False, stem_format: str = "sample_{:06d}"
) -> tuple[Path, Path]:
    """Writes samples in upstream's layout under `directory/tokens` and `directory/latents`.

    Args:
        directory: created if needed; its `tokens` / `latents` subdirectories must be empty or absent.
        samples: a batch mapping (`input_ids` [B,S], `attention_mask` [B,S], `latent` [B,1,D] or
            [B,D]) or an iterable of per-sample mappings; tensors or arrays; only read.
        flat_latents: write latents as [D] instead of [1,D].
        stem_format: file stem of sample i (token file `<stem>_tokens.npz`, latent `<stem>.npy`).

    Returns (token_dir, latent_dir).
    """
    directory = Path(directory)
    token_dir, latent_dir = directory / "tokens", directory / "latents"
    for sub in (token_dir, latent_dir):
        if sub.exists() and any(sub.iterdir()):
            raise FileExistsError(f"{sub} already holds files; write to an empty directory")
        sub.mkdir(parents=True, exist_ok=True)
    rows = _samples(samples)
    for i, sample in enumerate(rows):
        stem = stem_format.format(i)
        np.savez(
            token_dir / f"{stem}{TOKEN_SUFFIX}.npz",
            input_ids=sample["input_ids"].astype(np.int64),
            attention_mask=sample["attention_mask"].astype(np.int64),
        )
        latent = sample["latent"].astype(np.float32).reshape(-1)
        np.save(latent_dir / f"{stem}.npy", latent if flat_latents else latent.reshape(1, -1))
    return token_dir, latent_dir
