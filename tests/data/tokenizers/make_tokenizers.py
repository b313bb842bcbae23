"""Writes the tiny BERT-like tokenizer folders the tests read (run from anywhere; nothing is downloaded).

    bert_tiny/       vocab.txt + special_tokens_map.json + tokenizer_config.json (the slow-tokenizer layout)
    bert_tiny_json/  tokenizer.json (built here with the `tokenizers` library) + tokenizer_config.json

Both describe the same 32-token WordPiece vocabulary: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece

HERE = Path(__file__).resolve().parent
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "ran",
    "to",
    "and",
    "is",
    "was",
    "big",
    "small",
    "red",
    "blue",
    "house",
    "tree",
    "bird",
    "sun",
    "##s",
    "##ed",
    "##ing",
    "##er",
    "##ly",
    ".",
    ",",
]
SPECIAL_MAP = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
TOKENIZER_CONFIG = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 32, **SPECIAL_MAP}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    tokens = SPECIALS + WORDS
    slow = HERE / "bert_tiny"
    slow.mkdir(exist_ok=True)
    (slow / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    write_json(slow / "special_tokens_map.json", SPECIAL_MAP)
    write_json(slow / "tokenizer_config.json", TOKENIZER_CONFIG)

    fast = HERE / "bert_tiny_json"
    fast.mkdir(exist_ok=True)
    tokenizer = Tokenizer(WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(str(fast / "tokenizer.json"))
    write_json(fast / "tokenizer_config.json", TOKENIZER_CONFIG)


if __name__ == "__main__":
    main()
