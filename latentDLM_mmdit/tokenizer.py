"""Vocabulary specs. A tokenizer here is anything with `mask_token_id`, `pad_token_id` and
`__len__`; nothing is downloaded. `SyntheticVocab` is the spec used for synthetic data and tests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


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


def vocab_from_config(config: Any) -> SyntheticVocab:
    """Builds the vocabulary spec from a config's `tokenizer` section (vocab_size, mask_token_id,
    pad_token_id)."""
    tok = config.tokenizer
    return SyntheticVocab(int(tok.vocab_size), int(tok.mask_token_id), int(tok.get("pad_token_id", 0)))


def check_vocab(tokenizer: Any) -> None:
    """Raises a TypeError naming what a tokenizer-like object lacks."""
    missing = [a for a in ("mask_token_id", "pad_token_id") if not hasattr(tokenizer, a)]
    if not hasattr(tokenizer, "__len__"):
        missing.append("__len__")
    if missing:
        raise TypeError(f"tokenizer {type(tokenizer).__name__} lacks {', '.join(missing)}")
