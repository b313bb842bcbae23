"""Upstream's checkpoint files, read without running anything from them.

The files are written exactly as upstream's `save_checkpoint` / `save_full_model` write them: the
trainer's state dict under `model_state_dict`, the optimizer state, and a `TrainingState`
dataclass of module `latentDLM_mmdit.checkpoints_mmdit`, which here is a class defined in this
test and registered under that module name only while saving, so loading cannot import it.
Also: plain records, numpy scalars, and pickles that would run code (refused, nothing run)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import types
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
    main,
    open_checkpoint,
    save_checkpoint,
)
from latentDLM_mmdit.checkpoints_mmdit import (
    GlobalsPlan,
    InertRecord,
    RecordCalledError,
    TrainingState,
    record_stand_in,
)
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
from tests.builders import TINY_MODEL, TINY_VOCAB, perturbed, tiny_model

V, D, S = 16, 4, 8
VOCAB = TINY_VOCAB
CONFIG = dict(TINY_MODEL, n_blocks=2, cond_dim=24)  # two blocks, cond_dim != hidden_size: a mixed-up size shows
UPSTREAM_MODULE = "latentDLM_mmdit.checkpoints_mmdit"
N_MODEL_TENSORS = 137  # this CONFIG's state dict


def make_model(seed: int) -> MultimodalMMDiT:
    model = tiny_model(seed, vocab_size=V, latent_dim=D, base=CONFIG)
    return perturbed(model, seed + 1000).eval()  # off the init values, so that zero-init gates differ too


def outputs(model: MultimodalMMDiT) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (3, S), generator=gen)  # [B, S]
    latents = torch.randn(3, 1, D, generator=gen)  # [B, 1, D]
    mask = torch.ones(3, S, dtype=torch.long)
    mask[0, 5:] = 0
    with torch.no_grad():
        return tuple(model(ids, latents, torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.7, 0.3, 1.0]), mask))


def assert_bit_identical(got: tuple, want: tuple) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def digests(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@dataclasses.dataclass
class UpstreamTrainingState:  # upstream's fields and defaults, re-typed here
    epoch: int = 0
    epoch_start_step: int = 0
    step: int = 0
    total_tokens: int = 0
    total_flops: float = 0.0
    start_time: float = 0.0
    curr_time: float = 0.0


@contextlib.contextmanager
def registered_as(module_name: str, **classes):
    """While saving: `module_name` in sys.modules is a module holding `classes` (renamed into it),
    so that pickle writes GLOBAL module_name.Class; afterwards the names and the previous module
    are restored."""
    fake = types.ModuleType(module_name)
    names = {cls: (cls.__module__, cls.__qualname__, cls.__name__) for cls in classes.values()}
    for name, cls in classes.items():
        cls.__module__, cls.__qualname__, cls.__name__ = module_name, name, name
        setattr(fake, name, cls)
    previous = sys.modules.get(module_name)
    sys.modules[module_name] = fake
    try:
        yield
    finally:
        if previous is None:
            del sys.modules[module_name]
        else:
            sys.modules[module_name] = previous
        for cls, (module, qualname, name) in names.items():
            cls.__module__, cls.__qualname__, cls.__name__ = module, qualname, name


class _Tripwire(types.ModuleType):
    def __getattr__(self, name):
        raise AssertionError(f"loading looked up {self.__name__}.{name}: it must not import the upstream module")


@contextlib.contextmanager
def upstream_module_unreachable():
    """While loading: any attribute lookup on `latentDLM_mmdit.checkpoints_mmdit` through
    sys.modules fails the test (the reader binds what it needs at import time)."""
    previous = sys.modules[UPSTREAM_MODULE]
    sys.modules[UPSTREAM_MODULE] = _Tripwire(UPSTREAM_MODULE)
    try:
        yield
    finally:
        sys.modules[UPSTREAM_MODULE] = previous


def upstream_save_checkpoint(path: Path, model, optimizer, state, config=None) -> Path:
    """Upstream's save_checkpoint(path, trainer, optimizer, state): path/checkpoint.pt."""
    path.mkdir(parents=True, exist_ok=True)
    model_state = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    torch.save(
        {
            "model_state_dict": model_state,
            "optimizer_state_dict": optimizer.state_dict(),
            "state": state,
            "config": config,
        },
        path / "checkpoint.pt",
    )
    return path / "checkpoint.pt"


def upstream_save_full_model(path: Path, model, config, training_state=None, is_final=False) -> Path:
    """Upstream's save_full_model (tokenizer files aside): path/model.pth or model_final.pth."""
    path.mkdir(parents=True, exist_ok=True)
    model_file = path / ("model_final.pth" if is_final else "model.pth")
    torch.save({"model_state_dict": model.state_dict(), "config": config, "training_state": training_state}, model_file)
    return model_file


UPSTREAM_STATE = {
    "epoch": 1,
    "epoch_start_step": 24,
    "step": 30,
    "total_tokens": 7680,
    "total_flops": np.float64(5.5e9),
    "start_time": 1700000000.25,
    "curr_time": 1700000123.5,
}


class UpstreamRun:
    n_optimizer_tensors: int = 0


@pytest.fixture(scope="module")
def source_model() -> MultimodalMMDiT:
    return make_model(seed=1)


@pytest.fixture(scope="module")
def upstream_run(tmp_path_factory, source_model) -> Path:
    """A checkpoint folder as upstream's stable training script leaves it at step 30 (the number
    of optimizer-state tensors is kept in UpstreamRun)."""
    trainer = MultimodalDiffusionTrainer(
        source_model, VOCAB, MaskedDiffusion(VOCAB), torch.float32, {"loss": {"loss_type": "l2t"}}
    )
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-4)
    before = {k: v.clone() for k, v in source_model.state_dict().items()}
    sum((p * p).sum() for p in trainer.parameters() if p.requires_grad).backward()
    optimizer.step()  # the optimizer has state; the weights are restored so the fixture model is unchanged
    optimizer.zero_grad(set_to_none=True)
    source_model.load_state_dict(before)
    folder = tmp_path_factory.mktemp("upstream") / "mmdit_stable" / "latest"
    with registered_as(UPSTREAM_MODULE, TrainingState=UpstreamTrainingState):
        upstream_save_checkpoint(folder, trainer, optimizer, UpstreamTrainingState(**UPSTREAM_STATE))
    torch.save({"torch": torch.get_rng_state(), "cuda": None}, folder / "rng_state_0.pt")  # as save_rng_state
    UpstreamRun.n_optimizer_tensors = sum(
        torch.is_tensor(v) for state in optimizer.state.values() for v in state.values()
    )
    return folder


def test_plain_weights_only_load_refuses_the_upstream_file(upstream_run):
    """What users saw: torch's own weights_only load stops at the TrainingState global."""
    with pytest.raises(pickle.UnpicklingError, match="checkpoints_mmdit.TrainingState"):
        torch.load(upstream_run / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("given", ["folder", "file"])
def test_upstream_checkpoint_loads_strictly_with_bit_identical_outputs(upstream_run, source_model, given):
    before = digests(upstream_run)
    model = make_model(seed=2)
    assert not torch.equal(model.text_head.weight, source_model.text_head.weight)
    path = upstream_run if given == "folder" else upstream_run / "checkpoint.pt"
    with upstream_module_unreachable():
        report = load_checkpoint_into(model, path)
    assert_bit_identical(outputs(model), outputs(source_model))
    for key, value in source_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert report.n_tensors == N_MODEL_TENSORS
    assert report.path == str(upstream_run / "checkpoint.pt")
    state = report.metadata["state"]
    assert type(state) is TrainingState  # this project's class, not the test's nor a record
    assert dataclasses.asdict(state) == {k: type(getattr(TrainingState, k))(v) for k, v in UPSTREAM_STATE.items()}
    assert report.metadata["config"] is None
    assert digests(upstream_run) == before, "loading must leave every file of the folder byte-identical"


def test_upstream_checkpoint_reports_what_was_used(upstream_run):
    with open_checkpoint(upstream_run) as source:
        contents = source.contents
    assert contents.requested == str(upstream_run) and contents.file == str(upstream_run / "checkpoint.pt")
    assert contents.format == "torch zip"
    assert "used checkpoint.pt" in contents.folder_note and "rng_state_0.pt" in contents.folder_note
    assert contents.keys_used == ["model_state_dict"]
    assert set(contents.ignored) == {"optimizer_state_dict", "state", "config"}
    n_optimizer = UpstreamRun.n_optimizer_tensors
    assert n_optimizer > 0
    assert contents.ignored["optimizer_state_dict"].startswith(f"dict of 2 entries holding {n_optimizer} tensors (")
    assert contents.ignored["state"].startswith("TrainingState(epoch=1, epoch_start_step=24, step=30,")
    assert contents.ignored["config"] == "None"
    assert contents.records == [f"state: {UPSTREAM_MODULE}.TrainingState -> {contents.ignored['state']}"]
    assert contents.numpy_scalars == ["state.total_flops: numpy float64 5500000000.0"]
    assert contents.prefixes_stripped == {"model.": N_MODEL_TENSORS}
    assert sorted(contents.dropped_keys) == [
        "text_noise_schedule.log_B",
        "text_noise_schedule.log_gamma",
        "text_noise_schedule.log_prior",
    ]
    lines = "\n".join(contents.lines())
    assert "ignored: optimizer_state_dict: dict of 2 entries" in lines and "config: None" in lines


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_upstream_checkpoint_with_ddp_and_compile_prefixes(tmp_path, source_model, prefix):
    trainer = MultimodalDiffusionTrainer(
        source_model, VOCAB, MaskedDiffusion(VOCAB), torch.float32, {"loss": {"loss_type": "l2t"}}
    )
    state = {f"{prefix}{k}": v for k, v in trainer.state_dict().items()}
    with registered_as(UPSTREAM_MODULE, TrainingState=UpstreamTrainingState):
        torch.save(
            {
                "model_state_dict": state,
                "optimizer_state_dict": {},
                "state": UpstreamTrainingState(step=3),
                "config": None,
            },
            tmp_path / "checkpoint.pt",
        )
    model = make_model(seed=3)
    report = load_checkpoint_into(model, tmp_path / "checkpoint.pt")
    assert_bit_identical(outputs(model), outputs(source_model))
    assert report.contents.prefixes_stripped == {f"{prefix}model.": N_MODEL_TENSORS}
    assert sorted(report.contents.dropped_keys) == sorted(
        f"{prefix}text_noise_schedule.{k}" for k in ("log_prior", "log_gamma", "log_B")
    )


@pytest.mark.parametrize("is_final", [False, True])
def test_save_full_model_folder_loads(tmp_path, source_model, is_final):
    with registered_as(UPSTREAM_MODULE, TrainingState=UpstreamTrainingState):
        written = upstream_save_full_model(
            tmp_path / "full", source_model, {"model": dict(CONFIG)}, UpstreamTrainingState(step=99), is_final=is_final
        )
    (tmp_path / "full" / "config.yaml").write_text("model: {}\n")
    model = make_model(seed=4)
    report = load_checkpoint_into(model, tmp_path / "full")
    assert report.path == str(written)
    assert_bit_identical(outputs(model), outputs(source_model))
    assert report.metadata["training_state"] == TrainingState(step=99)
    assert report.metadata["config"] == {"model": dict(CONFIG)}
    assert report.contents.keys_used == ["model_state_dict"] and report.contents.prefixes_stripped == {}
    assert f"used {written.name}" in report.contents.folder_note and "config.yaml" in report.contents.folder_note


def test_folder_with_several_or_no_checkpoint_files_is_refused(tmp_path, source_model):
    with registered_as(UPSTREAM_MODULE, TrainingState=UpstreamTrainingState):
        upstream_save_full_model(tmp_path / "two", source_model, None, None, is_final=False)
        upstream_save_full_model(tmp_path / "two", source_model, None, None, is_final=True)
    with pytest.raises(CheckpointError, match=r"several \(model_final.pth, model.pth\).*Pass the checkpoint file"):
        open_checkpoint(tmp_path / "two")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"holding none of upstream's checkpoint files.*notes.txt"):
        open_checkpoint(tmp_path / "other")


# -- records ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunInfo:  # a plain record of some other module
    name: str
    lr: float


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a, b):
        self.a, self.b = a, b


def _save_with(path: Path, extra: dict, state_dict: dict) -> Path:
    torch.save(dict({"model_state_dict": state_dict}, **extra), path)
    return path


def test_other_records_stay_inert(tmp_path, source_model):
    with registered_as("someone_elses_training", RunInfo=RunInfo, Slotted=Slotted):
        path = _save_with(
            tmp_path / "r.pt", {"info": RunInfo("run-7", 3e-4), "slots": Slotted(1, [2, 3])}, source_model.state_dict()
        )
    with open_checkpoint(path) as source:
        info, slots = source.metadata["info"], source.metadata["slots"]
        records = source.contents.records
    assert isinstance(info, InertRecord) and not isinstance(info, RunInfo)
    assert info.global_name == "someone_elses_training.RunInfo"
    assert (info.module, info.qualname) == ("someone_elses_training", "RunInfo")
    assert info.fields == {"name": "run-7", "lr": 3e-4} and info.state is None and info.newargs == ()
    assert repr(info) == "RunInfo(name='run-7', lr=0.0003)"
    assert slots.fields == {"a": 1, "b": [2, 3]}
    assert records == [
        "info: someone_elses_training.RunInfo -> inert record RunInfo(name='run-7', lr=0.0003)",
        "slots: someone_elses_training.Slotted -> inert record Slotted(a=1, b=[2, 3])",
    ]
    with pytest.raises(RecordCalledError, match="someone_elses_training.RunInfo"):
        type(info)("called", 1.0)


class Node:
    def __init__(self, name):
        self.name, self.links = name, []


def test_records_holding_themselves_are_read(tmp_path, source_model):
    node = Node("a")
    node.links.append(node)
    with registered_as("someone_elses_training", Node=Node):
        path = _save_with(tmp_path / "cycle.pt", {"graph": node}, source_model.state_dict())
    with open_checkpoint(path) as source:
        graph = source.metadata["graph"]
        assert graph.fields["links"][0] is graph
        assert source.contents.records == [
            "graph: someone_elses_training.Node -> inert record Node(name='a', links=[...])"
        ]


def test_a_file_holding_one_pickled_object_is_not_a_state_dict(tmp_path):
    with registered_as("someone_elses_training", RunInfo=RunInfo):
        torch.save(RunInfo("a", 1.0), tmp_path / "obj.pt")
    with pytest.raises(
        CheckpointError,
        match=r"holds a pickled someone_elses_training.RunInfo object \(read as an "
        r"inert record\), not a state dict; save its state_dict\(\) instead",
    ):
        open_checkpoint(tmp_path / "obj.pt")


def assert_no_unsafe_advice(message: str) -> None:
    """torch's own error text advises turning the safe reader off; ours never does."""
    assert not re.search(r"weights_only\W*(=|set to)\W*False", message), message


def test_records_in_torchs_legacy_format_are_refused_without_unsafe_advice(tmp_path, source_model):
    with registered_as("someone_elses_training", RunInfo=RunInfo):
        path = tmp_path / "legacy.pt"
        torch.save(
            {"model_state_dict": source_model.state_dict(), "info": RunInfo("a", 1.0)},
            path,
            _use_new_zipfile_serialization=False,
        )
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "someone_elses_training.RunInfo" in message
    assert "Records (NEWOBJ + BUILD) are read from torch's zip format only" in message
    assert "from someone_elses_training import RunInfo; torch.serialization.add_safe_globals([RunInfo])" in message
    assert_no_unsafe_advice(message)


def test_training_state_with_other_fields_stays_inert(tmp_path, source_model):
    @dataclasses.dataclass
    class TrainingState:  # an upstream variant with one more field
        step: int = 0
        epoch: int = 0
        epoch_start_step: int = 0
        total_tokens: int = 0
        total_flops: float = 0.0
        start_time: float = 0.0
        curr_time: float = 0.0
        best_loss: float = 0.0

    with registered_as(UPSTREAM_MODULE, TrainingState=TrainingState):
        path = _save_with(tmp_path / "v.pt", {"state": TrainingState(step=5)}, source_model.state_dict())
    with open_checkpoint(path) as source:
        state, records = source.metadata["state"], source.contents.records
    assert isinstance(state, InertRecord) and state.fields["best_loss"] == 0.0
    assert "not mapped onto TrainingState" in records[0] and "best_loss" in records[0]


def test_training_state_with_a_wrong_kind_of_value_stays_inert(tmp_path, source_model):
    with registered_as(UPSTREAM_MODULE, TrainingState=UpstreamTrainingState):
        path = _save_with(tmp_path / "w.pt", {"state": UpstreamTrainingState(step=2.5)}, source_model.state_dict())
    with open_checkpoint(path) as source:
        assert isinstance(source.metadata["state"], InertRecord)
        assert "field step holds 2.5, not an int" in source.contents.records[0]


class Marker:
    """Creates its file when constructed: proof that a constructor ran."""

    path: str = ""

    def __init__(self, value):
        Path(Marker.path).write_text(str(value))

    def __reduce__(self):
        return (Marker, (1,))


def test_a_record_stand_in_refuses_to_be_called_by_the_pickle(tmp_path, monkeypatch):
    """Defence in depth: even if a stand-in were provided for a global the pickle CALLS (REDUCE),
    unpickling stops at the call and the real constructor never runs."""
    monkeypatch.setattr(Marker, "path", str(tmp_path / "constructed"))
    obj = object.__new__(Marker)
    with registered_as("third_party_mod", Marker=Marker):
        torch.save({"x": obj}, tmp_path / "called.pt")
    plan = GlobalsPlan(records={"third_party_mod.Marker": record_stand_in("third_party_mod.Marker")})
    with torch.serialization.safe_globals(plan.safe_globals()), pytest.raises(RecordCalledError, match="REDUCE"):
        torch.load(tmp_path / "called.pt", weights_only=True)
    assert not (tmp_path / "constructed").exists()


def test_a_called_class_is_refused_before_unpickling(tmp_path, source_model, monkeypatch):
    monkeypatch.setattr(Marker, "path", str(tmp_path / "constructed"))
    with registered_as("third_party_mod", Marker=Marker):
        path = _save_with(tmp_path / "called.pt", {"x": object.__new__(Marker)}, source_model.state_dict())
    before = digests(path)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "GLOBAL third_party_mod.Marker: the pickle calls it (REDUCE)" in message
    assert "only classes the pickle creates with NEWOBJ and fills with BUILD" in message
    assert "add_safe_globals([Marker])" in message and "from third_party_mod import Marker" in message
    assert_no_unsafe_advice(message)
    assert not (tmp_path / "constructed").exists()
    assert digests(path) == before


# -- numpy scalars ---------------------------------------------------------------------------------
def test_numpy_scalars_are_read_as_numbers(tmp_path, source_model):
    values = {
        "f64": np.float64(0.1),
        "f32": np.float32(-2.5),
        "i64": np.int64(-7),
        "u8": np.uint8(200),
        "b": np.bool_(True),
        "c": np.complex128(1 - 2j),
    }
    path = _save_with(tmp_path / "np.pt", {"values": values}, source_model.state_dict())
    with open_checkpoint(path) as source:
        got = source.metadata["values"]
        scalars = source.contents.numpy_scalars
    for key, value in values.items():
        assert type(got[key]) is type(value) and got[key] == value, key
    assert len(scalars) == len(values) and "values.f64: numpy float64 0.1" in scalars


@pytest.mark.parametrize(
    "payload, expected",
    [
        (np.ones(3), "numpy.core.multiarray._reconstruct"),
        (np.dtype("O"), "numpy.dtype"),
    ],
    ids=["array", "object-dtype"],
)
def test_numpy_beyond_numeric_scalars_is_refused(tmp_path, source_model, payload, expected):
    path = _save_with(tmp_path / "np.pt", {"x": payload}, source_model.state_dict())
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and expected in message.replace("numpy._core", "numpy.core"), message
    assert_no_unsafe_advice(message)


class ForgedScalar:
    """Pickles as numpy's scalar reconstructor called with 3 bytes for a float64."""

    def __reduce__(self):
        return (np.float64(0).__reduce__()[0], (np.dtype("f8"), b"\x00\x01\x02"))


def test_numpy_scalar_with_wrong_byte_count_is_refused(tmp_path, source_model):
    path = _save_with(tmp_path / "forged.pt", {"x": ForgedScalar()}, source_model.state_dict())
    with pytest.raises(CheckpointError, match="float64 scalar with bytes data of 3 bytes; needs 8"):
        open_checkpoint(path)


# -- code-running payloads -------------------------------------------------------------------------
class SystemCall:
    """Unpickling this with plain pickle runs `touch <marker>` through os.system (posix.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _payload_files(tmp_path: Path, marker: Path, state_dict: dict) -> dict[str, Path]:
    files = {"zip": tmp_path / "evil.pt", "legacy": tmp_path / "evil_legacy.pt", "raw-pickle": tmp_path / "evil.bin"}
    torch.save({"model_state_dict": state_dict, "x": SystemCall(marker)}, files["zip"])
    torch.save(
        {"model_state_dict": state_dict, "x": SystemCall(marker)}, files["legacy"], _use_new_zipfile_serialization=False
    )
    files["raw-pickle"].write_bytes(pickle.dumps(SystemCall(marker), protocol=2))
    return files


@pytest.mark.parametrize("container", ["zip", "legacy", "raw-pickle"])
def test_system_call_payload_is_refused_with_nothing_run(tmp_path, source_model, container):
    marker = tmp_path / "payload_ran"
    path = _payload_files(tmp_path, marker, source_model.state_dict())[container]
    with open(tmp_path / "probe.pkl", "wb") as f:  # the payload is live: plain pickle would run it
        f.write(pickle.dumps(SystemCall(tmp_path / "probe_ran"), protocol=2))
    pickle.loads((tmp_path / "probe.pkl").read_bytes())
    assert (tmp_path / "probe_ran").exists()
    before = digests(path)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert f"GLOBAL {os.system.__module__}.system: the pickle calls it (REDUCE)" in message, message
    assert str(path) in message and "never imports or imitates it" in message
    assert "treat evil" in message and "get the weights again" in message
    assert_no_unsafe_advice(message)
    assert not marker.exists(), "the payload ran"
    assert digests(path) == before


def test_dangerous_module_is_refused_even_as_a_plain_record(tmp_path, source_model, monkeypatch):
    """A NEWOBJ + BUILD record would be inert, but globals of os & co. never get a stand-in."""

    @dataclasses.dataclass
    class Settings:
        name: str

    monkeypatch.setattr(os, "Settings", Settings, raising=False)  # pickle writes GLOBAL os.Settings
    Settings.__module__, Settings.__qualname__ = "os", "Settings"  # a class local to this test
    path = _save_with(tmp_path / "os_record.pt", {"info": Settings("x")}, source_model.state_dict())
    with pytest.raises(
        CheckpointError,
        match=r"GLOBAL os\.Settings: the pickle creates an instance with NEWOBJ; "
        r"the pickle fills an instance with BUILD; module os",
    ):
        open_checkpoint(path)


# -- damaged files ---------------------------------------------------------------------------------
def _damaged(tmp_path: Path, kind: str, state_dict: dict) -> Path:
    path = tmp_path / f"{kind}.pt"
    good = tmp_path / "good.pt"
    torch.save({"model_state_dict": state_dict}, good)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01this is not a checkpoint" * 10)
    elif kind == "truncated-pickle":
        path.write_bytes(pickle.dumps({"a": [1, 2, 3]}, protocol=2)[:-4])
    elif kind == "safetensors-named-pt":
        from safetensors.torch import save_file

        save_file({"a": torch.zeros(2)}, str(path))
    return path


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("empty", "the file is empty"),
        ("truncated", "damaged or truncated zip archive"),
        ("garbage", "not a torch checkpoint"),
        ("truncated-pickle", "not a readable pickle"),
        ("safetensors-named-pt", "looks like a safetensors file"),
    ],
)
def test_damaged_torch_files_give_clear_errors(tmp_path, source_model, kind, expected):
    path = _damaged(tmp_path, kind, source_model.state_dict())
    before = digests(path)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)
    assert_no_unsafe_advice(str(info.value))
    assert digests(path) == before


def test_pickled_whole_model_is_refused_with_advice(tmp_path, source_model):
    path = tmp_path / "whole.pt"
    torch.save(source_model.text_head, path)  # torch.save(module): torch.nn classes are never imitated
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert "GLOBAL torch.nn.modules.linear.Linear" in message and "whole pickled torch.nn module" in message
    assert "hostile" not in message
    assert_no_unsafe_advice(message)


# -- command line ----------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "latentDLM_mmdit.checkpoints", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_cli_inspect_of_an_upstream_folder(upstream_run):
    result = run_cli("inspect", upstream_run)
    assert result.returncode == 0, result.stderr
    for expected in [
        f"file: {upstream_run / 'checkpoint.pt'}",
        f"folder: upstream checkpoint folder {upstream_run}: used checkpoint.pt (not read: rng_state_0.pt)",
        "format: torch zip",
        f"weights from: model_state_dict ({N_MODEL_TENSORS} model tensors",
        f"ignored: optimizer_state_dict: dict of 2 entries holding {UpstreamRun.n_optimizer_tensors} tensors",
        f"records: state: {UPSTREAM_MODULE}.TrainingState -> TrainingState(epoch=1, epoch_start_step=24, step=30,",
        f"prefixes stripped: 'model.' x{N_MODEL_TENSORS}",
        (
            "dropped (not model weights): text_noise_schedule.log_prior, text_noise_schedule.log_gamma, "
            "text_noise_schedule.log_B"
        ),
        (
            "layout: vocab_size=16, hidden_size=32, latent_dim=4, max_seq_len=8, n_blocks=2, cond_dim=24, "
            "cluster_head=False, num_residual_streams=2, residual_layout=0.3.x"
        ),
        "versions: not recorded",
        "non-finite tensors: none",
    ]:
        assert expected in result.stdout, f"{expected!r} not in:\n{result.stdout}"


def test_cli_convert_writes_loadable_safetensors_with_provenance(upstream_run, source_model, tmp_path, capsys):
    before = digests(upstream_run)
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(upstream_run), str(out)]) == 0
    assert sorted(tmp_path.iterdir()) == [out], "no partial file may be left behind"
    model = make_model(seed=5)
    report = load_checkpoint_into(model, out)
    assert_bit_identical(outputs(model), outputs(source_model))
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == FORMAT and meta["step"] == "30" and meta["config"] == "null"
    assert json.loads(meta["training_state"])["total_flops"] == 5.5e9
    assert "versions" not in meta, "upstream recorded no versions; none may be invented"
    source = json.loads(meta["converted_from"])
    assert source["sha256"] == hashlib.sha256((upstream_run / "checkpoint.pt").read_bytes()).hexdigest()
    assert source["weights_from"] == ["model_state_dict"] and source["prefixes_stripped"] == {"model.": N_MODEL_TENSORS}
    assert json.loads(meta["model_sizes"]) == {"vocab_size": V, "latent_dim": D, "cluster_size": 0}
    assert report.metadata["step"] == 30 and report.versions_match is None
    assert digests(upstream_run) == before

    written = hashlib.sha256(out.read_bytes()).hexdigest()
    capsys.readouterr()
    assert main(["convert", str(upstream_run), str(out)]) == 2
    assert "already exists: convert never overwrites" in capsys.readouterr().err
    assert main(["convert", str(out), str(out)]) == 2
    assert "is the input" in capsys.readouterr().err
    assert hashlib.sha256(out.read_bytes()).hexdigest() == written
    assert main(["convert", str(upstream_run), str(tmp_path / "w.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert main(["convert", str(upstream_run), str(tmp_path / "nowhere" / "w.safetensors")]) == 2
    assert "does not exist; create it first" in capsys.readouterr().err


def test_cli_convert_carries_this_projects_metadata(tmp_path, source_model):
    config = {"model": dict(CONFIG, latent_dim=D), "tokenizer": {"vocab_size": V}}
    original = save_checkpoint(
        tmp_path / "mine.safetensors", source_model, config=config, trainer_kind="cycle", step=12
    )
    out = tmp_path / "copy.safetensors"
    assert main(["convert", str(original), str(out)]) == 0
    with safe_open(str(original), framework="pt") as a, safe_open(str(out), framework="pt") as b:
        before, after = a.metadata(), b.metadata()
    for key in ("config", "versions", "trainer_kind", "step", "model_sizes"):
        assert after[key] == before[key], key
    assert json.loads(after["converted_from"])["format"] == "safetensors"
    model = make_model(seed=6)
    load_checkpoint_into(model, out)
    assert_bit_identical(outputs(model), outputs(source_model))


def test_cli_refuses_a_payload_in_one_paragraph_without_running_it(tmp_path, source_model):
    marker = tmp_path / "payload_ran"
    path = _payload_files(tmp_path, marker, source_model.state_dict())["zip"]
    for args in (("inspect", path), ("convert", path, tmp_path / "o.safetensors")):
        result = run_cli(*args)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.startswith(f"error: {path}: refused before unpickling") and "posix.system" in result.stderr
        assert "Traceback" not in result.stderr and "\n\n" not in result.stderr.strip()
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


def test_cli_inspect_lists_non_finite_tensors(tmp_path, source_model, capsys):
    state = {k: v.clone() for k, v in source_model.state_dict().items()}
    state["text_head.weight"][2, 3] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    assert main(["inspect", str(path)]) == 0
    assert "non-finite tensors: text_head.weight (1 NaN, 0 +Inf, 0 -Inf of 512)" in capsys.readouterr().out
