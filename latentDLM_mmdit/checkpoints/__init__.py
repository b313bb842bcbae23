"""Saving and strictly loading model checkpoints, and reading upstream's safely.

Written here: one safetensors file with the model's state dict and metadata (format, config,
versions of torch / mmdit / hyper-connections / x-transformers, trainer kind, step, model sizes),
plus `<stem>.train_state.pt` beside it with the optimizer state, step and RNG states, published
as a pair that survives a kill at any point (`save_checkpoint`, `remove_interrupted_saves`).

Read here, never modified:
- that format and any safetensors file, its header validated before anything is allocated;
- upstream's `.pt` / `.pth` / `.bin` files and checkpoint folders (see `checkpoints_mmdit`):
  torch's weights_only unpickler, plain records (a dataclass such as upstream's `TrainingState`)
  read as data, numpy scalars through validating replacements, everything else refused with the
  global's name and a safe way forward. The state dict is a bare one or the one under
  `model_state_dict` / `state_dict`; keys lose `module.` (DDP), `_orig_mod.` (torch.compile) and
  `model.` (the trainer) prefixes nested in any order; the trainer's `text_noise_schedule.*`
  buffers are dropped. `CheckpointSource.contents` says what was used, ignored, stripped, dropped.

Also: `derive_layout` (the model's sizes from names and shapes alone), `layout_differences`
(config vs checkpoint, key by key), `find_non_finite` (NaN/Inf, one tensor at a time), and the
command line `python -m latentDLM_mmdit.checkpoints inspect IN` / `convert IN OUT.safetensors`.

One module per concern (each imports only those before it in this list): `base` (format, shared
markers, `CheckpointError`, installed versions), `keys` (key normalising, where sizes live),
`safetensors_header`, `source` (opening any checkpoint), `layout`, `nonfinite`, `loading` (the
strict load), `saving` (crash-safe pairs), `convert` (convert, inspect and the command line).
The names below are the package's interface; import them from here.
"""

from latentDLM_mmdit.checkpoints.base import (
    FORMAT,
    MMDIT_02_MARKERS,
    MMDIT_03_MARKERS,
    RESIDUAL_CONTAINER,
    TRACKED_PACKAGES,
    CheckpointError,
    installed_versions,
)
from latentDLM_mmdit.checkpoints.convert import convert_checkpoint, file_sha256, inspect_lines, main, write_safetensors
from latentDLM_mmdit.checkpoints.keys import DROPPED_PREFIXES, STRIPPED_PREFIXES, normalize_key, normalize_keys
from latentDLM_mmdit.checkpoints.layout import (
    MODEL_DEFAULT_RESIDUAL_STREAMS,
    LayoutDifference,
    ModelLayout,
    checkpoint_layout,
    derive_layout,
    explain_layout_differences,
    layout_differences,
    model_sizes_from,
)
from latentDLM_mmdit.checkpoints.loading import (
    LoadReport,
    compare_versions,
    layout_mismatch_message,
    load_checkpoint_into,
    residual_stream_hint,
)
from latentDLM_mmdit.checkpoints.nonfinite import NON_FINITE_CHUNK, NonFiniteTensor, find_non_finite
from latentDLM_mmdit.checkpoints.safetensors_header import (
    MAX_SAFETENSORS_HEADER,
    SAFETENSORS_DTYPES,
    SAFETENSORS_NAMES,
    SafetensorsEntry,
    SafetensorsHeader,
    read_safetensors_header,
)
from latentDLM_mmdit.checkpoints.saving import (
    load_train_state,
    remove_interrupted_saves,
    save_checkpoint,
    train_state_path,
)
from latentDLM_mmdit.checkpoints.source import (
    MODEL_SIZE_KEYS,
    WRAPPER_KEYS,
    CheckpointContents,
    CheckpointSource,
    check_model_sizes,
    describe_value,
    open_checkpoint,
)
from latentDLM_mmdit.checkpoints_mmdit import InertRecord, TrainingState

__all__ = [
    "DROPPED_PREFIXES",
    "FORMAT",
    "MAX_SAFETENSORS_HEADER",
    "MMDIT_02_MARKERS",
    "MMDIT_03_MARKERS",
    "MODEL_DEFAULT_RESIDUAL_STREAMS",
    "MODEL_SIZE_KEYS",
    "NON_FINITE_CHUNK",
    "RESIDUAL_CONTAINER",
    "SAFETENSORS_DTYPES",
    "SAFETENSORS_NAMES",
    "STRIPPED_PREFIXES",
    "TRACKED_PACKAGES",
    "WRAPPER_KEYS",
    "CheckpointContents",
    "CheckpointError",
    "CheckpointSource",
    "InertRecord",
    "LayoutDifference",
    "LoadReport",
    "ModelLayout",
    "NonFiniteTensor",
    "SafetensorsEntry",
    "SafetensorsHeader",
    "TrainingState",
    "check_model_sizes",
    "checkpoint_layout",
    "compare_versions",
    "convert_checkpoint",
    "derive_layout",
    "describe_value",
    "explain_layout_differences",
    "file_sha256",
    "find_non_finite",
    "inspect_lines",
    "installed_versions",
    "layout_differences",
    "layout_mismatch_message",
    "load_checkpoint_into",
    "load_train_state",
    "main",
    "model_sizes_from",
    "normalize_key",
    "normalize_keys",
    "open_checkpoint",
    "read_safetensors_header",
    "remove_interrupted_saves",
    "residual_stream_hint",
    "save_checkpoint",
    "train_state_path",
    "write_safetensors",
]
