"""Vocabulary specs, from explicit ids or a local tokenizer folder; nothing is downloaded.

A tokenizer here is anything with `mask_token_id`, `pad_token_id` and `__len__`. The trainers and
the text noise process need only that, so a run needs three numbers: `vocab_size` (the model's
embedding rows, upstream's `len(tokenizer)`), `mask_token_id` and `pad_token_id`. They come from
the config's `tokenizer` section when it gives them, else from a tokenizer folder (`--tokenizer DIR`
or `tokenizer.path`):

- `tokenizer.json` (read with the `tokenizers` library): the vocabulary with its added tokens;
- else `vocab.txt` (one token per line, id = line number) plus `added_tokens.json` when present;
- the special tokens from `special_tokens_map.json`, else `tokenizer_config.json`.

Upstream's `get_tokenizer` (latentDLM_mmdit/modeling_mmdit.py) added `[MASK]` whenever the tokenizer
had no mask token, whatever `tokenizer.add_mask_token` said (no code read that key): the id of
`[MASK]` when the vocabulary has it, else a new id `len(tokenizer)`, which grows the vocabulary by
one. `add_mask_token: true` (the default) does the same here; `false` makes such a folder an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from latentDLM_mmdit.settings import ConfigError, validate_settings

VOCAB_KEYS = ("vocab_size", "mask_token_id", "pad_token_id")
UPSTREAM_MASK_TOKEN = "[MASK]"  # what upstream's get_tokenizer added when a tokenizer had no mask token
FOLDER_HELP = (
    "a local folder with tokenizer.json, or vocab.txt, and special_tokens_map.json or "
    "tokenizer_config.json naming the mask and pad tokens"
)


class VocabSpec(Protocol):
    mask_token_id: int
    pad_token_id: int

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class SyntheticVocab:
    """A vocabulary of `vocab_size` ids with a mask id and a pad id.

    Args:
        vocab_size: number of ids, V.
        mask_token_id: the id written where a token is masked (in [0, V)).
        pad_token_id: the id of padding positions (in [0, V), different from the mask id).
    """

    vocab_size: int
    mask_token_id: int
    pad_token_id: int = 0

    def __post_init__(self):
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        for name in ("mask_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        if self.mask_token_id == self.pad_token_id:
            raise ValueError(f"mask_token_id and pad_token_id are both {self.mask_token_id}")

    def __len__(self) -> int:
        return self.vocab_size


# -- tokenizer folders ----------------------------------------------------------------------------
@dataclass(frozen=True)
class FolderVocab:
    """What a tokenizer folder gives.

    Args:
        folder: the folder read.
        vocab_size: upstream's len(tokenizer), the added [MASK] included.
        mask_token_id: id of the mask token (declared, or added as upstream did).
        pad_token_id: id of the declared pad token, or None when the folder declares none.
        described: per key, the files it was read from.
    """

    folder: Path
    vocab_size: int
    mask_token_id: int
    pad_token_id: int | None
    described: dict[str, str]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"tokenizer file {path} cannot be read as JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"tokenizer file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any, path: Path, name: str) -> str | None:
    """A special token as written by transformers: a string, or {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if isinstance(value, str):
        return value
    raise ConfigError(f'tokenizer file {path}: {name} must be a string or {{"content": ...}}, got {value!r}')


def _declared_special_tokens(folder: Path) -> dict[str, tuple[str, str]]:
    """mask/pad token text and the file that declares it (special_tokens_map.json wins, as in transformers)."""
    declared: dict[str, tuple[str, str]] = {}
    for filename in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / filename
        if not path.is_file():
            continue
        data = _read_json(path)
        for name in ("mask_token", "pad_token"):
            text = _token_text(data.get(name), path, name)
            if text is not None and name not in declared:
                declared[name] = (text, filename)
    return declared


def _read_vocabulary(folder: Path) -> tuple[dict[str, int], int, str]:
    """(token -> id, len(tokenizer), files) from tokenizer.json, else vocab.txt (+ added_tokens.json)."""
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # the Rust library raises plain Exceptions
            raise ConfigError(
                f"tokenizer file {tokenizer_json} cannot be read by the tokenizers library: {exc}"
            ) from exc
        return (
            tokenizer.get_vocab(with_added_tokens=True),
            tokenizer.get_vocab_size(with_added_tokens=True),
            "tokenizer.json",
        )
    vocab_txt = folder / "vocab.txt"
    if not vocab_txt.is_file():
        raise ConfigError(f"tokenizer folder {folder} has neither tokenizer.json nor vocab.txt; pass {FOLDER_HELP}")
    try:
        lines = vocab_txt.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tokenizer file {vocab_txt} cannot be read ({type(exc).__name__}: {exc})") from exc
    if lines and lines[-1] == "":
        lines = lines[:-1]
    vocab: dict[str, int] = {}
    for index, token in enumerate(lines):
        if token in vocab:
            raise ConfigError(
                f"tokenizer file {vocab_txt}: token {token!r} appears on lines {vocab[token] + 1} and {index + 1}"
            )
        vocab[token] = index
    files = "vocab.txt"
    added_path = folder / "added_tokens.json"
    if added_path.is_file():
        for token, index in _read_json(added_path).items():
            if token not in vocab:
                vocab[token] = int(index)
        files += " + added_tokens.json"
    return vocab, len(vocab), files


def read_tokenizer_folder(folder: str | Path, add_mask_token: bool = True) -> FolderVocab:
    """The vocabulary size and the mask and pad ids of a local tokenizer folder (see the module
    docstring). Raises ConfigError naming the folder, the file and what to pass instead."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"tokenizer folder {folder} does not exist or is not a directory; pass {FOLDER_HELP}")
    vocab, size, files = _read_vocabulary(folder)
    declared = _declared_special_tokens(folder)
    ids: dict[str, int | None] = {}
    described = {"vocab_size": f"{folder}/{files}"}
    for name in ("mask_token", "pad_token"):
        if name not in declared:
            ids[name] = None
            continue
        text, filename = declared[name]
        if text not in vocab:
            raise ConfigError(
                f"tokenizer folder {folder}: {filename} declares {name} {text!r}, which the vocabulary "
                f"({files}) lacks; give tokenizer.{name}_id and tokenizer.vocab_size explicitly"
            )
        ids[name] = vocab[text]
        described[f"{name}_id"] = f"{folder}/{filename} ({name} {text!r}) + {files}"
    if ids["mask_token"] is None:
        if not add_mask_token:
            raise ConfigError(
                f"tokenizer folder {folder} declares no mask token and tokenizer.add_mask_token is false; "
                "set tokenizer.add_mask_token=true to add [MASK] as upstream's get_tokenizer did, or give "
                "tokenizer.mask_token_id and tokenizer.vocab_size explicitly"
            )
        if UPSTREAM_MASK_TOKEN in vocab:
            ids["mask_token"] = vocab[UPSTREAM_MASK_TOKEN]
            described["mask_token_id"] = (
                f"{folder}/{files} ({UPSTREAM_MASK_TOKEN}, no mask token declared: upstream's get_tokenizer)"
            )
        else:
            ids["mask_token"] = size
            size += 1
            described["mask_token_id"] = (
                f"added as a new id {ids['mask_token']} (no mask token in {folder}: "
                "upstream's get_tokenizer added [MASK]; tokenizer.add_mask_token)"
            )
            described["vocab_size"] += " + the added [MASK]"
    return FolderVocab(folder, size, int(ids["mask_token"]), ids["pad_token"], described)


# -- resolution -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VocabResolution:
    """The vocabulary of a config and where each value came from.

    Args:
        vocab: the spec (vocab_size, mask_token_id, pad_token_id).
        sources: per key of VOCAB_KEYS: "config" or the tokenizer folder file it was read from.
        folder: the tokenizer folder read, or None.
        ignored: the config's tokenizer values a folder overrode, each said with the value used.
    """

    vocab: SyntheticVocab
    sources: dict[str, str]
    folder: Path | None
    ignored: tuple[str, ...] = ()  # config values the tokenizer folder overrode, each with the value used


def _unavailable(missing: list[str], owner: str, why: str) -> ConfigError:
    explicit = " ".join(f"tokenizer.{k}=N" for k in missing)
    return ConfigError(
        f"{owner}: no {', '.join('tokenizer.' + k for k in missing)} ({why}); pass --tokenizer DIR "
        f"({FOLDER_HELP}), set tokenizer.path in the config, or give the value"
        f"{'s' if len(missing) > 1 else ''} explicitly: {explicit}"
    )


def resolve_vocab(config: Any, tokenizer_dir: str | Path | None = None, owner: str = "config") -> VocabResolution:
    """The vocabulary of `config` (only read). With a tokenizer folder (`tokenizer_dir`, which
    replaces tokenizer.path, or a tokenizer.path that exists here) each of vocab_size, mask_token_id
    and pad_token_id comes from the folder, as upstream's entry points took them from the tokenizer at
    tokenizer.path (its configs' vocab_size / ids are the dummy-tokenizer fallback, read only without a
    path); a config value the folder overrides is listed in `ignored` with the value used, and a value
    the folder does not declare (a pad token) comes from the config. Without a folder, from the config.

    Args:
        config: the run config (mapping or DictConfig).
        tokenizer_dir: a local tokenizer folder (the entry points' --tokenizer DIR).
        owner: names the config in errors.

    Raises ConfigError naming what to pass when a value is unavailable.
    """
    tok = validate_settings(config, owner, shared=True).config.tokenizer
    explicit = {k: tok[k] for k in VOCAB_KEYS if tok[k] is not None}
    folder_path = Path(tokenizer_dir) if tokenizer_dir is not None else (Path(tok.path) if tok.path else None)
    from_folder: FolderVocab | None = None
    if folder_path is not None:
        if tokenizer_dir is None and not folder_path.is_dir() and len(explicit) == len(VOCAB_KEYS):
            folder_path = None  # not needed: every value is given (e.g. a cluster path in an upstream config)
        elif tokenizer_dir is None and not folder_path.is_dir():
            missing = [k for k in VOCAB_KEYS if k not in explicit]
            raise _unavailable(missing, owner, f"tokenizer.path {folder_path} does not exist on this machine")
        else:
            from_folder = read_tokenizer_folder(folder_path, bool(tok.add_mask_token))
    values: dict[str, int] = {}
    sources: dict[str, str] = {}
    ignored: list[str] = []
    for key in VOCAB_KEYS:
        folder_value = getattr(from_folder, key) if from_folder is not None else None
        if folder_value is not None:
            values[key], sources[key] = int(folder_value), f"tokenizer folder {from_folder.described[key]}"
            if key in explicit and int(explicit[key]) != int(folder_value):
                ignored.append(
                    f"tokenizer.{key}={explicit[key]} not used: the tokenizer folder gives {folder_value} "
                    f"({from_folder.described[key]}), which is what upstream's entry points use when "
                    "tokenizer.path is set"
                )
        elif key in explicit:
            values[key], sources[key] = int(explicit[key]), "config"
    missing = [k for k in VOCAB_KEYS if k not in values]
    if missing:
        why = (
            f"the tokenizer folder {folder_path} does not declare it"
            if from_folder is not None
            else "the config's tokenizer section does not give it and no tokenizer folder was given"
        )
        raise _unavailable(missing, owner, why)
    try:
        vocab = SyntheticVocab(values["vocab_size"], values["mask_token_id"], values["pad_token_id"])
    except ValueError as exc:
        raise ConfigError(
            f"{owner}: the vocabulary ({', '.join(f'{k} from {v}' for k, v in sources.items())}) is not usable: {exc}"
        ) from exc
    return VocabResolution(vocab, sources, folder_path if from_folder is not None else None, tuple(ignored))


def apply_vocab(resolved: Any, resolution: VocabResolution) -> None:
    """Writes a resolved vocabulary into a ResolvedConfig (its config, its sources and, for config
    values a tokenizer folder overrode, its notes)."""
    resolved.notes.extend(resolution.ignored)
    tok = resolved.config.tokenizer
    for key in VOCAB_KEYS:
        tok[key] = getattr(resolution.vocab, key)
        if resolution.sources[key] != "config":
            resolved.sources[f"tokenizer.{key}"] = resolution.sources[key]
    if resolution.folder is not None:
        if tok.path != str(resolution.folder):
            resolved.sources["tokenizer.path"] = "--tokenizer"
        tok.path = str(resolution.folder)


def vocab_from_config(config: Any, tokenizer_dir: str | Path | None = None) -> SyntheticVocab:
    """The vocabulary spec of a config (see `resolve_vocab`)."""
    return resolve_vocab(config, tokenizer_dir).vocab


def check_vocab(tokenizer: Any) -> None:
    """Raises a TypeError naming what a tokenizer-like object lacks."""
    missing = [a for a in ("mask_token_id", "pad_token_id") if not hasattr(tokenizer, a)]
    if not hasattr(tokenizer, "__len__"):
        missing.append("__len__")
    if missing:
        raise TypeError(f"tokenizer {type(tokenizer).__name__} lacks {', '.join(missing)}")
