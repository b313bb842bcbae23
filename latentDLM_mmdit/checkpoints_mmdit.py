"""Upstream's checkpoint files (LGDLM `latentDLM_mmdit/checkpoints_mmdit.py`), read without running them.

What upstream writes, with `torch.save` (pickle protocol 2, torch's zip format):

    save_checkpoint(path, trainer, optimizer, state)  ->  path/checkpoint.pt
        {'model_state_dict': trainer.state_dict(),      # model.* + text_noise_schedule.*
         'optimizer_state_dict': optimizer.state_dict(),
         'state': TrainingState(...),                   # a dataclass of this module's name
         'config': None or a plain dict}
    save_full_model(path, model, ..., training_state, is_final)  ->  path/model.pth | model_final.pth
        {'model_state_dict': ..., 'config': ..., 'training_state': ...}

`TrainingState` below has upstream's fields and defaults, so code written against upstream can
import it from here.

Reading (`load_torch_file`) keeps torch's weights_only unpickler and adds only:
- plain records: a global that the pickle only instantiates with NEWOBJ and fills with BUILD
  (a dataclass, a plain object) is given an `InertRecord` stand-in that holds module, qualname
  and fields; calling a stand-in (REDUCE) raises. Records of upstream's `TrainingState` whose
  fields match exactly become this module's `TrainingState`; every other record stays inert.
- numpy scalars (`np.float64(...)` inside a state): `numpy.dtype` and `numpy[._]core.multiarray.scalar`
  are replaced by functions that accept only a numeric type code and the exact number of raw
  bytes, and build the number themselves. Nothing else of numpy is reachable.
Every other global torch does not allow already is refused before unpickling, with a message
that names it and says how the pickle uses it; globals of modules that can run code (os, posix,
builtins, subprocess, ...) are never given a stand-in, whatever the use.

One module of ~760 lines, on purpose: its path is upstream's (`latentDLM_mmdit.checkpoints_mmdit`):
upstream's pickles name `latentDLM_mmdit.checkpoints_mmdit.TrainingState` and code written against
upstream imports it from here, and everything a pickle can reach is decided in this one file (the
records, the numpy scalars, the static scan, the policy, the unpickler), read together by whoever
reviews what an untrusted `.pt` can do. Its sections below are its seams.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import pickletools
import re
import shlex
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from reprlib import recursive_repr
from typing import Any, ClassVar

import numpy as np
import torch

UPSTREAM_CHECKPOINT_FILES = ("checkpoint.pt", "model_final.pth", "model.pth")
UPSTREAM_TRAINING_STATE = "latentDLM_mmdit.checkpoints_mmdit.TrainingState"
# Top-level modules whose globals are refused outright, however the pickle uses them: they run
# commands, import or execute code, touch files, sockets or memory, or re-enter pickle. (Globals
# of `torch` that torch's own allowlist refuses are refused too, see plan_globals.)
DANGEROUS_MODULES = frozenset(
    {
        "builtins",
        "__builtin__",
        "os",
        "posix",
        "nt",
        "sys",
        "subprocess",
        "shutil",
        "importlib",
        "runpy",
        "pickle",
        "marshal",
        "ctypes",
        "socket",
        "code",
        "codeop",
        "io",
        "tempfile",
        "pathlib",
        "glob",
        "functools",
        "operator",
        "types",
        "inspect",
        "copyreg",
        "copy_reg",
        "multiprocessing",
        "threading",
        "signal",
        "pty",
        "webbrowser",
        "urllib",
        "http",
        "ftplib",
        "smtplib",
        "asyncio",
        "pdb",
        "bdb",
        "timeit",
        "trace",
        "cProfile",
        "profile",
        "zipimport",
        "pkgutil",
        "site",
        "sysconfig",
        "distutils",
        "setuptools",
        "pip",
        "shlex",
        "platform",
        "gc",
        "weakref",
        "dill",
        "cloudpickle",
        "joblib",
    }
)
# numpy's scalar reconstructors (numpy 2 and 1.x module names) and dtype, see _numpy_scalar.
NUMPY_SCALAR_GLOBALS = ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
NUMPY_DTYPE_GLOBAL = "numpy.dtype"
NUMPY_SCALAR_CODES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"})
MAX_PICKLE_BYTES = 1 << 30  # data.pkl of a state dict is ~100 bytes per tensor
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's pre-1.6 format starts with this pickled number
USE_TEXT = {
    "called": "calls it (REDUCE)",
    "instantiated": "creates an instance with NEWOBJ",
    "built": "fills an instance with BUILD",
    "value": "uses it as a plain value",
}


@dataclass
class TrainingState:
    """Upstream's training progress record (same fields and defaults as upstream)."""

    epoch: int = 0
    epoch_start_step: int = 0
    step: int = 0
    total_tokens: int = 0
    total_flops: float = 0.0
    start_time: float = 0.0
    curr_time: float = 0.0


class UnreadableTorchFile(Exception):
    """A torch file this reader refuses or cannot read; the message names the file and a way forward."""


class RecordCalledError(Exception):
    """A pickle called a record stand-in (REDUCE): records are data, never code."""


# -- records ---------------------------------------------------------------------------------------
class _RecordMeta(type):
    def __call__(cls, *args, **kwargs):
        raise RecordCalledError(
            f"the pickle calls {cls.global_name}(...) (REDUCE); it was admitted only as a plain "
            "record (NEWOBJ + BUILD), so it is refused"
        )


class InertRecord(metaclass=_RecordMeta):
    """An object a checkpoint's pickle created with NEWOBJ and filled with BUILD, kept as data.

    Never calls, imports or instantiates the class it stands for. Read-only attributes:
        global_name: "module.qualname" as the pickle names it.
        fields: the attributes BUILD set (the object's `__dict__` and slots when it was pickled).
        state: BUILD's argument when it was not a dict of attributes, else None.
        newargs: the arguments NEWOBJ passed (usually none).
    """

    global_name: ClassVar[str] = ""
    __slots__ = ("_fields", "_newargs", "_state")

    def __new__(cls, *newargs):
        record = object.__new__(cls)
        record._fields, record._state, record._newargs = {}, None, tuple(newargs)
        return record

    def __setstate__(self, state: Any) -> None:  # BUILD
        if (
            isinstance(state, tuple)
            and len(state) == 2
            and isinstance(state[1], dict)
            and (state[0] is None or isinstance(state[0], dict))
        ):
            self._fields.update(state[0] or {})  # (instance dict, slot values)
            self._fields.update(state[1])
        elif isinstance(state, dict):
            self._fields.update(state)
        else:
            self._state = state

    @property
    def module(self) -> str:
        return self.global_name.rpartition(".")[0]

    @property
    def qualname(self) -> str:
        return self.global_name.rpartition(".")[2]

    @property
    def fields(self) -> dict[str, Any]:
        return dict(self._fields)

    @property
    def state(self) -> Any:
        return self._state

    @property
    def newargs(self) -> tuple:
        return self._newargs

    @recursive_repr()  # a pickle can make a record hold itself
    def __repr__(self) -> str:
        inner = [f"{k}={v!r}" for k, v in self._fields.items()]
        if self._state is not None:
            inner.append(f"<state {self._state!r}>")
        return f"{self.qualname}({', '.join(inner)})"


def record_stand_in(global_name: str) -> type:
    """A fresh InertRecord subclass standing in for `global_name` (module.qualname)."""
    return _RecordMeta(
        global_name.rpartition(".")[2],
        (InertRecord,),
        {
            "__slots__": (),
            "__module__": __name__,
            "__qualname__": f"InertRecord[{global_name}]",
            "global_name": global_name,
        },
    )


def training_state_from_record(record: InertRecord) -> tuple[TrainingState | None, str | None]:
    """(TrainingState, None) when the record has exactly upstream's fields with numbers of the
    right kind; else (None, why not). Missing fields are not filled with defaults."""
    names = [f.name for f in dataclasses.fields(TrainingState)]
    fields = record.fields
    if record.state is not None or record.newargs or set(fields) != set(names):
        return None, f"its fields {sorted(map(str, fields))} are not upstream's {names}"
    values = {}
    for name in names:
        kind, value = type(getattr(TrainingState, name)), fields[name]
        integral = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        real = integral or isinstance(value, (float, np.floating))
        if not (integral if kind is int else real):
            return None, f"field {name} holds {value!r}, not {'an int' if kind is int else 'a number'}"
        values[name] = kind(value)
    return TrainingState(**values), None


# -- numpy scalars ---------------------------------------------------------------------------------
class _NumpyDTypeSpec:
    """What the pickle's `numpy.dtype(code, align, copy)` + BUILD described, validated; numpy is
    called later, by _numpy_scalar, with the validated code only."""

    __slots__ = ("byteorder", "code")

    def __init__(self, code: str):
        self.code, self.byteorder = code, None

    def __setstate__(self, state: Any) -> None:  # BUILD: numpy's dtype state, version 3
        if not (
            isinstance(state, tuple)
            and len(state) == 8
            and state[0] == 3
            and state[1] in ("<", ">", "|", "=")
            and state[2:] == (None, None, None, -1, -1, 0)
        ):
            raise UnreadableTorchFile(
                f"a numpy dtype {self.code!r} has an unexpected state {state!r} (only plain numeric dtypes are read)"
            )
        self.byteorder = state[1]


def _numpy_dtype(code: Any, align: Any = False, copy: Any = True) -> _NumpyDTypeSpec:
    if code not in NUMPY_SCALAR_CODES or align not in (0, 1) or copy not in (0, 1):
        raise UnreadableTorchFile(
            f"numpy.dtype{(code, align, copy)!r}: only numeric dtypes "
            f"({', '.join(sorted(NUMPY_SCALAR_CODES))}) are read"
        )
    return _NumpyDTypeSpec(code)


def _numpy_scalar(spec: Any, data: Any = None) -> np.generic:
    if not isinstance(spec, _NumpyDTypeSpec) or spec.byteorder is None:
        raise UnreadableTorchFile(f"numpy scalar with dtype {spec!r}: only plain numeric dtypes are read")
    dtype = np.dtype(("" if spec.byteorder == "|" else spec.byteorder) + spec.code)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnreadableTorchFile(
            f"numpy {dtype} scalar with {type(data).__name__} data of "
            f"{len(data) if isinstance(data, bytes) else '?'} bytes; needs {dtype.itemsize} bytes"
        )
    return np.frombuffer(data, dtype=dtype)[0]


# A name no GLOBAL instruction can produce (a GLOBAL's module and name are single lines), so
# only numpy.dtype's replacement can create this type; BUILD needs it allowlisted.
_DTYPE_SPEC_GLOBAL = "numpy dtype spec\n(validated by latentDLM_mmdit.checkpoints_mmdit)"


# -- static scan of a pickle -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Global:
    name: str


@dataclass(frozen=True)
class _NewObject:
    name: str


_PUSHES_PLAIN = {
    "NONE",
    "NEWFALSE",
    "NEWTRUE",
    "EMPTY_TUPLE",
    "EMPTY_LIST",
    "EMPTY_DICT",
    "EMPTY_SET",
    "BININT",
    "BININT1",
    "BININT2",
    "BINFLOAT",
    "BINUNICODE",
    "SHORT_BINSTRING",
    "LONG1",
}


@dataclass
class PickleScan:
    """Globals a pickle names, each with how it is used ("called", "instantiated", "built",
    "value"); opcodes torch's weights_only unpickler does not support; the first value when it
    is a plain number (torch's legacy magic number)."""

    uses: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    unsupported: set[str] = dataclasses.field(default_factory=set)
    number: int | None = None


def _global_name(arg: str) -> str:
    module, _, name = arg.partition(" ")
    if (module, name) in NAME_MAPPING:  # as torch's reader maps Python 2 names
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def scan_pickle(stream: io.BufferedIOBase) -> PickleScan:
    """Walks one pickle's opcodes symbolically (nothing is built): which globals it names and
    how each is used. Raises ValueError for a malformed pickle."""
    scan = PickleScan()
    stack: list[Any] = []
    metastack: list[list[Any]] = []
    memo: dict[int, Any] = {}

    def consume(items) -> None:
        for item in items:
            if isinstance(item, _Global):
                scan.uses[item.name].add("value")

    try:
        for op, arg, _ in pickletools.genops(stream):
            name = op.name
            if name == "GLOBAL":
                full = _global_name(arg)
                scan.uses.setdefault(full, set())
                stack.append(_Global(full))
            elif name == "NEWOBJ":
                args, cls = stack.pop(), stack.pop()
                consume([args])
                if isinstance(cls, _Global):
                    scan.uses[cls.name].add("instantiated")
                stack.append(_NewObject(cls.name) if isinstance(cls, _Global) else None)
            elif name == "REDUCE":
                args, func = stack.pop(), stack.pop()
                consume([args])
                if isinstance(func, _Global):
                    scan.uses[func.name].add("called")
                stack.append(None)
            elif name == "BUILD":
                consume([stack.pop()])
                if isinstance(stack[-1], _NewObject):
                    scan.uses[stack[-1].name].add("built")
            elif name == "MARK":
                metastack.append(stack)
                stack = []
            elif name in ("TUPLE", "APPENDS", "SETITEMS"):
                consume(stack)
                stack = metastack.pop()
                if name == "TUPLE":
                    stack.append(None)
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                consume(stack[-n:])
                del stack[-n:]
                stack.append(None)
            elif name in ("APPEND", "BINPERSID"):
                consume([stack.pop()])
                if name == "BINPERSID":
                    stack.append(None)
            elif name == "SETITEM":
                consume([stack.pop(), stack.pop()])
            elif name in _PUSHES_PLAIN:
                stack.append(None)
                if name in ("LONG1", "BININT", "BININT1", "BININT2") and scan.number is None and len(stack) == 1:
                    scan.number = int(arg)
            elif name in ("BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name in ("BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "STOP":
                consume(stack)
            elif name != "PROTO":
                scan.unsupported.add(name)
                break
    except (IndexError, KeyError) as exc:
        raise ValueError(f"malformed pickle ({type(exc).__name__} while walking its opcodes)") from exc
    return scan


# -- policy ----------------------------------------------------------------------------------------
def _how(uses: set[str]) -> str:
    order = ("called", "instantiated", "built", "value")
    return "; ".join(f"the pickle {USE_TEXT[u]}" for u in order if u in uses) or "the pickle names it"


def is_dangerous(global_name: str) -> bool:
    top = global_name.split(".", 1)[0]
    return top in DANGEROUS_MODULES or top.startswith("_")


@dataclass
class GlobalsPlan:
    """What the reader provides for each global torch does not allow by default."""

    records: dict[str, type] = dataclasses.field(default_factory=dict)  # name -> stand-in
    numpy: list[str] = dataclasses.field(default_factory=list)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> reason

    def safe_globals(self) -> list[tuple[Any, str]]:
        allowed: list[tuple[Any, str]] = [(cls, name) for name, cls in self.records.items()]
        for name in self.numpy:
            allowed.append((_numpy_dtype if name == NUMPY_DTYPE_GLOBAL else _numpy_scalar, name))
        if self.numpy:
            allowed.append((_NumpyDTypeSpec, _DTYPE_SPEC_GLOBAL))
        return allowed


def plan_globals(unsafe: list[str], scan: PickleScan) -> GlobalsPlan:
    """Decides, for each global torch would refuse, a record stand-in, a numpy replacement, or a
    refusal with the reason.

    Args:
        unsafe: the globals torch's weights_only reader does not allow (get_unsafe_globals_in_checkpoint).
        scan: how the pickle uses each global (scan_pickle)."""
    plan = GlobalsPlan()
    for name in sorted(unsafe):
        uses = scan.uses.get(name)
        if uses is None:  # torch saw a global this scan did not: do not guess what it does
            plan.refused[name] = "named by the pickle in a way this reader could not analyse"
        elif name.startswith("torch."):
            plan.refused[name] = (
                f"{_how(uses)}; torch's own weights_only allowlist does not allow it, and this "
                "reader never imitates torch's classes"
            )
        elif is_dangerous(name):
            plan.refused[name] = (
                f"{_how(uses)}; module {name.split('.', 1)[0]} can run code or reach "
                "the system, and this reader never imports or imitates it"
            )
        elif name in NUMPY_SCALAR_GLOBALS or name == NUMPY_DTYPE_GLOBAL:
            if uses == {"called"}:
                plan.numpy.append(name)
            else:
                plan.refused[name] = f"{_how(uses)}; numpy's scalar reconstructors are read only when called"
        elif "instantiated" in uses and uses <= {"instantiated", "built"}:
            plan.records[name] = record_stand_in(name)
        else:
            plan.refused[name] = (
                f"{_how(uses)}; only classes the pickle creates with NEWOBJ and fills "
                "with BUILD (dataclasses, plain objects) are read, as inert records"
            )
    return plan


# -- reading a torch file --------------------------------------------------------------------------
@dataclass
class TorchFile:
    """A torch file read safely: the unpickled object, its container format, the records found
    (where, what) and the numpy scalars found."""

    obj: Any
    container: str  # "torch zip" | "torch legacy"
    records: list[str]
    numpy_scalars: list[str]


def _safe_way_forward(path: Path, refused: dict[str, str]) -> str:
    """A way forward that unpickles nothing unsafe: for a hostile file, fetching the weights again;
    otherwise a one-line re-export to safetensors, run where the file was written."""
    dangerous = [n for n in refused if is_dangerous(n)]
    if dangerous:
        return (
            f"{', '.join(dangerous)} has no place in a weights file: treat {path.name} as hostile, do not "
            "unpickle it anywhere, and get the weights again from whoever published them (as safetensors if "
            "possible), then check them with `python -m latentDLM_mmdit.checkpoints inspect FILE`."
        )
    names = [n for n in refused if "." in n and not n.startswith("torch.")]
    if any(n.startswith("torch.nn.modules.") for n in refused):
        return (
            f"{path.name} holds a whole pickled torch.nn module, not a state dict. A safe way forward: where "
            "it was written, save the module's weights instead, e.g. "
            '`safetensors.torch.save_model(model, "weights.safetensors")`, and use that file here.'
        )
    imports = "".join(f"from {n.rpartition('.')[0]} import {n.rpartition('.')[2]}; " for n in names)
    allow = (
        f"torch.serialization.add_safe_globals([{', '.join(n.rpartition('.')[2] for n in names)}]); " if names else ""
    )
    out = path.with_suffix(".safetensors")
    code = (
        f"import torch; from safetensors.torch import save_file; {imports}{allow}"
        f'ck = torch.load({json.dumps(str(path))}, map_location="cpu", weights_only=True); '
        f'sd = ck.get("model_state_dict", ck); '
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, {json.dumps(str(out))})"
    )
    return (
        "A safe way forward: where the file was written, if you trust it, re-export the weights as "
        f"safetensors with torch's weights_only reader (allowing {'only ' + ', '.join(names) if names else 'nothing beyond torch'}): "
        f"python -c {shlex.quote(code)} and use {out} here, or convert it with "
        f"`python -m latentDLM_mmdit.checkpoints convert {out} NEW.safetensors`."
    )


def refusal_message(path: Path, refused: dict[str, str]) -> str:
    listed = "; ".join(f"GLOBAL {name}: {reason}" for name, reason in refused.items())
    return (
        f"{path}: refused before unpickling (nothing in it was run): its pickle needs globals this "
        f"reader does not provide. {listed}. {_safe_way_forward(path, refused)}"
    )


def _torch_reason(exc: BaseException) -> str:
    """The core of torch's error, without its advice to turn the safe reader off or allowlist."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    text = text.strip().split("\n\n", 1)[0]
    for advice in ("Please use `torch.serialization", "Re-running `torch.load`", "weights_only=False"):
        text = text.split(advice, 1)[0]
    return " ".join(text.split()) or type(exc).__name__


def _walk(obj: Any, where: str, seen: set[int]) -> Iterator[tuple[str, Any, Any, Any]]:
    """Yields (where, value, container, key) for every value under obj (tensors not entered)."""
    if id(obj) in seen or torch.is_tensor(obj):
        return
    if isinstance(obj, (dict, list, tuple, InertRecord)):
        seen.add(id(obj))
    if isinstance(obj, dict):
        items = [(k, v, f"{where}.{k}" if where else str(k)) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(i, v, f"{where}[{i}]") for i, v in enumerate(obj)]
    elif isinstance(obj, InertRecord):
        items = [(k, v, f"{where}.{k}") for k, v in obj._fields.items()]
    else:
        return
    for key, value, path in items:
        yield path, value, obj, key
        yield from _walk(value, path, seen)


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _map_records(obj: Any) -> tuple[list[str], list[str]]:
    """Replaces upstream TrainingState records by TrainingState in place (wherever each sits);
    returns (one note per distinct record, one note per numpy scalar)."""
    records, scalars = [], []
    mapped: dict[int, TrainingState | None] = {}
    if isinstance(obj, InertRecord):
        records.append(f"(top level): {obj.global_name} -> inert record {_short(obj)}")
    for where, value, container, key in list(_walk(obj, "", set())):
        if isinstance(value, np.generic):
            scalars.append(f"{where}: numpy {value.dtype} {value.item()!r}")
        if not isinstance(value, InertRecord):
            continue
        first = id(value) not in mapped
        state, why = mapped.setdefault(id(value), None), None
        if value.global_name == UPSTREAM_TRAINING_STATE and first:
            state, why = training_state_from_record(value)
            mapped[id(value)] = state
        if state is not None and isinstance(container, (dict, list, InertRecord)):
            (container._fields if isinstance(container, InertRecord) else container)[key] = state
            note = f"{where}: {value.global_name} -> {_short(state)}"
        elif value.global_name == UPSTREAM_TRAINING_STATE:
            why = why or "it sits inside a tuple"
            note = (
                f"{where}: {value.global_name} -> inert record {_short(value)} (not mapped onto TrainingState: {why})"
            )
        else:
            note = f"{where}: {value.global_name} -> inert record {_short(value)}"
        if first:
            records.append(note)
    return records, scalars


def _data_pickle(path: Path, archive: zipfile.ZipFile) -> bytes:
    names = archive.namelist()
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise UnreadableTorchFile(
            f"{path}: a TorchScript archive (torch.jit.save), not a torch.save checkpoint; "
            "export the scripted module's state_dict() with torch.save or as safetensors"
        )
    found = [
        info for info in archive.infolist() if info.filename.count("/") == 1 and info.filename.endswith("/data.pkl")
    ]
    if len(found) != 1:
        raise UnreadableTorchFile(
            f"{path}: a zip archive without exactly one <archive>/data.pkl "
            f"({len(found)} found): not a torch.save checkpoint"
        )
    if found[0].file_size > MAX_PICKLE_BYTES:
        raise UnreadableTorchFile(
            f"{path}: its data.pkl declares {found[0].file_size} bytes, more than "
            f"{MAX_PICKLE_BYTES} bytes: not a state dict"
        )
    return archive.read(found[0])


def _scan_legacy(path: Path) -> PickleScan:
    """Scans a non-zip file's leading pickles: a raw pickle, or torch's legacy format (magic
    number, protocol, system info, then the object)."""
    merged = PickleScan()
    with open(path, "rb") as f:
        for index in range(4):
            scan = scan_pickle(f)
            for name, uses in scan.uses.items():
                merged.uses.setdefault(name, set()).update(uses)
            merged.unsupported |= scan.unsupported
            if index == 0 and scan.number != LEGACY_MAGIC or scan.unsupported:
                break
    return merged


def load_torch_file(path: Path) -> TorchFile:
    """Reads a torch.save file without running anything from it (see the module docstring).

    Raises UnreadableTorchFile (message names the file, the problem and a safe way forward).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise UnreadableTorchFile(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if not head:
        raise UnreadableTorchFile(f"{path}: the file is empty (0 bytes); was its write interrupted?")
    if head.startswith(b"PK\x03\x04"):
        return _load_zip(path)
    if head[0] == pickle.PROTO[0]:
        return _load_legacy(path)
    if len(head) > 8 and head[8:9] == b"{":
        raise UnreadableTorchFile(f"{path}: looks like a safetensors file; give it the .safetensors suffix")
    raise UnreadableTorchFile(
        f"{path}: not a torch checkpoint (it starts with {head[:8]!r}, neither a zip archive nor a pickle)"
    )


def _load_zip(path: Path) -> TorchFile:
    try:
        with zipfile.ZipFile(path) as archive:
            data = _data_pickle(path, archive)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UnreadableTorchFile(
            f"{path}: a damaged or truncated zip archive ({exc}); copy the file again from its source"
        ) from exc
    try:
        scan = scan_pickle(io.BytesIO(data))
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError) as exc:
        raise UnreadableTorchFile(
            f"{path}: its pickle cannot be analysed ({exc}); not a torch.save checkpoint or a damaged one"
        ) from exc
    if scan.unsupported:
        raise UnreadableTorchFile(
            f"{path}: its pickle uses opcodes {sorted(scan.unsupported)} that torch's "
            "weights_only reader does not support (torch.save writes protocol 2); re-save "
            "the state dict with torch.save's defaults, or as safetensors"
        )
    plan = plan_globals(unsafe, scan)
    if plan.refused:
        raise UnreadableTorchFile(refusal_message(path, plan.refused))
    return _unpickle(path, plan, "torch zip", mmap=True)


# What torch's own reader allows from modules this reader treats as dangerous: sets, complex
# numbers, byte arrays and latin-1 bytes. torch.* globals are left to torch's reader too.
_TORCH_LEGACY_GLOBALS = frozenset({"builtins.set", "builtins.complex", "builtins.bytearray", "_codecs.encode"})


def _load_legacy(path: Path) -> TorchFile:
    try:
        scan = _scan_legacy(path)
    except ValueError as exc:
        raise UnreadableTorchFile(f"{path}: not a readable pickle ({exc}); truncated or not a checkpoint") from exc
    dangerous = {
        n: f"{_how(u)}; module {n.split('.', 1)[0]} can run code or reach the system, and this reader "
        "never imports or imitates it"
        for n, u in sorted(scan.uses.items())
        if is_dangerous(n) and n not in _TORCH_LEGACY_GLOBALS and not n.startswith("torch.")
    }
    if dangerous:
        raise UnreadableTorchFile(refusal_message(path, dangerous))
    return _unpickle(path, GlobalsPlan(), "torch legacy", mmap=False)


def _unpickle(path: Path, plan: GlobalsPlan, container: str, mmap: bool) -> TorchFile:
    try:
        with torch.serialization.safe_globals(plan.safe_globals()):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except (RecordCalledError, UnreadableTorchFile) as exc:
        provided = {name: "" for name in [*plan.records, *plan.numpy]}
        raise UnreadableTorchFile(
            f"{path}: refused while unpickling (nothing in it was run): {exc}. {_safe_way_forward(path, provided)}"
        ) from None
    # torch's reader raises UnpicklingError, RuntimeError, EOFError, struct.error, ... on a damaged or
    # hostile file; every one is reported as the file's problem.
    except Exception as exc:  # noqa: BLE001
        reason = _torch_reason(exc)
        extra = (
            " Records (NEWOBJ + BUILD) are read from torch's zip format only (torch.save's default since 1.6)."
            if container == "torch legacy"
            else ""
        )
        named = {name: "" for name in re.findall(r"GLOBAL ([\w.]+)", reason)}
        raise UnreadableTorchFile(
            f"{path}: torch's weights_only reader refused it ({type(exc).__name__}: "
            f"{reason}).{extra} {_safe_way_forward(path, named)}"
        ) from None
    records, scalars = _map_records(obj)
    return TorchFile(obj, container, records, scalars)


def resolve_upstream_folder(path: Path) -> tuple[Path, str]:
    """The checkpoint file in upstream's checkpoint folder, and a note saying which was used.

    Raises UnreadableTorchFile unless the folder holds exactly one of UPSTREAM_CHECKPOINT_FILES."""
    present = [name for name in UPSTREAM_CHECKPOINT_FILES if (path / name).is_file()]
    if len(present) != 1:
        listing = sorted(p.name for p in path.iterdir())[:12]
        what = "none" if not present else f"several ({', '.join(present)})"
        raise UnreadableTorchFile(
            f"{path} is a directory holding {what} of upstream's checkpoint files "
            f"({', '.join(UPSTREAM_CHECKPOINT_FILES)}); it holds {listing or 'nothing'}. Pass the checkpoint "
            "file itself"
        )
    others = sorted(p.name for p in path.iterdir() if p.name != present[0])
    note = f"upstream checkpoint folder {path}: used {present[0]}"
    if others:
        note += f" (not read: {', '.join(others[:8])}{' ...' if len(others) > 8 else ''})"
    return path / present[0], note
