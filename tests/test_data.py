"""Upstream-format data: round trip, every bad-file case is an error naming the file (never a zero
sample: upstream defect 7), synthetic data is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentDLM_mmdit.data import (
    DataError,
    SyntheticDataset,
    UpstreamLatentDataset,
    collate,
    write_upstream_format,
)
from latentDLM_mmdit.tokenizer import SyntheticVocab
from cycle_vae_impl.entrypoints.train_cycle_vae import CYCLE
from tests.builders import tiny_batch

VOCAB = SyntheticVocab(vocab_size=64, mask_token_id=63, pad_token_id=0)
B, S, D, MAX_LEN = 5, 12, 8, 32


@pytest.fixture
def batch():
    return tiny_batch(B, S, D, 7, VOCAB)


@pytest.fixture
def written(tmp_path, batch):
    token_dir, latent_dir = write_upstream_format(tmp_path / "data", batch)
    return token_dir, latent_dir


def _assert_samples_equal(dataset, batch):
    assert len(dataset) == B
    for i in range(B):
        sample = dataset[i]
        assert sample["input_ids"].dtype == torch.int64 and sample["attention_mask"].dtype == torch.int64
        assert sample["latent"].dtype == torch.float32 and tuple(sample["latent"].shape) == (1, D)
        torch.testing.assert_close(sample["input_ids"], batch["input_ids"][i], rtol=0, atol=0)
        torch.testing.assert_close(sample["attention_mask"], batch["attention_mask"][i], rtol=0, atol=0)
        torch.testing.assert_close(sample["latent"], batch["latent"][i], rtol=0, atol=0)


@pytest.mark.parametrize("flat", [False, True], ids=["latent_1xD", "latent_D"])
def test_round_trip(tmp_path, batch, flat):
    before = {k: v.clone() for k, v in batch.items()}
    token_dir, latent_dir = write_upstream_format(tmp_path / "data", batch, flat_latents=flat)
    for key in batch:  # the writer only reads its input
        assert torch.equal(batch[key], before[key])
    assert np.load(next(latent_dir.iterdir())).shape == ((D,) if flat else (1, D))
    assert sorted(p.name for p in token_dir.iterdir())[0] == "sample_000000_tokens.npz"
    dataset = UpstreamLatentDataset(token_dir, latent_dir, MAX_LEN, VOCAB)
    assert (dataset.seq_len, dataset.latent_dim) == (S, D)
    _assert_samples_equal(dataset, batch)
    collated = collate([dataset[i] for i in range(B)])
    assert tuple(collated["latent"].shape) == (B, 1, D)
    assert tuple(collated["input_ids"].shape) == (B, S)
    # Never zero samples: every latent is the written, non-zero one.
    assert bool((collated["latent"].abs().sum(-1) > 0).all())


def test_tokens_as_1xS_and_unsuffixed_stems_are_read(tmp_path, batch):
    token_dir, latent_dir = tmp_path / "t", tmp_path / "l"
    token_dir.mkdir(), latent_dir.mkdir()
    for i in range(B):
        np.savez(
            token_dir / f"doc{i}.npz",
            input_ids=batch["input_ids"][i : i + 1].numpy(),
            attention_mask=batch["attention_mask"][i : i + 1].numpy().astype(bool),
        )
        np.save(latent_dir / f"doc{i}.npy", batch["latent"][i, 0].numpy().astype(np.float64))
    _assert_samples_equal(UpstreamLatentDataset(token_dir, latent_dir, MAX_LEN, VOCAB), batch)


def test_write_refuses_a_directory_with_files(tmp_path, batch):
    write_upstream_format(tmp_path / "data", batch)
    with pytest.raises(FileExistsError, match="tokens"):
        write_upstream_format(tmp_path / "data", batch)


# -- bad files: (how to break sample 2, text the error must contain) ----------------------------------
def _garbage(path):
    path.write_bytes(b"this is not numpy data at all")


def _save_npy_as(path, array):
    path.unlink()
    with open(path, "wb") as handle:
        np.save(handle, array)


def _resave_tokens(path, **arrays):
    path.unlink()
    np.savez(path, **arrays)


BAD_TOKEN_CASES = {
    "unreadable": (lambda p, b: _garbage(p), "cannot be read"),
    "npy_instead_of_npz": (lambda p, b: _save_npy_as(p, b["input_ids"][2].numpy()), "not an .npz"),
    "missing_attention_mask": (
        lambda p, b: _resave_tokens(p, input_ids=b["input_ids"][2].numpy()),
        "lacks attention_mask",
    ),
    "misshaped_ids": (
        lambda p, b: _resave_tokens(
            p, input_ids=b["input_ids"][:2].numpy(), attention_mask=b["attention_mask"][:2].numpy()
        ),
        "shape",
    ),
    "mask_shape_differs": (
        lambda p, b: _resave_tokens(
            p, input_ids=b["input_ids"][2].numpy(), attention_mask=b["attention_mask"][2, :-1].numpy()
        ),
        "differ in shape",
    ),
    "float_ids": (
        lambda p, b: _resave_tokens(
            p, input_ids=b["input_ids"][2].numpy().astype(np.float32), attention_mask=b["attention_mask"][2].numpy()
        ),
        "integers",
    ),
    "id_above_vocab": (
        lambda p, b: _resave_tokens(p, input_ids=np.full(S, 64), attention_mask=np.ones(S, np.int64)),
        "token id 64 is outside the vocabulary",
    ),
    "negative_id": (
        lambda p, b: _resave_tokens(p, input_ids=np.full(S, -1), attention_mask=np.ones(S, np.int64)),
        "token id -1",
    ),
    "other_length": (
        lambda p, b: _resave_tokens(p, input_ids=np.ones(S - 2, np.int64), attention_mask=np.ones(S - 2, np.int64)),
        "sequence length 10 differs",
    ),
    "mask_not_binary": (
        lambda p, b: _resave_tokens(p, input_ids=b["input_ids"][2].numpy(), attention_mask=np.full(S, 2)),
        "0/1",
    ),
}

BAD_LATENT_CASES = {
    "unreadable": (lambda p, b: _garbage(p), "cannot be read"),
    "misshaped": (lambda p, b: np.save(p, np.ones((2, D), np.float32)), "shape"),
    "other_width": (lambda p, b: np.save(p, np.ones(D + 1, np.float32)), "width 9 differs"),
    "non_finite": (lambda p, b: np.save(p, np.full(D, np.nan, np.float32)), "non-finite"),
    "integer": (lambda p, b: np.save(p, np.ones(D, np.int64)), "floating point"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKEN_CASES))
def test_bad_token_file_names_the_file(written, batch, case):
    token_dir, latent_dir = written
    breaker, message = BAD_TOKEN_CASES[case]
    bad = token_dir / "sample_000002_tokens.npz"
    breaker(bad, batch)
    dataset = UpstreamLatentDataset(token_dir, latent_dir, MAX_LEN, VOCAB)  # sample 0 is fine
    torch.testing.assert_close(dataset[1]["latent"], batch["latent"][1], rtol=0, atol=0)
    for read in (lambda: dataset[2], dataset.validate):
        with pytest.raises(DataError, match=message) as info:
            read()
        assert str(bad) in str(info.value)


@pytest.mark.parametrize("case", sorted(BAD_LATENT_CASES))
def test_bad_latent_file_names_the_file(written, batch, case):
    token_dir, latent_dir = written
    breaker, message = BAD_LATENT_CASES[case]
    bad = latent_dir / "sample_000002.npy"
    breaker(bad, batch)
    dataset = UpstreamLatentDataset(token_dir, latent_dir, MAX_LEN, VOCAB)
    with pytest.raises(DataError, match=message) as info:
        dataset[2]
    assert str(bad) in str(info.value)


def test_bad_first_file_is_named_when_read(written):
    # the reference length comes from the first sample that reads; the bad one fails where it is read
    token_dir, latent_dir = written
    bad = token_dir / "sample_000000_tokens.npz"
    _garbage(bad)
    dataset = UpstreamLatentDataset(token_dir, latent_dir, MAX_LEN, VOCAB)
    with pytest.raises(DataError, match="cannot be read") as info:
        dataset[0]
    assert str(bad) in str(info.value)
    assert dataset[1]["input_ids"].shape[0] == dataset.seq_len


def test_no_readable_sample_fails_at_construction_naming_them(written):
    token_dir, latent_dir = written
    for bad in sorted(token_dir.glob("*.npz")):
        _garbage(bad)
    with pytest.raises(DataError, match="none of the first") as info:
        UpstreamLatentDataset(token_dir, latent_dir, MAX_LEN, VOCAB)
    assert "sample_000000_tokens.npz" in str(info.value) and "cannot be read" in str(info.value)


def test_sequence_longer_than_max_seq_len(written):
    token_dir, latent_dir = written
    with pytest.raises(DataError, match=f"sequence length {S} exceeds model.max_seq_len={S - 1}") as info:
        UpstreamLatentDataset(token_dir, latent_dir, S - 1, VOCAB)
    assert "sample_000000_tokens.npz" in str(info.value)


def test_missing_latent_names_the_token_file(written):
    token_dir, latent_dir = written
    (latent_dir / "sample_000003.npy").unlink()
    with pytest.raises(DataError, match="has no latent") as info:
        UpstreamLatentDataset(token_dir, latent_dir, MAX_LEN, VOCAB)
    assert str(token_dir / "sample_000003_tokens.npz") in str(info.value)
    assert str(latent_dir / "sample_000003.npy") in str(info.value)


def test_latent_without_tokens_names_the_latent_file(written):
    token_dir, latent_dir = written
    (token_dir / "sample_000004_tokens.npz").unlink()
    with pytest.raises(DataError, match="has no token file") as info:
        UpstreamLatentDataset(token_dir, latent_dir, MAX_LEN, VOCAB)
    assert str(latent_dir / "sample_000004.npy") in str(info.value)


def test_missing_or_empty_directories(tmp_path, written):
    token_dir, latent_dir = written
    with pytest.raises(DataError, match="does not exist") as info:
        UpstreamLatentDataset(tmp_path / "nowhere", latent_dir, MAX_LEN, VOCAB)
    assert "nowhere" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no"):
        UpstreamLatentDataset(empty, latent_dir, MAX_LEN, VOCAB)


def test_synthetic_dataset_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = SyntheticDataset(VOCAB, 6, S, D, seed=3)
    b = SyntheticDataset(VOCAB, 6, S, D, seed=3)
    c = SyntheticDataset(VOCAB, 6, S, D, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for i in range(6):
        for key in ("input_ids", "attention_mask", "latent"):
            torch.testing.assert_close(a[i][key], b[i][key], rtol=0, atol=0)
    assert not torch.equal(a[0]["latent"], c[0]["latent"])
    assert tuple(a[0]["latent"].shape) == (1, D) and a[0]["input_ids"].dtype == torch.int64
    assert int(a[0]["input_ids"].max()) < 63  # the mask id never appears in real tokens
    with pytest.raises(IndexError):
        a[6]


def test_training_reads_upstream_data(tmp_path):
    """The training loop on upstream-format files: from the flags or from data.*; a latent width
    that is not model.latent_dim and a bad file met mid-run are errors naming them."""
    from cycle_vae_impl.configs import config_path
    from latentDLM_mmdit.config import load_config
    from latentDLM_mmdit.training import TrainingError, run_training

    tiny = [
        "model.n_blocks=1",
        "model.hidden_size=32",
        "model.cond_dim=32",
        "training.num_train_steps=2",
        "training.train_batch_size=2",
    ]
    batch = tiny_batch(4, S, 16, 3, VOCAB)
    token_dir, latent_dir = write_upstream_format(tmp_path / "data", batch, flat_latents=True)
    config = load_config(config_path("cycle"), tiny)
    result = run_training(
        config,
        trainer=CYCLE,
        output_dir=tmp_path / "a",
        synthetic=False,
        token_dir=token_dir,
        latent_dir=latent_dir,
        progress=False,
        device="cpu",
    )
    assert [m["step"] for m in result.metrics] == [1, 2]
    from_config = load_config(
        config_path("cycle"), tiny + [f"data.token_dir={token_dir}", f"data.latent_dir={latent_dir}"]
    )
    again = run_training(
        from_config, trainer=CYCLE, output_dir=tmp_path / "b", synthetic=False, progress=False, device="cpu"
    )
    assert [m["loss"] for m in again.metrics] == [m["loss"] for m in result.metrics]

    narrow = load_config(config_path("cycle"), tiny + ["model.latent_dim=8"])
    with pytest.raises(TrainingError, match="width 16, model.latent_dim is 8"):
        run_training(
            narrow,
            trainer=CYCLE,
            output_dir=tmp_path / "c",
            synthetic=False,
            token_dir=token_dir,
            latent_dir=latent_dir,
            progress=False,
            device="cpu",
        )

    _garbage(latent_dir / "sample_000003.npy")  # met in the first two steps (4 samples, 2 per step)
    with pytest.raises(DataError, match="cannot be read") as info:
        run_training(
            config,
            trainer=CYCLE,
            output_dir=tmp_path / "d",
            synthetic=False,
            token_dir=token_dir,
            latent_dir=latent_dir,
            progress=False,
            device="cpu",
        )
    assert "sample_000003.npy" in str(info.value)
