"""Checkpoints: bit-exact round trips (safetensors and upstream `.pt` layouts), metadata, the
train-state file, read-only loading, and every refusal with a readable message."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentDLM_mmdit.checkpoints import (
    FORMAT,
    CheckpointError,
    load_checkpoint_into,
    load_train_state,
    model_sizes_from,
    save_checkpoint,
    train_state_path,
)
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
from latentDLM_mmdit.seeding import rng_state, seed_everything, set_rng_state
from tests.builders import TINY_MODEL, TINY_VOCAB, perturbed, tiny_model

V, D = 16, 4
VOCAB = TINY_VOCAB
CONFIG = dict(TINY_MODEL)
RUN_CONFIG = {
    "model": dict(CONFIG, latent_dim=D),
    "tokenizer": {"vocab_size": V, "mask_token_id": 15},
    "training": {"seed": 3},
}


def make_model(seed: int, cluster_size: int = 0, **overrides) -> MultimodalMMDiT:
    model = tiny_model(seed, vocab_size=V, latent_dim=D, cluster_size=cluster_size, **overrides)
    return perturbed(model, seed + 1000)  # every tensor off its init value, so that zero-init gates differ too


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


def fingerprint(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size


@pytest.fixture(scope="module")
def source_model() -> MultimodalMMDiT:
    return make_model(seed=1)


@pytest.fixture
def target_model() -> MultimodalMMDiT:
    model = make_model(seed=2)
    return model


def test_models_differ_before_loading(source_model, target_model):
    """Guards the round-trip tests: they would pass trivially if both models started equal."""
    sa, sb = source_model.state_dict(), target_model.state_dict()
    differing = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert len(differing) == len(sa)


# -- safetensors -----------------------------------------------------------------------------------
def test_safetensors_round_trip_is_bit_exact(tmp_path, source_model, target_model):
    path = save_checkpoint(
        tmp_path / "ckpt.safetensors", source_model, config=RUN_CONFIG, trainer_kind="stable", step=7
    )
    assert path == tmp_path / "ckpt.safetensors" and path.is_file()
    assert not list(tmp_path.glob("*.tmp")), "the temporary file must be renamed away"
    report = load_checkpoint_into(target_model, path)
    assert_same_weights(source_model, target_model)
    assert report.n_tensors == len(source_model.state_dict())
    assert report.version_differences == {}
    assert report.versions_match is True


def test_safetensors_metadata_is_recorded(tmp_path, source_model):
    path = save_checkpoint(
        tmp_path / "ckpt.safetensors", source_model, config=RUN_CONFIG, trainer_kind="cycle", step=123
    )
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == FORMAT
    assert json.loads(meta["config"]) == RUN_CONFIG
    versions = json.loads(meta["versions"])
    for package in ("mmdit", "hyper-connections", "x-transformers"):
        assert versions[package] == importlib_metadata.version(package)
    assert versions["torch"] == torch.__version__
    assert meta["trainer_kind"] == "cycle"
    assert meta["step"] == "123"
    sizes = {"vocab_size": V, "latent_dim": D, "cluster_size": 0}
    assert json.loads(meta["model_sizes"]) == sizes
    assert model_sizes_from(path) == sizes


def test_omegaconf_config_is_stored_as_plain_json(tmp_path, source_model):
    from omegaconf import OmegaConf

    config = OmegaConf.create({"model": {"hidden_size": 32, "copy": "${model.hidden_size}"}})
    path = save_checkpoint(tmp_path / "c.safetensors", source_model, config=config, trainer_kind="stable", step=0)
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["config"]) == {"model": {"hidden_size": 32, "copy": 32}}


def test_cluster_model_round_trip_and_sizes(tmp_path):
    model, other = make_model(5, cluster_size=3), make_model(6, cluster_size=3)
    path = save_checkpoint(tmp_path / "cl.safetensors", model, config={}, trainer_kind="stable", step=1)
    load_checkpoint_into(other, path)
    assert_same_weights(model, other)
    assert model_sizes_from(path) == {"vocab_size": V, "latent_dim": D, "cluster_size": 3}


def test_save_refuses_wrong_suffix_and_wrapped_models(tmp_path, source_model):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_checkpoint(tmp_path / "ckpt.pt", source_model, config={}, trainer_kind="stable", step=0)

    class Wrapper(torch.nn.Module):  # what DDP looks like to state_dict(): keys prefixed "module."
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    with pytest.raises(ValueError, match="bare model"):
        save_checkpoint(tmp_path / "w.safetensors", Wrapper(source_model), config={}, trainer_kind="stable", step=0)
    assert not (tmp_path / "w.safetensors").exists()


# -- .pt layouts -----------------------------------------------------------------------------------
def trainer_layout(state: dict) -> dict:
    """Upstream's checkpoint writers: the trainer's state dict (model under `model.`, plus the text
    noise schedule's buffers) inside a dict under `model_state_dict`."""
    schedule = MaskedDiffusion(VOCAB).state_dict()
    inner = {f"model.{k}": v for k, v in state.items()}
    inner.update({f"text_noise_schedule.{k}": v for k, v in schedule.items()})
    assert sorted(k for k in inner if k.startswith("text_noise_schedule.")) == [
        "text_noise_schedule.log_B",
        "text_noise_schedule.log_gamma",
        "text_noise_schedule.log_prior",
    ]
    return {"model_state_dict": inner, "epoch": 3, "step": 1000, "config": {"lr": 1e-4}}


def prefixed(prefix: str):
    return lambda state: {f"{prefix}{k}": v for k, v in state.items()}


PT_LAYOUTS = {
    "bare": lambda state: dict(state),
    "trainer-model_state_dict": trainer_layout,
    "state_dict-wrapper": lambda state: {"state_dict": dict(state), "epoch": 1},
    "ddp-module": prefixed("module."),
    "compile-orig_mod": prefixed("_orig_mod."),
    "trainer-model": prefixed("model."),
    "module-orig_mod": prefixed("module._orig_mod."),
    "orig_mod-module": prefixed("_orig_mod.module."),
    "module-model": prefixed("module.model."),
    "model-module-orig_mod": prefixed("model.module._orig_mod."),
    "ddp-trainer-wrapped": lambda state: {
        "model_state_dict": {f"module.{k}": v for k, v in trainer_layout(state)["model_state_dict"].items()}
    },
    "compiled-trainer-in-state_dict": lambda state: {
        "state_dict": {f"_orig_mod.model.{k}": v for k, v in state.items()}
    },
}


@pytest.mark.parametrize("layout", list(PT_LAYOUTS))
def test_pt_round_trip_is_bit_exact(tmp_path, source_model, target_model, layout):
    path = tmp_path / "upstream.pt"
    torch.save(PT_LAYOUTS[layout](source_model.state_dict()), str(path))
    before = fingerprint(path)
    report = load_checkpoint_into(target_model, path)
    assert_same_weights(source_model, target_model)
    assert report.n_tensors == len(source_model.state_dict())
    assert report.recorded_versions is None and report.versions_match is None
    assert fingerprint(path) == before, "loading must not touch the source file"


def test_pt_from_a_real_stable_trainer_state_dict(tmp_path, source_model, target_model):
    """The exact layout upstream writes: MultimodalDiffusionTrainer.state_dict() under model_state_dict."""
    from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer

    trainer = MultimodalDiffusionTrainer(
        source_model, VOCAB, MaskedDiffusion(VOCAB), torch.float32, {"loss": {"loss_type": "l2t"}}
    )
    state = trainer.state_dict()
    assert {k for k in state if not k.startswith("model.")} == {
        "text_noise_schedule.log_prior",
        "text_noise_schedule.log_gamma",
        "text_noise_schedule.log_B",
    }
    path = tmp_path / "trainer.pt"
    torch.save({"model_state_dict": state, "optimizer_state_dict": {}, "step": 5}, str(path))
    load_checkpoint_into(target_model, path)
    assert_same_weights(source_model, target_model)


def test_safetensors_source_is_read_only(tmp_path, source_model, target_model):
    path = save_checkpoint(tmp_path / "ro.safetensors", source_model, config={}, trainer_kind="stable", step=0)
    before = fingerprint(path)
    load_checkpoint_into(target_model, path)
    model_sizes_from(path)
    assert fingerprint(path) == before


# -- train state -----------------------------------------------------------------------------------
def test_train_state_round_trips_rng_and_optimizer(tmp_path, source_model):
    seed_everything(77)
    optimizer = torch.optim.AdamW(source_model.parameters(), lr=1e-3)
    state = rng_state()
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(3))
    path = save_checkpoint(
        tmp_path / "resume.safetensors",
        source_model,
        config={},
        trainer_kind="stable",
        step=9,
        train_state={"step": 9, "rng": state, "optimizer": optimizer.state_dict()},
    )
    assert train_state_path(path) == tmp_path / "resume.train_state.pt"
    assert train_state_path(path).is_file()
    # The file is loadable under weights_only=True (no arbitrary pickled objects).
    raw = torch.load(str(train_state_path(path)), map_location="cpu", weights_only=True)
    assert raw["step"] == 9
    loaded = load_train_state(path)
    assert loaded["optimizer"]["param_groups"][0]["lr"] == 1e-3
    seed_everything(12345)  # move every global RNG elsewhere
    set_rng_state(loaded["rng"])
    assert random.random() == expected_draws[0]
    assert float(np.random.rand()) == expected_draws[1]
    torch.testing.assert_close(torch.rand(3), expected_draws[2], rtol=0, atol=0)


def test_missing_train_state_is_an_error(tmp_path, source_model):
    path = save_checkpoint(tmp_path / "only.safetensors", source_model, config={}, trainer_kind="stable", step=0)
    with pytest.raises(CheckpointError, match="only.train_state.pt"):
        load_train_state(path)


# -- refusals --------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this would create a file: proof that weights_only refused to run code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_missing_file_is_refused(tmp_path, target_model):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_into(target_model, tmp_path / "nope.safetensors")
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_garbage_file_is_refused(tmp_path, target_model, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"\x00\x01this is not a checkpoint" * 10)
    before = {k: v.clone() for k, v in target_model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_into(target_model, path)
    assert str(path) in str(info.value)
    for key, value in target_model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_pickled_object_is_refused_without_running_it(tmp_path, source_model, target_model):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": source_model.state_dict(), "extra": _Payload(str(marker))}, str(path))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_into(target_model, path)
    message = str(info.value)
    assert str(path) in message
    assert "GLOBAL io.open" in message and "calls it (REDUCE)" in message, message
    assert "weights_only=False" not in message
    assert not marker.exists(), "unpickling ran code from the checkpoint"


def test_non_tensor_entries_are_refused(tmp_path, target_model):
    path = tmp_path / "odd.pt"
    torch.save({"text_head.weight": torch.zeros(V, 32), "note": "hello"}, str(path))
    with pytest.raises(CheckpointError, match="not tensors"):
        load_checkpoint_into(target_model, path)


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path, source_model, target_model):
    state = {k: v.clone() for k, v in source_model.state_dict().items()}
    del state["latent_head.3.bias"]
    state["extra_head.weight"] = torch.zeros(2, 2)
    state["text_head.bias"] = torch.zeros(V + 1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    before = {k: v.clone() for k, v in target_model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_into(target_model, path)
    message = str(info.value)
    assert "1 missing key(s): latent_head.3.bias" in message
    assert "1 unexpected key(s): extra_head.weight" in message
    assert "1 mis-shaped key(s): text_head.bias" in message
    assert f"({V + 1},)" in message and f"({V},)" in message
    for key, value in target_model.state_dict().items():  # nothing was copied
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def _write(state: dict, path: Path) -> None:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, str(path))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_other_float_dtypes_are_cast_on_load(tmp_path, source_model, target_model, suffix):
    """A float64 checkpoint loads into a float32 model: each value is the float32 cast."""
    state = {k: v.double() for k, v in source_model.state_dict().items()}
    path = tmp_path / f"f64{suffix}"
    _write(state, path)
    load_checkpoint_into(target_model, path)
    for key, value in target_model.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, state[key].float(), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_integer_tensor_for_a_float_parameter_is_refused(tmp_path, source_model, target_model, suffix):
    state = {k: v.clone() for k, v in source_model.state_dict().items()}
    state["text_head.bias"] = torch.arange(V, dtype=torch.int64)
    path = tmp_path / f"int{suffix}"
    _write(state, path)
    with pytest.raises(CheckpointError, match="text_head.bias"):
        load_checkpoint_into(target_model, path)


def test_duplicate_keys_after_prefix_stripping_are_refused(tmp_path, source_model, target_model):
    state = dict(source_model.state_dict())
    state["module.text_head.bias"] = state["text_head.bias"].clone()
    path = tmp_path / "dup.pt"
    torch.save(state, str(path))
    with pytest.raises(CheckpointError, match="both map to 'text_head.bias'"):
        load_checkpoint_into(target_model, path)


@pytest.mark.parametrize("saved_streams, model_streams", [(1, 2), (2, 1)], ids=["1-into-2", "2-into-1"])
def test_residual_stream_mismatch_is_explained(tmp_path, saved_streams, model_streams):
    saved = make_model(3, num_residual_streams=saved_streams)
    path = save_checkpoint(tmp_path / "s.safetensors", saved, config={}, trainer_kind="stable", step=0)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_into(make_model(4, num_residual_streams=model_streams), path)
    assert "num_residual_streams" in str(info.value)
    assert "residual_fns" in str(info.value)


def test_recorded_version_difference_is_reported_and_logged(tmp_path, source_model, target_model, caplog):
    original = save_checkpoint(tmp_path / "orig.safetensors", source_model, config={}, trainer_kind="stable", step=0)
    with safe_open(str(original), framework="pt") as handle:
        names = list(handle.keys())
        tensors = {k: handle.get_tensor(k) for k in names}
        meta = dict(handle.metadata())
    versions = json.loads(meta["versions"])
    installed = importlib_metadata.version("mmdit")
    versions["mmdit"] = "0.2.2"
    meta["versions"] = json.dumps(versions)
    rewritten = tmp_path / "old_mmdit.safetensors"
    save_file(tensors, str(rewritten), metadata=meta)

    with caplog.at_level(logging.WARNING, logger="latentDLM_mmdit.checkpoints"):
        report = load_checkpoint_into(target_model, rewritten)
    assert report.version_differences == {"mmdit": ("0.2.2", installed)}
    assert report.versions_match is False
    assert report.recorded_versions["mmdit"] == "0.2.2"
    assert_same_weights(source_model, target_model)  # the weights still load: only a warning
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("mmdit 0.2.2" in r.getMessage() and installed in r.getMessage() for r in warnings), [
        r.getMessage() for r in caplog.records
    ]
