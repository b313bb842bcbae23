"""Peak memory per rank and FLOPs of one training step at the user's full config size, traced
without allocating anything (the `resources` row).

One step is the loop's (`latentDLM_mmdit.training.step.StepRunner.run`): the trainer's forward under
the configured autocast, backward of its loss, gradient clipping and the AdamW step, on a model
built from the config's real sizes (`model.*`, the checkpoint's vocabulary and latent width) in
train mode, a batch of `training.train_batch_size` x the sequence length. It runs under
`torch._subclasses.fake_tensor.FakeTensorMode`: every tensor has its shape, dtype and device and no
storage, so an 893M-parameter step at S=4096 traces on a laptop. A small step (the tiny default, a
test config) is run for real instead, 8x faster than FakeTensorMode's ~100 us per op, and counted
the same way, until it passes `REAL_STEP_BYTES` live or `REAL_STEP_FLOPS` (then it is traced); the
two count the same FLOPs, passes and host reads, and the same bytes but for a CPU kernel's work
buffer (`tests/test_resources.py`). One dispatch mode, `StepTracer`, watches either:

- memory: every storage from its allocation to its release (weak references on the storages, as
  the caching allocator sees them: rounded up to 512 bytes), sorted into five kinds: parameters (and
  buffers), gradients (a `.grad`, from the moment autograd accumulates it), optimizer state (AdamW's
  moments), activations (storages autograd saved for backward, `saved_tensors_hooks`) and
  temporaries (everything else: forward intermediates, outputs, autocast's weight copies, gradients
  of activations, the optimizer's and clipping's foreach intermediates). It records the peak of
  each phase (forward, backward, optimizer) with its split, and who first saved each activation: a
  model pass, or the trainer's own code between passes (losses, reconstructions).
- FLOPs: `torch.utils.flop_counter`'s formulas (FlopCounterMode's), forward and backward.
- host reads (`Tensor.item()`, i.e. `aten._local_scalar_dense`): under FakeTensorMode there is no
  value to read. The trainers' non-finite checks are answered "finite" (True), the model's token-id
  range check "in range" (0), a float metric 1.0; the trainers' code is not touched, and the count
  of answered reads is reported. A step run for real gets the same answers: the same computation as
  its trace, whatever values the random weights give.

On a CPU trace of a mixed-precision run, `CudaAutocastPolicy` adds CUDA autocast's float32 ops to
CPU autocast (the estimate is for a CUDA run).

Why not `torch.distributed._tools.mem_tracker.MemTracker`: on this step it (1) refuses a model
called more than once per iteration from a trainer that is not an `nn.Module` ("does not support
memory tracking for multiple iterative calls"), and a plug-in trainer may be a plain class calling
the model four times; (2) splits activations from temporaries by phase (allocated in forward vs in
backward), so its "activations" include forward temporaries and autocast casts and cannot be checked
against what autograd saves, and labels the optimizer step's temporaries optimizer state
(measured: 2.43x the parameters' bytes for AdamW, whose state is 2x); (3) walks every tracked module
at every op: 8x the trace's time on a two-block model (9.4 s against 1.2 s); this tracer adds a
small fraction to FakeTensorMode's own cost.

Depth. The trace costs ~50 us of Python per op and a block of this backbone is ~11k ops per pass
forward and backward (the hyper-connections' Sinkhorn iterations alone are half), so the cycle
step of a 24-block model is ~1M ops, 90 s on two cores. A model deeper than two blocks is traced at
depths 1 and 2 with everything else at full size, and each phase's peak, its split, the FLOPs and
the saved bytes are extrapolated linearly to the real depth: the blocks are identical, so every
one of those quantities is an affine function of the depth (`tests/test_resources.py` checks the
extrapolation against a direct trace of the deeper model, byte for byte and FLOP for FLOP).
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry as FLOP_FORMULAS
from torch.utils.weak import WeakIdKeyDictionary

from latentDLM_mmdit.factory import dtype_from_config
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
from latentDLM_mmdit.precision import autocast

PARAMETERS, GRADIENTS, OPTIMIZER, ACTIVATIONS, TEMPORARIES = (
    "parameters",
    "gradients",
    "optimizer",
    "activations",
    "temporaries",
)
CATEGORIES = (PARAMETERS, GRADIENTS, OPTIMIZER, ACTIVATIONS, TEMPORARIES)
FORWARD, BACKWARD, STEP = "forward", "backward", "optimizer"
PHASES = (FORWARD, BACKWARD, STEP)
MODEL_PASSES, OWN_CODE = "model passes", "trainer's own code"
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to this (bytes)
TRACED_DEPTHS = (1, 2)  # depths a deeper model is traced at (then extrapolated)
# A step is run for real (faster than FakeTensorMode's ~100 us per op) while it stays this small; past
# either limit it is traced under FakeTensorMode. Real tensors are counted as fake ones (see `trace_step`).
REAL_STEP_BYTES = 256 * 2**20  # live bytes
REAL_STEP_FLOPS = 10**10  # FLOPs of the step so far (~0.2 s of a laptop core)

# What a step is given by name (`draws=`), as the harness's `CompatContext.draws` shapes them.
DRAW_SHAPES = {
    "latent_noise": "BD",
    "cycle_latent_noise": "BD",
    "latent_t": "B",
    "cycle_latent_t": "B",
    "text_t": "B",
    "pseudo_token_uniform": "BS",
    "mask_uniform": "BS",
}


# -- sizes --------------------------------------------------------------------------------------------
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes of a size written with its unit: `80GiB`, `24GB` (10^9), `81920MiB`, `1.5 TiB`.

    Raises ValueError naming what is wrong (no unit, an unknown unit, not a positive number)."""
    raw = str(text).strip()
    match = re.fullmatch(r"(.*?)\s*([A-Za-z]*)", raw)
    number, unit = match.group(1), match.group(2)
    if not unit:
        raise ValueError(f"{raw!r} has no unit")
    if unit.lower() not in _UNITS:
        raise ValueError(f"{raw!r}: unknown unit {unit!r} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{raw!r}: {number!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{raw!r} is not a positive size")
    return int(value * _UNITS[unit.lower()])


def size_text(n: float, unit: str | None = None) -> str:
    """Bytes in GiB, MiB or KiB (the largest that keeps the value >= 1, or `unit`), 3 significant digits."""
    scales = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10}
    unit = unit or next((u for u, v in scales.items() if abs(n) >= v), "KiB")
    value = n / scales[unit]
    if abs(value) >= 10:
        return f"{value:.1f} {unit}"
    return f"{value:.3g} {unit}" if abs(value) >= 0.005 else f"0 {unit}"


def size_unit(n: float) -> str:
    return size_text(n).split()[-1]


def flops_text(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} FLOP"


# -- the dispatch mode ------------------------------------------------------------------------------
_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default
_DEVICE = torch.ops.prim.device.default
# Ops whose output shape depends on the values: answered as if every element were selected.
_NONZERO, _MASKED_SELECT = torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default
_INDEX = torch.ops.aten.index.Tensor


def _as_if_all_selected(indices: list) -> list:
    """Boolean-mask indices of `aten.index` as the long indices of a mask that selects everything."""
    out = []
    for idx in indices:
        if idx is not None and idx.dtype in (torch.bool, torch.uint8):
            grids = torch.meshgrid(*[torch.arange(n, device=idx.device) for n in idx.shape], indexing="ij")
            out.extend(g.reshape(-1) for g in grids)
        else:
            out.append(idx)
    return out


@dataclass
class PhasePeak:
    """The largest live bytes of a phase and what they were at that moment."""

    total: int = 0
    split: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))


class RealStepTooLarge(Exception):
    """A step run for real passed `REAL_STEP_BYTES` or `REAL_STEP_FLOPS`: it is traced under
    FakeTensorMode instead."""


def _model_of(model_config: DictConfig, sizes: dict) -> MultimodalMMDiT:
    """The model `model_config` builds at the checkpoint's `sizes`, on the current default device."""
    return MultimodalMMDiT(
        model_config,
        vocab_size=int(sizes["vocab_size"]),
        latent_dim=int(sizes["latent_dim"]),
        cluster_size=int(sizes.get("cluster_size", 0) or 0),
    )


def _parameter_bytes(model_config: DictConfig, sizes: dict) -> int:
    """Bytes of the parameters of the model `model_config` builds (on the meta device: nothing allocated)."""
    with preserved_rng(), torch.device("meta"):
        model = _model_of(model_config, sizes)
    return sum(p.numel() * p.element_size() for p in model.parameters())


class _Storage:
    __slots__ = ("nbytes", "category", "saved_by", "ref")

    def __init__(self, nbytes: int, category: str):
        self.nbytes, self.category, self.saved_by, self.ref = nbytes, category, None, None


class StepTracer(TorchDispatchMode):
    """Watches a step traced under FakeTensorMode (or run for real): memory by kind and phase, FLOPs,
    host reads.

    Memory: every storage from its allocation to its release (weak references), rounded up to
    `round_to` bytes, sorted into CATEGORIES; the peak of each phase with its split. Register what
    exists before the step with `register(tensor, category)`, install `track_gradients(params)` and
    `track_passes(model)`, run the step inside `with tracer, tracer.saving():` and call
    `start_phase` as it moves on.

    FLOPs: `torch.utils.flop_counter.flop_registry`, FlopCounterMode's formulas, counted here rather
    than by a FlopCounterMode: its ModuleTracker registers gradient hooks on every module's outputs,
    which keep alive the parts of a graph that backward never visits (the text branch of a T2L pass:
    +3.5 MB of activations left after backward on the tiny cycle step), i.e. it would change the
    memory being measured; and one dispatch layer instead of two. `tests/test_resources.py` checks
    that both count the same.

    Host reads (`aten._local_scalar_dense`: `Tensor.item()`, `bool(t)`, `int(t)`, `float(t)`) have no
    value under FakeTensorMode: they are answered True for booleans (the trainers' non-finite checks:
    finite), 0 for integers (the model's token-id range check: in range) and 1.0 for floats (metrics),
    and counted in `host_reads`; so are ops whose output shape depends on the values (`nonzero`,
    `masked_select`: the stable trainer's token accuracy), answered as if every element were selected.

    Args:
        round_to: allocation granularity in bytes (the CUDA caching allocator's 512).
        limit: (live bytes, FLOPs) of a step run for real: past either, the tracer raises
            `RealStepTooLarge` (and `over_limit` stays set, whatever the trainer does with the error).
    """

    def __init__(self, round_to: int = CUDA_BLOCK, limit: tuple[int, int] | None = None):
        super().__init__()
        self.round_to = round_to
        self.limit = limit  # (live bytes, FLOPs) past which the step stops (RealStepTooLarge)
        self.over_limit = False
        self._storages = WeakIdKeyDictionary()  # UntypedStorage -> _Storage
        self.live = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.phase = FORWARD
        self.peaks = {phase: PhasePeak() for phase in PHASES}
        self.at_start: dict[str, dict[str, int]] = {}  # live bytes by kind when each phase began
        self.saved = {MODEL_PASSES: 0, OWN_CODE: 0}  # bytes first saved for backward, by where
        self.in_pass = 0  # > 0 while the model's forward runs
        self.passes = 0
        self.flops = 0
        self.host_reads = 0
        self._at_peak = False  # nothing allocated or freed since the current phase's peak

    # -- memory bookkeeping ------------------------------------------------------------------
    def nbytes(self, tensor: torch.Tensor) -> int:
        """The bytes of a tensor's storage as this tracer counts them (rounded)."""
        n = int(tensor.untyped_storage().nbytes())
        return -(-n // self.round_to) * self.round_to

    def _record(self, storage, category: str) -> _Storage:
        n = int(storage.nbytes())
        info = _Storage(-(-n // self.round_to) * self.round_to, category)
        info.ref = weakref.ref(storage, lambda _ref, info=info: self._free(info))
        self._storages[storage] = info
        self.live[category] += info.nbytes
        self.total += info.nbytes
        if self.limit is not None and self.total > self.limit[0]:
            self._stop()
        peak = self.peaks[self.phase]
        if self.total >= peak.total:
            peak.total, peak.split = self.total, dict(self.live)
            self._at_peak = True
        else:
            self._at_peak = False
        return info

    def _stop(self) -> None:
        self.over_limit = True
        raise RealStepTooLarge(f"the step passed {self.limit} (bytes, FLOPs)")

    def _free(self, info: _Storage) -> None:
        self.live[info.category] -= info.nbytes
        self.total -= info.nbytes
        self._at_peak = False

    def _move(self, info: _Storage, category: str) -> None:
        if info.category == category:
            return
        self.live[info.category] -= info.nbytes
        self.live[category] += info.nbytes
        info.category = category
        if self._at_peak:  # the same moment as the peak: its split follows the new kind
            self.peaks[self.phase].split = dict(self.live)

    def _info(self, tensor: torch.Tensor, category: str) -> _Storage:
        storage = tensor.untyped_storage()
        info = self._storages.get(storage)
        return info if info is not None else self._record(storage, category)

    def register(self, tensor: torch.Tensor, category: str) -> None:
        """Counts a tensor that exists before the step (or moves it to `category`)."""
        self._move(self._info(tensor, category), category)

    def start_phase(self, phase: str) -> None:
        """The step moves on to `phase`: its peak starts from what is live now."""
        self.phase = phase
        self.at_start[phase] = dict(self.live)
        self.peaks[phase] = PhasePeak(self.total, dict(self.live))
        self._at_peak = True

    # -- hooks ----------------------------------------------------------------------------------
    def track_gradients(self, params) -> list:
        """Post-accumulate-grad hooks that count each `p.grad` as a gradient; returns the handles."""

        def hook(p):
            if p.grad is not None:
                self.register(p.grad, GRADIENTS)

        return [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]

    def track_passes(self, model: torch.nn.Module) -> list:
        """Forward hooks marking the model's passes (saved bytes are attributed to them)."""

        def before(module, args):
            self.in_pass += 1
            self.passes += 1

        def after(module, args, output):
            self.in_pass -= 1

        return [model.register_forward_pre_hook(before), model.register_forward_hook(after)]

    def saving(self):
        """`saved_tensors_hooks` that count what autograd saves for backward as activations."""

        def pack(tensor):
            info = self._info(tensor, ACTIVATIONS)
            if info.category == TEMPORARIES:
                self._move(info, ACTIVATIONS)
            if info.saved_by is None and info.category == ACTIVATIONS:
                info.saved_by = MODEL_PASSES if self.in_pass else OWN_CODE
                self.saved[info.saved_by] += info.nbytes
            # Detached: an output saved with its own grad_fn would be a reference cycle through C++
            # autograd nodes (never freed), where autograd without hooks keeps none.
            return tensor.detach()

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE:  # asked ~once per op by the autograd engine; nothing to count
            return func(*args)
        kwargs = kwargs or {}
        if func is _LOCAL_SCALAR:
            self.host_reads += 1
            t = args[0]
            if t.dtype == torch.bool:
                return True
            return 1.0 if (t.is_floating_point() or t.is_complex()) else 0
        if func is _NONZERO or func is _MASKED_SELECT:
            self.host_reads += 1
            t = args[0]
            shape = (
                (t.numel(), t.dim()) if func is _NONZERO else (torch.broadcast_shapes(t.shape, args[1].shape).numel(),)
            )
            out = torch.empty(shape, dtype=torch.long if func is _NONZERO else t.dtype, device=t.device)
        elif func is _INDEX and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            self.host_reads += 1
            out = func(args[0], _as_if_all_selected(args[1]))
        else:
            out = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
            if self.limit is not None and self.flops > self.limit[1]:
                self._stop()
        if isinstance(out, torch.Tensor):
            self._info(out, TEMPORARIES)
        elif isinstance(out, (tuple, list)):
            for item in out:
                if isinstance(item, torch.Tensor):
                    self._info(item, TEMPORARIES)
                elif isinstance(item, (tuple, list)):  # foreach ops return lists
                    for inner in item:
                        if isinstance(inner, torch.Tensor):
                            self._info(inner, TEMPORARIES)
        return out


# -- CUDA's autocast policy on a CPU trace -------------------------------------------------------------
def _cuda_float32_functions() -> frozenset:
    """The Python entry points of the ops CUDA autocast runs in float32 (torch's autocast_mode.cpp:
    its fp32 list and the ops it gives dtype=float32) that CPU autocast leaves in bfloat16."""
    import torch.nn.functional as F

    T = torch.Tensor
    return frozenset(
        [
            torch.softmax, T.softmax, F.softmax, torch.log_softmax, T.log_softmax, F.log_softmax,
            torch.exp, T.exp, torch.expm1, T.expm1, torch.log, T.log, torch.log1p, T.log1p, torch.log2, T.log2,
            torch.log10, T.log10, torch.pow, T.pow, T.__pow__, torch.rsqrt, T.rsqrt, torch.reciprocal, T.reciprocal,
            torch.layer_norm, F.layer_norm, torch.group_norm, F.group_norm, F.normalize,
            torch.norm, T.norm, torch.linalg.vector_norm, torch.linalg.matrix_norm,
            torch.sum, T.sum, torch.cumsum, T.cumsum, torch.prod, T.prod, torch.cumprod, T.cumprod,
            torch.logsumexp, T.logsumexp, F.softplus, F.cosine_similarity,
            F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.nll_loss, F.kl_div,
            F.binary_cross_entropy_with_logits, F.cosine_embedding_loss, F.margin_ranking_loss,
        ]
    )  # fmt: skip


class CudaAutocastPolicy(TorchFunctionMode):
    """CUDA autocast's float32 ops on top of CPU autocast, for a CPU trace of a run that will use CUDA.

    CPU and CUDA autocast cast the same matmul-family ops to the low dtype, but CUDA also runs
    softmax, log_softmax, norms, exp/log/pow, layer and group norm, sums and the losses in float32, and
    CPU autocast does not: traced with CPU autocast alone, a softmax called without a dtype would save
    its output in bfloat16 where CUDA saves float32 (and a bfloat16 copy for the next matmul: a third
    of the bytes). (This backbone's attention asks softmax for float32 itself; its adaptive layer
    norms and the trainers' losses are where the policy shows.) While CPU autocast is on, this mode
    casts those ops' 16-bit floating arguments to float32 first, as CUDA autocast does (above
    autograd, so the casts are in the graph as CUDA's are)."""

    FUNCTIONS = _cuda_float32_functions()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FUNCTIONS and torch.is_autocast_enabled("cpu"):

            def up(x):
                return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x

            args = tuple(up(a) for a in args)
            kwargs = {k: up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


# -- one traced step ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepSetup:
    """What one traced step is: the trainer (a `compat.subjects.Subject`), its config, the model's
    config and sizes, and the loop's settings that shape memory.

    Args:
        subject: the trainer class in its role (built-in or the user's SPEC).
        config: the trainer's config (its `training.*`, `optimizer.*` and `loss.*` are used).
        model_config: the model section the model is built from (real sizes).
        sizes: vocab_size, latent_dim, cluster_size (from the checkpoint).
        vocab: the vocabulary the trainer is given (mask and pad ids).
        batch_size: samples per rank and micro-batch (`training.train_batch_size`).
        seq_len: tokens per sample.
        step: the global step passed as `step=` (a trainer without it gets none).
        device: the device the fake tensors claim ("cpu" traces CPU autocast; "cuda" needs CUDA).
        round_to: allocation granularity in bytes (the CUDA caching allocator's 512; 1: exact bytes).
        cuda_policy: on a CPU trace with autocast, apply CUDA autocast's float32 ops
            (`CudaAutocastPolicy`): the run being estimated is a CUDA run.
        execution: "auto" (run for real while the step is small, else FakeTensorMode), "fake" (always
            traced) or "real" (run for real; `RealStepTooLarge` past the limits).
    """

    subject: Any
    config: DictConfig
    model_config: DictConfig
    sizes: dict
    vocab: Any
    batch_size: int
    seq_len: int
    step: int | None
    device: torch.device = torch.device("cpu")
    round_to: int = CUDA_BLOCK
    cuda_policy: bool = True
    execution: str = "auto"

    @property
    def n_blocks(self) -> int:
        return int(self.model_config.n_blocks)


@dataclass
class StepTrace:
    """One step at one depth (all values exact for that depth)."""

    depth: int
    peaks: dict[str, PhasePeak]
    flops_forward: int
    flops_backward: int
    saved: dict[str, int]
    passes: int
    host_reads: int
    params_trained: int  # parameters that received a gradient
    params_total: int
    untrained_state: dict[str, int] = field(default_factory=dict)  # AdamW state bytes of parameters without a gradient
    at_start: dict[str, dict[str, int]] = field(default_factory=dict)  # live bytes by kind as each phase began
    real: bool = False  # run for real (a small step), else traced under FakeTensorMode
    seconds: float = 0.0

    @property
    def flops(self) -> int:
        return self.flops_forward + self.flops_backward


@contextlib.contextmanager
def preserved_rng():
    """Python, NumPy and torch global RNG states as they were (building a model draws from them)."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)


def _step_draws(names, batch_size: int, seq_len: int, latent_dim: int, device) -> dict[str, torch.Tensor]:
    """Random values for the draws a trainer takes by name (fake tensors under FakeTensorMode)."""
    shapes = {"B": (batch_size,), "BD": (batch_size, latent_dim), "BS": (batch_size, seq_len)}
    out = {}
    for name in names:
        kind = DRAW_SHAPES.get(name)
        if kind is not None:
            maker = torch.randn if name.endswith("noise") else torch.rand
            out[name] = maker(shapes[kind], device=device)
    return out


def trace_step(setup: StepSetup, depth: int | None = None) -> StepTrace:
    """Traces one loop step of `setup` at `depth` blocks (default: the real depth): run for real when
    `setup.execution` allows and the step stays under `REAL_STEP_BYTES` and `REAL_STEP_FLOPS` (the
    run stops where it passes one, `RealStepTooLarge`), else under FakeTensorMode. A trainer that
    raises is a `compat.subjects.CandidateError`."""
    depth = setup.n_blocks if depth is None else depth
    if setup.execution != "fake":
        try:
            return _trace_step(setup, depth, real=True)
        except RealStepTooLarge:
            if setup.execution == "real":
                raise
    return _trace_step(setup, depth, real=False)


def _trace_step(setup: StepSetup, depth: int, real: bool) -> StepTrace:
    started = time.perf_counter()
    config = setup.config
    training, optimizer_cfg = config.training, config.optimizer
    sizes = setup.sizes
    B, S, D = setup.batch_size, setup.seq_len, int(sizes["latent_dim"])
    device = torch.device(setup.device)
    model_config = OmegaConf.merge(setup.model_config, {"n_blocks": depth})
    # The default-device context only where it is needed: it adds a Python call to every op.
    on_device = torch.device(device) if device.type != "cpu" else contextlib.nullcontext()
    if real and 4 * _parameter_bytes(model_config, sizes) > REAL_STEP_BYTES:
        raise RealStepTooLarge  # parameters, gradients and AdamW's two moments alone pass the limit
    with preserved_rng(), contextlib.nullcontext() if real else FakeTensorMode(), on_device:
        model = _model_of(model_config, sizes).train()  # the loop trains in train mode (dropout masks are saved)
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(
            params,
            lr=float(optimizer_cfg.lr),
            betas=(float(optimizer_cfg.beta1), float(optimizer_cfg.beta2)),
            eps=float(optimizer_cfg.eps),
            weight_decay=float(optimizer_cfg.weight_decay),
            foreach=True,  # torch's default on CUDA, where the run is
        )
        for p in params:  # the steady state: AdamW's moments exist (those never trained are removed below)
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainer = setup.subject.build(model, setup.vocab, dtype_from_config(config), config)
        batch = {
            "input_ids": torch.randint(0, int(sizes["vocab_size"]), (B, S)),
            "attention_mask": torch.ones(B, S, dtype=torch.long),
            "latent": torch.randn(B, 1, D),
        }
        draws = _step_draws(setup.subject.spec.draw_names, B, S, D, device)

        tracer = StepTracer(setup.round_to, limit=(REAL_STEP_BYTES, REAL_STEP_FLOPS) if real else None)
        for p in params:
            tracer.register(p, PARAMETERS)
        for buffer in list(model.buffers()) + list(getattr(trainer, "buffers", lambda: [])()):
            tracer.register(buffer, PARAMETERS)
        for state in optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":  # AdamW's step counters live on the host
                    tracer.register(value, OPTIMIZER)
        for value in list(batch.values()) + list(draws.values()):
            tracer.register(value, TEMPORARIES)
        handles = tracer.track_gradients(params) + tracer.track_passes(model)
        accumulation = int(training.get("gradient_accumulation_steps", 1) or 1)
        mixed_precision = str(training.get("mixed_precision", "no"))
        emulate = setup.cuda_policy and device.type == "cpu" and mixed_precision != "no"
        policy = CudaAutocastPolicy() if emulate else contextlib.nullcontext()
        clip = float(optimizer_cfg.get("grad_clip_norm", 0.0) or 0.0)
        try:
            with tracer, tracer.saving():
                tracer.start_phase(FORWARD)
                with autocast(mixed_precision, device), policy:
                    loss, metrics, _, _ = setup.subject.call(trainer, batch, step=setup.step, draws=draws, grad=True)
                flops_forward = tracer.flops
                tracer.start_phase(BACKWARD)
                (loss / accumulation).backward()
                flops_backward = tracer.flops - flops_forward
                tracer.start_phase(STEP)
                trained = [p for p in params if p.grad is not None]
                if trained:
                    if clip > 0:
                        norm = torch.nn.utils.clip_grad_norm_(trained, clip, foreach=True)
                    else:
                        norm = torch.linalg.vector_norm(
                            torch.stack([torch.linalg.vector_norm(p.grad) for p in trained])
                        )
                    float(norm)  # the loop logs it (a host read)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                del loss, metrics
        except BaseException:
            if tracer.over_limit:  # whatever the trainer made of the tracer's exception
                raise RealStepTooLarge from None
            raise
        finally:
            for handle in handles:
                handle.remove()
        if tracer.over_limit:  # raised inside the trainer, which went on
            raise RealStepTooLarge
        peaks = {phase: replace(peak, split=dict(peak.split)) for phase, peak in tracer.peaks.items()}
        trained_ids = {id(p) for p in trained}
        untrained_state = {
            name: sum(
                tracer.nbytes(v) for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v) and k != "step"
            )
            for name, p in model.named_parameters()
            if id(p) not in trained_ids
        }
        if accumulation > 1:  # later micro-batches run forward and backward with every gradient allocated
            grads = sum(tracer.nbytes(p) for p in trained)
            for phase in (FORWARD, BACKWARD):
                missing = grads - peaks[phase].split[GRADIENTS]
                peaks[phase].total += missing
                peaks[phase].split[GRADIENTS] += missing
        return StepTrace(
            depth=depth,
            peaks=peaks,
            flops_forward=int(flops_forward),
            flops_backward=int(flops_backward),
            saved=dict(tracer.saved),
            passes=tracer.passes,
            host_reads=tracer.host_reads,
            params_trained=sum(p.numel() for p in trained),
            params_total=sum(p.numel() for p in params),
            untrained_state=untrained_state,
            at_start={phase: dict(split) for phase, split in tracer.at_start.items()},
            real=real,
            seconds=time.perf_counter() - started,
        )


def without_state(trace: StepTrace, names) -> StepTrace:
    """`trace` with the AdamW state of the parameters `names` removed from every phase: AdamW never
    creates state for a parameter the run never trains."""
    stale = sum(trace.untrained_state.get(name, 0) for name in names)
    peaks = {}
    for phase, peak in trace.peaks.items():
        split = dict(peak.split)
        split[OPTIMIZER] -= stale
        peaks[phase] = PhasePeak(peak.total - stale, split)
    return replace(trace, peaks=peaks)


# -- a step at the real depth -------------------------------------------------------------------------
@dataclass
class StepCost:
    """One step at the model's real depth: traced there, or extrapolated from the traced depths
    (`traces`: depth -> StepTrace, each exact)."""

    label: str
    depth: int
    batch_size: int
    seq_len: int
    peaks: dict[str, PhasePeak]
    flops_forward: int
    flops_backward: int
    saved: dict[str, int]
    passes: int
    host_reads: int
    params_total: int
    traces: dict[int, StepTrace] = field(repr=False, default_factory=dict)
    seconds: float = 0.0  # wall time of its traces

    @property
    def phase(self) -> str:
        """The phase whose peak is the step's peak."""
        return max(PHASES, key=lambda phase: self.peaks[phase].total)

    @property
    def peak(self) -> int:
        return self.peaks[self.phase].total

    @property
    def split(self) -> dict[str, int]:
        return self.peaks[self.phase].split

    @property
    def flops(self) -> int:
        return self.flops_forward + self.flops_backward

    @property
    def activations(self) -> int:
        """The most bytes saved for backward live at once (at a phase's peak)."""
        return max(peak.split[ACTIVATIONS] for peak in self.peaks.values())

    @property
    def extrapolated(self) -> bool:
        return self.depth not in self.traces

    @property
    def real(self) -> bool:
        """Every trace of it was run for real (a small step)."""
        return bool(self.traces) and all(t.real for t in self.traces.values())

    def describe_split(self) -> str:
        """'params 3.3 + grads 0 + AdamW 6.6 + activations 45.1 + temporaries 6.2 GiB at the forward peak'."""
        unit = size_unit(self.peak)
        short = {PARAMETERS: "params", GRADIENTS: "grads", OPTIMIZER: "AdamW"}
        parts = [f"{short.get(c, c)} {size_text(self.split[c], unit).split()[0]}" for c in CATEGORIES]
        return f"{' + '.join(parts)} {unit} at the {self.phase} peak"


def _affine(v1: int, v2: int, d1: int, d2: int, depth: int) -> int:
    step, rest = divmod((v2 - v1) * (depth - d1), d2 - d1)
    return v1 + step + (1 if 2 * rest >= (d2 - d1) else 0)


def at_depth(label: str, setup: StepSetup, traces: dict[int, StepTrace]) -> StepCost:
    """The step at `setup`'s real depth from `traces` (that depth itself, or two depths extrapolated
    linearly: every quantity is an affine function of the number of identical blocks)."""
    depth = setup.n_blocks
    if depth in traces:
        t = traces[depth]
        peaks = {phase: PhasePeak(p.total, dict(p.split)) for phase, p in t.peaks.items()}
        values = dict(fwd=t.flops_forward, bwd=t.flops_backward, saved=dict(t.saved), passes=t.passes)
        reads, params = t.host_reads, t.params_total
    else:
        (d1, t1), (d2, t2) = sorted(traces.items())[:2]

        def lin(a, b):
            return _affine(a, b, d1, d2, depth)

        peaks = {
            phase: PhasePeak(
                lin(t1.peaks[phase].total, t2.peaks[phase].total),
                {c: lin(t1.peaks[phase].split[c], t2.peaks[phase].split[c]) for c in CATEGORIES},
            )
            for phase in PHASES
        }
        values = dict(
            fwd=lin(t1.flops_forward, t2.flops_forward),
            bwd=lin(t1.flops_backward, t2.flops_backward),
            saved={k: lin(t1.saved[k], t2.saved[k]) for k in t1.saved},
            passes=t2.passes,
        )
        reads, params = lin(t1.host_reads, t2.host_reads), lin(t1.params_total, t2.params_total)
    return StepCost(
        label,
        depth,
        setup.batch_size,
        setup.seq_len,
        peaks,
        values["fwd"],
        values["bwd"],
        values["saved"],
        values["passes"],
        reads,
        params,
        dict(traces),
    )


def depths_to_trace(n_blocks: int) -> tuple[int, ...]:
    """The real depth when it is small, else TRACED_DEPTHS (then extrapolated)."""
    return (n_blocks,) if n_blocks <= max(TRACED_DEPTHS) else TRACED_DEPTHS


def measure_steps(setups: dict[str, StepSetup], shared_state: bool = False) -> dict[str, StepCost]:
    """Each setup's step at its real depth. With `shared_state` the setups are the modes of one run
    (one optimizer): AdamW holds state for every parameter some mode trains."""
    costs = {}
    depths = sorted({d for s in setups.values() for d in depths_to_trace(s.n_blocks)})
    traces: dict[str, dict[int, StepTrace]] = {label: {} for label in setups}
    started = time.perf_counter()
    for depth in depths:
        at = {label: trace_step(s, depth) for label, s in setups.items() if depth in depths_to_trace(s.n_blocks)}
        if shared_state and at:
            never = set.intersection(*(set(t.untrained_state) for t in at.values()))
            at = {label: without_state(t, never) for label, t in at.items()}
        else:
            at = {label: without_state(t, t.untrained_state) for label, t in at.items()}
        for label, t in at.items():
            traces[label][depth] = t
    seconds = (time.perf_counter() - started) / max(len(setups), 1)
    for label, setup in setups.items():
        costs[label] = replace(at_depth(label, setup, traces[label]), seconds=seconds)
    return costs


# -- fit and cost ---------------------------------------------------------------------------------------
HEADROOM_REVIEW = 0.10  # the rule: REVIEW when a step fits with less than 10% of the memory free
ASSUMED_MFU = 0.40  # model-FLOPs utilisation assumed for GPU-hours: typical of bf16 transformer training on H100/A100


def ddp_bucket_bytes(params_total: int, round_to: int = CUDA_BLOCK) -> int:
    """Bytes of DDP's gradient buckets (float32, one copy of every gradient: the loop wraps the
    model with gradient_as_bucket_view off)."""
    return -(-4 * params_total // round_to) * round_to


def gpu_hours(flops_per_step: float, steps: int, tflops: float, mfu: float = ASSUMED_MFU) -> float:
    """Hours of one GPU for `steps` steps of `flops_per_step` at `mfu` of `tflops` TFLOP/s."""
    return flops_per_step * steps / (tflops * 1e12 * mfu) / 3600.0


def batch_candidates(batch_size: int, accumulation: int) -> list[int]:
    """Per-rank batch sizes below `batch_size` that keep the global batch (batch x accumulation) with
    an integer accumulation, largest first."""
    global_batch = batch_size * accumulation
    return [b for b in range(batch_size - 1, 0, -1) if global_batch % b == 0]


# -- the row's measurements on a CompatContext ------------------------------------------------------
def stable_modes(config: DictConfig) -> tuple[dict[str, float], str]:
    """The modes the stable config's schedule runs, each with its share of the steps, and how they
    were read from the config."""
    from latentDLM_mmdit.settings import BASE_MODES, validate_settings

    settings = validate_settings(config, "the stable config", shared=True).config
    loss_type = str(settings.loss.loss_type)
    if loss_type in BASE_MODES:
        return {loss_type: 1.0}, f"loss.loss_type {loss_type}"
    if loss_type == "sequential":
        items = list(settings.training.sequential_schedule)
        if not items:
            return {"unconditional": 1.0}, "an empty training.sequential_schedule (unconditional)"
        shares: dict[str, float] = {}
        for item in items:
            shares[str(item.type)] = shares.get(str(item.type), 0.0) + float(item.steps)
        total = sum(shares.values())
        return {m: v / total for m, v in shares.items()}, "training.sequential_schedule"
    if loss_type == "random":
        weights = dict(zip(("unconditional", "l2t", "t2l"), (float(w) for w in settings.training.mode_weights)))
        total = sum(weights.values())
        return {m: w / total for m, w in weights.items() if w > 0}, "training.mode_weights"
    return (
        {"l2t": 0.5, "t2l": 0.5},
        f"loss.loss_type {loss_type} is not a stable mode: l2t and t2l, the cycle step's base passes",
    )


def full_weight_step(config: DictConfig) -> int:
    """The first step at which every cycle weight is at its configured value (past its warmup and
    ramp)."""
    loss = config.loss
    return max(
        int(loss.get(f"{term}_warmup_steps", 0) or 0) + int(loss.get(f"{term}_ramp_steps", 0) or 0)
        for term in ("cycle_text", "cycle_latent")
    )


def cycle_weights(config: DictConfig, step: int | None) -> dict[str, float]:
    """The cycle terms' weights at `step` (None: the base weights), by the oracle's ramp."""
    from compat.oracle import ramp

    loss = config.loss
    weights = {}
    for term in ("cycle_text", "cycle_latent"):
        base = float(loss.get(f"{term}_weight", 0.0) or 0.0)
        warmup, ramp_steps = int(loss.get(f"{term}_warmup_steps", 0) or 0), int(loss.get(f"{term}_ramp_steps", 0) or 0)
        weights[term] = base if step is None else ramp(step, base, warmup, ramp_steps)
    return weights


def resources_seq_len(ctx) -> tuple[int, str]:
    """The sequence length the row measures at, and why: --seq-len, else the data files' length (what
    the loop feeds), else model.max_seq_len (the longest sample the model takes)."""
    if ctx.options.seq_len is not None:
        return ctx.seq_len, ctx.seq_len_source
    if ctx.data_samples:
        return int(ctx.data_samples[0]["input_ids"].shape[0]), "the data files' length"
    return int(ctx.cycle_config.model.max_seq_len), "model.max_seq_len; pass --seq-len for your data's length"


class RowMeasurements:
    """The resources row's traced steps on a `CompatContext`, each computed once per session and
    cached in `ctx.resources` (the planted-defect tests start each defect from an empty cache)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.cache = ctx.resources
        self.seq_len, self.seq_len_source = resources_seq_len(ctx)
        self.modes, self.modes_source = stable_modes(ctx.stable_config)
        cycle = ctx.cycle_config
        self.cycle_batch = int(cycle.training.train_batch_size)
        self.cycle_accumulation = int(cycle.training.get("gradient_accumulation_steps", 1) or 1)
        self.stable_batch = int(ctx.stable_config.training.train_batch_size)
        self.accepts_step = ctx.cycle_subject.spec.accepts_step
        self.full_step = full_weight_step(cycle) if self.accepts_step else None
        self.weights = cycle_weights(cycle, self.full_step)

    def _setup(self, subject, config: DictConfig, batch_size: int, step: int | None) -> StepSetup:
        ctx = self.ctx
        return StepSetup(
            subject,
            config,
            ctx.cycle_config.model,
            ctx.model_sizes(),
            ctx.vocab,
            batch_size,
            self.seq_len,
            step,
            ctx.device,
        )

    def _cached(self, key, compute):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    # -- cycle ------------------------------------------------------------------------------------
    def cycle(self, batch_size: int | None = None) -> StepCost:
        """The cycle step with the weights at their largest, at `batch_size` (default the config's)."""
        b = self.cycle_batch if batch_size is None else batch_size
        setup = self._setup(self.ctx.cycle_subject, self.ctx.cycle_config, b, self.full_step)
        return self._cached(("cycle", b), lambda: measure_steps({"cycle": setup})["cycle"])

    def cycle_first_step(self) -> tuple[StepTrace, dict[str, float]] | None:
        """The cycle step at step 0 and its weights, when some term is weighted 0 there and not at
        full weight (a warmup or a ramp from 0), for a trainer that takes step=; else None. Traced
        at the shallowest depth the row traces (`shallow`): which passes a step makes does not
        depend on the depth."""
        if not self.accepts_step:
            return None
        weights = cycle_weights(self.ctx.cycle_config, 0)
        if all((weights[t] > 0) == (self.weights[t] > 0) for t in weights):
            return None
        setup = self._setup(self.ctx.cycle_subject, self.ctx.cycle_config, self.cycle_batch, 0)
        return self._cached(("cycle@0",), lambda: trace_step(setup, self.shallow)), weights

    @property
    def shallow(self) -> int:
        """The shallowest depth every step of the row is traced at."""
        return depths_to_trace(int(self.ctx.cycle_config.model.n_blocks))[0]

    # -- stable -------------------------------------------------------------------------------------
    def _stable_config(self, mode: str, like_cycle: bool) -> DictConfig:
        ctx = self.ctx
        own = ctx.cycle_config.training if like_cycle else ctx.stable_config.training
        return ctx.stable_config_for(
            mode, {"training.dtype": str(own.dtype), "training.mixed_precision": str(own.mixed_precision)}
        )

    def stable(self) -> dict[str, StepCost]:
        """One step of each mode the stable schedule runs, at the stable config's own settings (one
        run: AdamW holds state for every parameter some mode trains)."""
        setups = {
            f"stable {m}": self._setup(self.ctx.stable_subject, self._stable_config(m, False), self.stable_batch, 0)
            for m in self.modes
        }
        return self._cached(("stable",), lambda: measure_steps(setups, shared_state=True))

    def counterparts(self) -> dict[str, StepCost]:
        """Stable t2l and l2t at the cycle step's batch, dtype and autocast: what each cycle pass's
        counterpart costs (the budgets). The schedule's own steps where they are the same."""
        same = (
            self.stable_batch == self.cycle_batch
            and str(self.ctx.stable_config.training.dtype) == str(self.ctx.cycle_config.training.dtype)
            and str(self.ctx.stable_config.training.mixed_precision)
            == str(self.ctx.cycle_config.training.mixed_precision)
        )
        out, missing = {}, {}
        stable = self.stable() if same else {}
        for mode in ("t2l", "l2t"):
            if f"stable {mode}" in stable:
                out[mode] = stable[f"stable {mode}"]
            else:
                missing[mode] = self._setup(
                    self.ctx.stable_subject, self._stable_config(mode, True), self.cycle_batch, 0
                )
        if missing:
            traced = self._cached(("counterparts", tuple(sorted(missing))), lambda: measure_steps(missing))
            out.update(traced)
        return out

    def seconds(self) -> float:
        """Wall seconds of every step traced for the row in this session."""
        costs = []
        for value in self.cache.values():
            costs += list(value.values()) if isinstance(value, dict) else [value]
        return sum(c.seconds for c in costs if isinstance(c, (StepCost, StepTrace)))

    def steps_with_a_term_off(self) -> int:
        """Steps at the start of the schedule where a term weighted > 0 at full weight is still 0."""
        if not self.accepts_step:
            return 0
        loss = self.ctx.cycle_config.loss
        first_on = [
            int(loss.get(f"{t}_warmup_steps", 0) or 0) + int(int(loss.get(f"{t}_ramp_steps", 0) or 0) > 0)
            for t in ("cycle_text", "cycle_latent")
            if self.weights[t] > 0
        ]
        return max(first_on, default=0)

    def worst_stable(self) -> StepCost:
        return max(self.stable().values(), key=lambda c: c.peak)

    def stable_flops_per_step(self) -> float:
        """FLOPs of a stable step averaged over its schedule (each mode by its share of the steps)."""
        stable = self.stable()
        return sum(share * stable[f"stable {m}"].flops for m, share in self.modes.items())
