"""The vocabulary: explicit ids, local tokenizer folders (vocab.txt or tokenizer.json), upstream's
[MASK] addition, and errors that name exactly what to pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from cycle_vae_impl.configs import config_path
from latentDLM_mmdit.config import ConfigError, load_config
from latentDLM_mmdit.tokenizer import (
    read_tokenizer_folder,
    resolve_vocab,
    vocab_from_config,
)

DATA = Path(__file__).parent / "data" / "tokenizers"
BERT_TXT, BERT_JSON = DATA / "bert_tiny", DATA / "bert_tiny_json"
SPEC = (32, 4, 0)  # vocab_size, mask_token_id ([MASK]), pad_token_id ([PAD])


def _spec(resolution) -> tuple[int, int, int]:
    v = resolution.vocab
    return v.vocab_size, v.mask_token_id, v.pad_token_id


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("folder", [BERT_TXT, BERT_JSON], ids=["vocab.txt", "tokenizer.json"])
def test_a_tokenizer_folder_gives_the_vocabulary(folder):
    resolution = resolve_vocab({}, tokenizer_dir=folder)
    assert _spec(resolution) == SPEC
    assert all(source.startswith("tokenizer folder") for source in resolution.sources.values())
    assert resolution.folder == folder


def test_the_tokenizer_json_is_a_real_tokenizer_of_the_same_vocabulary():
    tokenizer = Tokenizer.from_file(str(BERT_JSON / "tokenizer.json"))
    vocab = (BERT_TXT / "vocab.txt").read_text().split("\n")[:-1]
    assert tokenizer.get_vocab() == {token: i for i, token in enumerate(vocab)}
    assert [vocab[i] for i in tokenizer.encode("The cats ran.").ids] == ["the", "cat", "##s", "ran", "."]


def test_the_folder_gives_values_first_and_says_which_config_values_it_overrode():
    # upstream's entry points read the vocabulary from the tokenizer at tokenizer.path when it is set;
    # the config's vocab_size / ids are its dummy-tokenizer fallback (e.g. the cluster config's 8192)
    explicit = {"tokenizer": {"vocab_size": 32, "mask_token_id": 4, "pad_token_id": 0}}
    resolution = resolve_vocab(explicit, tokenizer_dir=BERT_TXT)
    assert _spec(resolution) == SPEC and all(v.startswith("tokenizer folder") for v in resolution.sources.values())
    assert resolution.ignored == ()  # the same values: nothing overridden
    partial = resolve_vocab({"tokenizer": {"pad_token_id": 0}}, tokenizer_dir=BERT_JSON)
    assert partial.sources["pad_token_id"].startswith("tokenizer folder")
    fallback = resolve_vocab({"tokenizer": {"vocab_size": 8192, "mask_token_id": 103}}, tokenizer_dir=BERT_TXT)
    assert _spec(fallback) == SPEC
    assert [line.split(" not used")[0] for line in fallback.ignored] == [
        "tokenizer.vocab_size=8192",
        "tokenizer.mask_token_id=103",
    ]
    assert "gives 32" in fallback.ignored[0] and "tokenizer.path is set" in fallback.ignored[0]


def test_a_value_the_folder_does_not_declare_comes_from_the_config(tmp_path):
    folder = tmp_path / "no_pad"
    folder.mkdir()
    (folder / "vocab.txt").write_text((BERT_TXT / "vocab.txt").read_text())
    (folder / "special_tokens_map.json").write_text('{"mask_token": "[MASK]"}')
    resolution = resolve_vocab({"tokenizer": {"pad_token_id": 0}}, tokenizer_dir=folder)
    assert resolution.sources["pad_token_id"] == "config" and resolution.vocab.pad_token_id == 0


def test_nothing_available_names_exactly_what_to_pass():
    with pytest.raises(ConfigError) as info:
        resolve_vocab({"tokenizer": {"pad_token_id": 0}}, owner="config file x.yaml")
    message = str(info.value)
    assert "no tokenizer.vocab_size, tokenizer.mask_token_id" in message
    assert "--tokenizer DIR" in message and "tokenizer.path" in message
    assert "tokenizer.vocab_size=N tokenizer.mask_token_id=N" in message and "config file x.yaml" in message


def test_a_tokenizer_path_that_does_not_exist_here():
    cluster = {"tokenizer": {"path": "/cluster/tokenizers/bert-base-uncased"}}
    with pytest.raises(ConfigError, match="tokenizer.path /cluster/tokenizers/bert-base-uncased does not exist"):
        resolve_vocab(cluster)
    # Not needed when every value is given; --tokenizer DIR replaces it.
    given = {"tokenizer": dict(cluster["tokenizer"], vocab_size=32, mask_token_id=4, pad_token_id=0)}
    assert _spec(resolve_vocab(given)) == SPEC and resolve_vocab(given).folder is None
    assert _spec(resolve_vocab(cluster, tokenizer_dir=BERT_JSON)) == SPEC
    with pytest.raises(ConfigError, match="tokenizer folder /nonexistent/tok does not exist"):
        resolve_vocab(given, tokenizer_dir="/nonexistent/tok")


def test_a_folder_without_a_mask_token_gets_mask_as_upstreams_get_tokenizer_added_it(tmp_path):
    """Upstream added [MASK] whenever the tokenizer had none: the existing id when the vocabulary
    has the token, else a new id len(tokenizer)."""
    folder = _copy(BERT_TXT, tmp_path)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        _edit_json(folder / name, mask_token=None)
    assert _spec(resolve_vocab({}, tokenizer_dir=folder)) == SPEC  # [MASK] is in vocab.txt: id 4
    lines = (folder / "vocab.txt").read_text().split("\n")
    (folder / "vocab.txt").write_text("\n".join(t for t in lines if t != "[MASK]"))
    resolution = resolve_vocab({}, tokenizer_dir=folder)
    assert _spec(resolution) == (32, 31, 0)  # 31 tokens, [MASK] appended at 31
    assert "added as a new id 31" in resolution.sources["mask_token_id"]
    with pytest.raises(ConfigError, match="add_mask_token is false"):
        resolve_vocab({"tokenizer": {"add_mask_token": False}}, tokenizer_dir=folder)


def test_folder_problems_name_the_file(tmp_path):
    folder = _copy(BERT_TXT, tmp_path)
    _edit_json(folder / "special_tokens_map.json", pad_token=None)
    _edit_json(folder / "tokenizer_config.json", pad_token=None)
    with pytest.raises(ConfigError, match="no tokenizer.pad_token_id .*does not declare it.*tokenizer.pad_token_id=N"):
        resolve_vocab({}, tokenizer_dir=folder)
    _edit_json(folder / "special_tokens_map.json", pad_token="<pad>")
    with pytest.raises(ConfigError, match="special_tokens_map.json declares pad_token '<pad>', which the vocabulary"):
        read_tokenizer_folder(folder)
    (folder / "special_tokens_map.json").write_text("{not json")
    with pytest.raises(ConfigError, match="special_tokens_map.json cannot be read as JSON"):
        read_tokenizer_folder(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="has neither tokenizer.json nor vocab.txt"):
        read_tokenizer_folder(empty)
    (empty / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="cannot be read by the tokenizers library"):
        read_tokenizer_folder(empty)


def test_load_config_fills_the_vocabulary_from_tokenizer_and_records_where_it_came_from():
    config = load_config(
        config_path("cycle"),
        ["tokenizer.vocab_size=null", "tokenizer.mask_token_id=null", "tokenizer.pad_token_id=null"],
        tokenizer_dir=BERT_TXT,
    )
    assert (config.tokenizer.vocab_size, config.tokenizer.mask_token_id, config.tokenizer.pad_token_id) == SPEC
    assert config.tokenizer.path == str(BERT_TXT)
    assert vocab_from_config(config).vocab_size == 32
    # the packaged config says 64 (and ids 63, 0): the folder's values are used, the config's said to be unused
    overridden = load_config(config_path("cycle"), tokenizer_dir=BERT_TXT)
    assert overridden.tokenizer.vocab_size == 32 and overridden.tokenizer.mask_token_id == 4


# -- the gate's reading of a tokenizer folder (compat.inputs.resolve_gate_vocab) ------------------
def _gate_configs(**tokenizer):
    from omegaconf import OmegaConf

    config = OmegaConf.create({"tokenizer": {"path": "", "add_mask_token": True, **tokenizer}})
    return {"cycle": config, "stable": config}


def _folder_without(tmp_path, name: str, specials: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "vocab.txt").write_text((BERT_TXT / "vocab.txt").read_text())
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    return folder


def test_the_gate_says_the_folder_declares_no_pad_token(tmp_path):
    from compat.inputs import resolve_gate_vocab
    from compat.options import CompatOptions
    from compat.outcomes import GateInputError

    folder = _folder_without(tmp_path, "no_pad", {"mask_token": "[MASK]"})
    with pytest.raises(GateInputError) as info:
        resolve_gate_vocab(CompatOptions(tokenizer=str(folder)), 32, _gate_configs())
    assert f"the tokenizer folder {folder} declares no pad_token" in info.value.problem
    assert "not on this machine" not in info.value.problem and "--pad-token-id ID" in info.value.fix
    got = resolve_gate_vocab(CompatOptions(tokenizer=str(folder), pad_token_id=0), 32, _gate_configs())
    assert (got.vocab.mask_token_id, got.vocab.pad_token_id) == (4, 0)


def test_the_gate_explains_a_folder_one_id_larger_as_the_mask_upstream_adds(tmp_path):
    from compat.inputs import resolve_gate_vocab
    from compat.options import CompatOptions
    from compat.outcomes import GateInputError

    words = [w for w in (BERT_TXT / "vocab.txt").read_text().splitlines() if w != "[MASK]"]
    folder = tmp_path / "no_mask"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    with pytest.raises(GateInputError) as info:
        resolve_gate_vocab(CompatOptions(tokenizer=str(folder)), len(words), _gate_configs())
    assert "declares no mask token" in info.value.problem and f"[MASK] added as id {len(words)}" in info.value.problem
    assert "--mask-token-id" in info.value.fix
    given = resolve_gate_vocab(CompatOptions(tokenizer=str(folder), mask_token_id=3), len(words), _gate_configs())
    assert (given.vocab.vocab_size, given.vocab.mask_token_id) == (len(words), 3)
