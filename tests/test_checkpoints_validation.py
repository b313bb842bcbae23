"""Checkpoint validation: safetensors headers checked before anything is allocated, recorded
model sizes checked against the shapes, the model layout from names and shapes alone, and
non-finite weights found one tensor at a time."""

from __future__ import annotations

import gc
import hashlib
import json
import struct
import tracemalloc
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentDLM_mmdit import checkpoints
from latentDLM_mmdit.checkpoints import (
    CheckpointError,
    ModelLayout,
    checkpoint_layout,
    derive_layout,
    explain_layout_differences,
    find_non_finite,
    layout_differences,
    load_checkpoint_into,
    model_sizes_from,
    open_checkpoint,
    save_checkpoint,
)
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
from tests.builders import tiny_model

V, D = 16, 4
MMDIT02_FIXTURE = Path(__file__).resolve().parents[1] / "compat" / "data" / "mmdit02_layout_h16.safetensors"


def make_model(
    seed: int = 0, vocab_size: int = V, latent_dim: int = D, cluster_size: int = 0, **overrides
) -> MultimodalMMDiT:
    return tiny_model(seed, vocab_size=vocab_size, latent_dim=latent_dim, cluster_size=cluster_size, **overrides)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- safetensors headers ---------------------------------------------------------------------------
def raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file written byte by byte: 8-byte length (given or true), header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def f32(begin: int, end: int, shape: list[int]) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


BAD_HEADERS = {
    "empty": (lambda p: p.write_bytes(b""), "the file is empty (0 bytes)"),
    "shorter-than-8": (lambda p: p.write_bytes(b"\x01\x02\x03"), "3 bytes, shorter than the 8-byte header length"),
    "header-beyond-file": (
        lambda p: raw_safetensors(p, {}, length=1000),
        "declares a 1000-byte header but the file has only 2 bytes after the length",
    ),
    "header-bomb": (lambda p: raw_safetensors(p, {}, length=2**62), "header bomb"),
    "not-json": (lambda p: raw_safetensors(p, b"{not json"), "its header is not JSON"),
    "json-list": (lambda p: raw_safetensors(p, b"[1, 2]"), "its header is a JSON list, not an object"),
    "metadata-not-strings": (
        lambda p: raw_safetensors(p, {"__metadata__": {"step": 3}}),
        "its __metadata__ is not a JSON object of strings",
    ),
    "entry-not-object": (lambda p: raw_safetensors(p, {"t": 5}), "header entry 't' is not an object"),
    "unknown-dtype": (
        lambda p: raw_safetensors(p, {"t": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
        "tensor 't' has unknown dtype 'F128'",
    ),
    "negative-shape": (
        lambda p: raw_safetensors(p, {"t": f32(0, 4, [-1])}, bytes(4)),
        "has shape [-1], not a list of non-negative integers",
    ),
    "reversed-offsets": (
        lambda p: raw_safetensors(p, {"t": f32(8, 0, [2])}, bytes(8)),
        "has data_offsets [8, 0], not [begin, end]",
    ),
    "size-mismatch": (
        lambda p: raw_safetensors(p, {"t": f32(0, 4, [2])}, bytes(4)),
        "data_offsets [0, 4] (4 bytes) but shape [2] x F32 needs 8 bytes",
    ),
    "offsets-beyond-file": (
        lambda p: raw_safetensors(p, {"t": f32(0, 16, [4])}, bytes(8)),
        "tensor 't' ends at byte 16 of a data section of 8 bytes",
    ),
    "overlap": (
        lambda p: raw_safetensors(p, {"a": f32(0, 8, [2]), "b": f32(4, 12, [2])}, bytes(12)),
        "tensors 'a' and 'b' overlap",
    ),
    "gap": (
        lambda p: raw_safetensors(p, {"a": f32(0, 8, [2]), "b": f32(12, 20, [2])}, bytes(20)),
        "4 bytes before tensor 'b' belong to no tensor",
    ),
    "trailing-bytes": (
        lambda p: raw_safetensors(p, {"a": f32(0, 8, [2])}, bytes(12)),
        "4 bytes after the last tensor belong to no tensor",
    ),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_safetensors_files_are_refused_naming_file_and_problem(tmp_path, case):
    build, expected = BAD_HEADERS[case]
    path = tmp_path / f"{case}.safetensors"
    build(path)
    before = sha256(path)
    for action in (open_checkpoint, model_sizes_from, lambda p: load_checkpoint_into(make_model(), p)):
        with pytest.raises(CheckpointError) as info:
            action(path)
        assert str(path) in str(info.value) and expected in str(info.value), str(info.value)
    assert sha256(path) == before


def test_a_declared_header_size_is_never_allocated(tmp_path):
    path = raw_safetensors(tmp_path / "big_claim.safetensors", {}, length=90_000_000)  # under the limit
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="declares a 90000000-byte header"):
            open_checkpoint(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak} bytes allocated while refusing a 90 MB header claim"


def test_truncated_real_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "full.safetensors", make_model(), config={}, trainer_kind="stable", step=0)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size - 100])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: tensor '.*' ends at byte \d+ of a data section"):
        open_checkpoint(cut)


def test_valid_header_entries_are_exposed(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.arange(4)}, str(path), metadata={"k": "v"})
    header = checkpoints.read_safetensors_header(path)
    assert header.metadata == {"k": "v"}
    assert {k: (e.dtype, e.shape, e.end - e.begin) for k, e in header.entries.items()} == {
        "a": (torch.bfloat16, (2, 3), 12),
        "b": (torch.int64, (4,), 32),
    }


# -- recorded model sizes --------------------------------------------------------------------------
def with_metadata(tmp_path: Path, source: Path, **changes) -> Path:
    with safe_open(str(source), framework="pt") as handle:
        names = list(handle.keys())
        tensors = {k: handle.get_tensor(k) for k in names}
        meta = dict(handle.metadata())
    meta.update(changes)
    out = tmp_path / "rewritten.safetensors"
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize(
    "sizes, expected",
    [
        (
            {"vocab_size": 17, "latent_dim": D, "cluster_size": 0},
            "model_sizes.vocab_size = 17 contradicts text_encoder.token_embed.weight [16, 32]",
        ),
        (
            {"vocab_size": V, "latent_dim": 1 << 40, "cluster_size": 0},
            "model_sizes.latent_dim = 1099511627776 contradicts latent_encoder.projection.0.weight",
        ),
        (
            {"vocab_size": V, "latent_dim": D, "cluster_size": 3},
            "cluster_size = 3 but the checkpoint has no text_head_clusters.weight",
        ),
        ({"vocab_size": "16", "latent_dim": D, "cluster_size": 0}, "model_sizes.vocab_size is '16', not a positive"),
        ({"vocab_size": True, "latent_dim": D, "cluster_size": 0}, "model_sizes.vocab_size is True, not a positive"),
        (
            {"vocab_size": V, "latent_dim": D},
            "expected a JSON object with exactly vocab_size, latent_dim, cluster_size",
        ),
        ([V, D, 0], "expected a JSON object"),
    ],
    ids=["vocab", "huge-latent", "cluster-without-head", "string", "bool", "missing-key", "list"],
)
def test_forged_model_sizes_are_refused_before_use(tmp_path, sizes, expected):
    good = save_checkpoint(tmp_path / "good.safetensors", make_model(), config={}, trainer_kind="stable", step=0)
    path = with_metadata(tmp_path, good, model_sizes=json.dumps(sizes))
    for action in (model_sizes_from, open_checkpoint):
        with pytest.raises(CheckpointError) as info:
            action(path)
        assert str(path) in str(info.value) and expected in str(info.value), str(info.value)


def test_cluster_size_needs_the_cluster_head(tmp_path):
    path = save_checkpoint(
        tmp_path / "c.safetensors", make_model(cluster_size=5), config={}, trainer_kind="stable", step=0
    )
    assert model_sizes_from(path) == {"vocab_size": V, "latent_dim": D, "cluster_size": 5}
    forged = with_metadata(
        tmp_path, path, model_sizes=json.dumps({"vocab_size": V, "latent_dim": D, "cluster_size": 0})
    )
    with pytest.raises(CheckpointError, match="cluster_size = 0 but the checkpoint has text_head_clusters.weight"):
        model_sizes_from(forged)


# -- layout from names and shapes ------------------------------------------------------------------
LAYOUTS = [
    {
        "vocab_size": 16,
        "latent_dim": 4,
        "cluster_size": 0,
        "hidden_size": 32,
        "n_blocks": 1,
        "cond_dim": 32,
        "max_seq_len": 8,
        "num_residual_streams": 2,
    },
    {
        "vocab_size": 23,
        "latent_dim": 7,
        "cluster_size": 2,
        "hidden_size": 16,
        "n_blocks": 3,
        "cond_dim": 12,
        "max_seq_len": 5,
        "num_residual_streams": 1,
    },
    {
        "vocab_size": 9,
        "latent_dim": 3,
        "cluster_size": 0,
        "hidden_size": 24,
        "n_blocks": 2,
        "cond_dim": 40,
        "max_seq_len": 11,
        "num_residual_streams": 4,
    },
]


def layout_model(spec: dict) -> MultimodalMMDiT:
    """The model of a LAYOUTS entry on the meta device (shapes only): sizes of its own, on purpose."""
    model_cfg = {k: spec[k] for k in ("hidden_size", "n_blocks", "cond_dim", "max_seq_len", "num_residual_streams")}
    return tiny_model(
        None,
        vocab_size=spec["vocab_size"],
        latent_dim=spec["latent_dim"],
        cluster_size=spec["cluster_size"],
        base=model_cfg,
        device="meta",
    )


def run_config(spec: dict) -> dict:
    model = {
        k: spec[k]
        for k in (
            "hidden_size",
            "n_blocks",
            "cond_dim",
            "max_seq_len",
            "num_residual_streams",
            "latent_dim",
            "cluster_size",
        )
    }
    return {"model": model, "tokenizer": {"vocab_size": spec["vocab_size"]}}


@pytest.mark.parametrize("spec", LAYOUTS, ids=["streams2", "streams1-cluster", "streams4"])
def test_layout_is_derived_from_names_and_shapes(spec):
    shapes = {k: tuple(v.shape) for k, v in layout_model(spec).state_dict().items()}
    layout = derive_layout(shapes)
    assert layout.as_dict() == {
        "vocab_size": spec["vocab_size"],
        "hidden_size": spec["hidden_size"],
        "latent_dim": spec["latent_dim"],
        "max_seq_len": spec["max_seq_len"],
        "n_blocks": spec["n_blocks"],
        "cond_dim": spec["cond_dim"],
        "cluster_head": spec["cluster_size"] > 0,
        "num_residual_streams": spec["num_residual_streams"],
        "residual_layout": None if spec["num_residual_streams"] == 1 else "0.3.x",
    }
    assert layout_differences(layout, run_config(spec)) == []
    assert explain_layout_differences(layout, run_config(spec)) is None


def test_layout_of_an_mmdit_02_checkpoint():
    layout = checkpoint_layout(MMDIT02_FIXTURE)
    assert (layout.residual_layout, layout.num_residual_streams, layout.vocab_size, layout.hidden_size) == (
        "0.2.x",
        2,
        64,
        16,
    )
    with open_checkpoint(MMDIT02_FIXTURE) as source:
        recorded = source.metadata["config"]
    assert layout_differences(layout, recorded) == []


def test_layout_through_upstream_prefixes(tmp_path):
    spec = LAYOUTS[0]
    model = make_model()
    torch.save({"model_state_dict": {f"module.model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "u.pt")
    assert checkpoint_layout(tmp_path / "u.pt") == derive_layout(
        {k: tuple(v.shape) for k, v in layout_model(spec).state_dict().items()}
    )


@pytest.mark.parametrize(
    "key, value",
    [
        ("tokenizer.vocab_size", 17),
        ("model.hidden_size", 64),
        ("model.latent_dim", 5),
        ("model.max_seq_len", 16),
        ("model.n_blocks", 2),
        ("model.cond_dim", 16),
        ("model.cluster_size", 4),
        ("model.num_residual_streams", 4),
    ],
)
def test_each_config_mismatch_is_reported_by_its_key(key, value):
    spec = LAYOUTS[0]
    layout = derive_layout({k: tuple(v.shape) for k, v in layout_model(spec).state_dict().items()})
    config = run_config(spec)
    section, name = key.split(".")
    config[section][name] = value
    differences = layout_differences(layout, config)
    assert [d.config_key for d in differences] == [key]
    assert differences[0].config_value == value
    text = explain_layout_differences(layout, config, "ckpt.pt")
    assert text.startswith("the config does not build the layout of ckpt.pt") and f"{key}: config {value}" in text


def test_unset_config_keys_are_reported_and_the_model_default_streams_compared():
    spec = LAYOUTS[2]  # 4 residual streams
    layout = derive_layout({k: tuple(v.shape) for k, v in layout_model(spec).state_dict().items()})
    config = run_config(spec)
    del config["model"]["num_residual_streams"], config["model"]["cond_dim"]
    found = {d.config_key: str(d) for d in layout_differences(layout, config)}
    assert set(found) == {"model.cond_dim", "model.num_residual_streams"}
    assert found["model.cond_dim"].startswith("model.cond_dim: config not set, checkpoint 40")
    assert "checkpoint 4 (static_alpha [4, 5])" in found["model.num_residual_streams"]
    two = derive_layout({k: tuple(v.shape) for k, v in layout_model(LAYOUTS[0]).state_dict().items()})
    unset = run_config(LAYOUTS[0])
    del unset["model"]["num_residual_streams"]
    assert layout_differences(two, unset) == []  # the model builds 2 streams when the key is unset


def test_layout_refuses_what_it_cannot_derive():
    shapes = {k: tuple(v.shape) for k, v in make_model().state_dict().items()}
    missing = dict(shapes)
    del missing["text_encoder.token_embed.weight"]
    with pytest.raises(CheckpointError, match="text_encoder.token_embed.weight is missing"):
        derive_layout(missing, "x.pt")
    skipped = {k.replace("mmdit.blocks.0.", "mmdit.blocks.1."): v for k, v in shapes.items()}
    with pytest.raises(CheckpointError, match=r"mmdit.blocks.<i> indices are \[1\]"):
        derive_layout(skipped)
    wrong_head = dict(shapes, **{"text_head.weight": (V + 1, 32)})
    with pytest.raises(CheckpointError, match=r"text_head.weight \[17, 32\] is not \[vocab_size, hidden_size\]"):
        derive_layout(wrong_head)
    odd_streams = {k: ((2, 5) if k.endswith("static_alpha") else v) for k, v in shapes.items()}
    assert derive_layout(odd_streams).num_residual_streams is None
    assert isinstance(derive_layout(shapes), ModelLayout)


# -- non-finite weights ----------------------------------------------------------------------------
def planted_state() -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in make_model().state_dict().items()}
    state["text_head.weight"][0, :3] = float("nan")
    state["text_head.weight"][1, 0] = float("inf")
    state["latent_head.3.bias"][:2] = float("-inf")
    state["conditioning.combine.0.weight"] = state["conditioning.combine.0.weight"].to(torch.bfloat16)
    state["conditioning.combine.0.weight"][5, 5] = float("nan")
    return state


def write_state(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


EXPECTED_NON_FINITE = [
    ("conditioning.combine.0.weight", 1, 0, 0),
    ("text_head.weight", 3, 1, 0),
    ("latent_head.3.bias", 0, 0, 2),
]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("chunk", [checkpoints.NON_FINITE_CHUNK, 7])
def test_non_finite_tensors_are_listed_with_counts(tmp_path, monkeypatch, suffix, chunk):
    monkeypatch.setattr(checkpoints.nonfinite, "NON_FINITE_CHUNK", chunk)
    state = planted_state()
    path = write_state(state, tmp_path / f"nan{suffix}")
    found = find_non_finite(path)
    assert sorted((t.name, t.nan, t.posinf, t.neginf) for t in found) == sorted(EXPECTED_NON_FINITE)
    assert {t.name: t.numel for t in found}["text_head.weight"] == V * 32
    assert find_non_finite(write_state(make_model().state_dict(), tmp_path / f"clean{suffix}")) == []


def test_non_finite_scan_holds_one_tensor_at_a_time(tmp_path):
    path = tmp_path / "nan.safetensors"
    save_file(planted_state(), str(path))
    alive: list[weakref.ref] = []
    with open_checkpoint(path) as source:
        getter = source._getter

        def tracked(key):
            gc.collect()
            assert all(ref() is None for ref in alive), "an earlier tensor is still in memory"
            tensor = getter(key)
            alive.append(weakref.ref(tensor))
            return tensor

        source._getter = tracked
        assert len(find_non_finite(source)) == len(EXPECTED_NON_FINITE)
    assert len(alive) == len(planted_state())
