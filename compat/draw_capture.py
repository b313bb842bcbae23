"""Identical random numbers for trainers that do not take injected draws.

A trainer with a `draws=` keyword (and `DRAW_NAMES`) is given its draws by name. Any other trainer
draws from torch's random functions (`torch.randn_like`, `torch.rand`, `Tensor.uniform_`, ...), the
Python `random` module or `numpy.random`. `DrawCapture` intercepts those calls while a step runs
(a `torch.overrides.TorchFunctionMode`, plus the module-level functions of `random` and
`numpy.random`) and serves them from the harness's own seeded generators, recording every torch
draw in call order. Standard normal and uniform draws can be served prepared values, keyed by kind
and size (`served={("normal", B*D): [noise, noise2]}`): the k-th standard normal draw of B*D
values gets the k-th prepared tensor, whatever other draws come between, so a trainer that takes no
injected draws still sees the numbers the harness gives the other trainer. `DrawCapture(replay=draws)` serves a recorded sequence again, optionally the
slice of one sample (`sample=i`), so that a batch and its samples run one at a time see the same
numbers. The draws a step made are then attributed to what they were for by observing the model
passes (see `compat.observe`).
"""

from __future__ import annotations

import contextlib
import random as python_random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

# torch functions that draw random numbers, and how to call each with the harness's generator.
_FACTORIES = {torch.rand, torch.randn, torch.randint, torch.randperm}
_LIKE = {torch.rand_like, torch.randn_like, torch.randint_like}
_SAMPLERS = {torch.multinomial, torch.bernoulli, torch.normal, torch.poisson}
_IN_PLACE = {
    torch.Tensor.uniform_,
    torch.Tensor.normal_,
    torch.Tensor.random_,
    torch.Tensor.bernoulli_,
    torch.Tensor.exponential_,
    torch.Tensor.geometric_,
    torch.Tensor.log_normal_,
    torch.Tensor.cauchy_,
}
RANDOM_FUNCTIONS = _FACTORIES | _LIKE | _SAMPLERS | _IN_PLACE
PYTHON_RANDOM_FUNCTIONS = (
    "random",
    "uniform",
    "gauss",
    "normalvariate",
    "randint",
    "randrange",
    "choice",
    "choices",
    "shuffle",
    "sample",
    "betavariate",
    "expovariate",
    "triangular",
)
NUMPY_RANDOM_FUNCTIONS = (
    "rand",
    "randn",
    "random",
    "random_sample",
    "uniform",
    "normal",
    "randint",
    "choice",
    "permutation",
    "shuffle",
    "standard_normal",
)


class DrawReplayError(RuntimeError):
    """A step asked for other random numbers than the recorded step did (another function, shape or
    count): its draws depend on something besides the inputs."""


@dataclass
class Draw:
    """One torch draw: which function, the result's shape and dtype, the value (CPU)."""

    index: int
    function: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    value: torch.Tensor

    def describe(self) -> str:
        return f"#{self.index} {self.function}{list(self.shape)}"


def _name(func) -> str:
    name = getattr(func, "__name__", str(func))
    return f"Tensor.{name}" if func in _IN_PLACE else name


class DrawCapture(TorchFunctionMode):
    """Serves every random draw of a step from seeded generators and records the torch ones.

    Args:
        seed: seeds the torch, Python and NumPy streams served while the capture is active.
        replay: recorded draws to serve again, in call order, instead of new ones.
        sample: with `replay`, serve row `sample` of each recorded draw whose first axis is the
            batch (the step then runs one sample of the recorded batch).
        served: ("normal" | "uniform", number of values) -> tensors served in order to standard
            draws of that size (reshaped to the shape asked for; in-place uniform_(a, b) and
            normal_(mean, std) get a + (b - a) u and mean + std n); other draws come from the
            seeded generator.
    """

    def __init__(
        self,
        seed: int,
        replay: list[Draw] | None = None,
        sample: int | None = None,
        served: dict[tuple[str, int], list[torch.Tensor]] | None = None,
    ):
        super().__init__()
        self.generator = torch.Generator().manual_seed(int(seed))
        self.python = python_random.Random(int(seed))
        self.numpy = np.random.RandomState(int(seed) % (2**32))
        self.replay = replay
        self.sample = sample
        # ("normal" | "uniform", numel) -> values served, in order, to standard draws of that size
        self.served = {key: list(values) for key, values in (served or {}).items()}
        self.draws: list[Draw] = []
        self.python_calls: list[str] = []
        self.numpy_calls: list[str] = []
        self._patches = contextlib.ExitStack()

    # -- torch ---------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func not in RANDOM_FUNCTIONS:
            return func(*args, **kwargs)
        if self.replay is not None:
            return self._serve_recorded(func, args, kwargs)
        result = self._draw(func, args, kwargs)
        self.draws.append(
            Draw(len(self.draws), _name(func), tuple(result.shape), result.dtype, result.detach().to("cpu", copy=True))
        )
        return result

    def _draw(self, func, args, kwargs):
        """A served value for a standard normal / uniform draw of a size the harness prepared;
        otherwise `func` with the harness's CPU generator (the result moved to the caller's device)."""
        kwargs.pop("generator", None)
        served = self._served(func, args, kwargs)
        if served is not None:
            return served
        if func in _IN_PLACE:
            target = args[0]
            scratch = torch.empty(target.shape, dtype=target.dtype)
            func(scratch, *args[1:], generator=self.generator, **kwargs)
            with torch.no_grad():
                target.copy_(scratch.to(target.device))
            return target
        device = kwargs.pop("device", None)
        if func in _LIKE:
            like = args[0]
            device = device or like.device
            value = func(like.to("cpu"), *args[1:], generator=self.generator, **kwargs)
        elif func in _SAMPLERS:
            tensors = [a.to("cpu") if torch.is_tensor(a) else a for a in args]
            device = device or next((a.device for a in args if torch.is_tensor(a)), None)
            value = func(*tensors, generator=self.generator, **kwargs)
        else:
            value = func(*args, generator=self.generator, **kwargs)
        return value.to(device) if device is not None else value

    def _served(self, func, args, kwargs):
        kind = _standard_kind(func, args, kwargs)
        shape = _wanted_shape(func, args, kwargs)
        if kind is None or shape is None:
            return None
        queue = self.served.get((kind, int(torch.Size(shape).numel())))
        if not queue:
            return None
        value = queue.pop(0).reshape(shape)
        if func in _IN_PLACE:
            low, high = _in_place_bounds(func, args, kwargs)
            with torch.no_grad():
                args[0].copy_((low + (high - low) * value).to(args[0].device, args[0].dtype))
            return args[0]
        like = args[0] if func in _LIKE else None
        dtype = kwargs.get("dtype") or (like.dtype if like is not None else torch.get_default_dtype())
        return value.to(device=_device_of(func, args, kwargs), dtype=dtype)

    def _serve_recorded(self, func, args, kwargs):
        position = len(self.draws)
        if position >= len(self.replay):
            raise DrawReplayError(
                f"the step drew more random numbers than the recorded step ({len(self.replay)} "
                f"draw(s)); extra call {_name(func)}"
            )
        recorded = self.replay[position]
        value = recorded.value
        if self.sample is not None and value.dim() > 0:
            value = value[self.sample : self.sample + 1]
        wanted = _wanted_shape(func, args, kwargs)
        if recorded.function != _name(func) or (wanted is not None and tuple(wanted) != tuple(value.shape)):
            raise DrawReplayError(
                f"draw {position}: the step called {_name(func)}{list(wanted or [])}, the recorded "
                f"step {recorded.describe()}{' (sample ' + str(self.sample) + ')' if self.sample is not None else ''}"
            )
        self.draws.append(Draw(position, recorded.function, tuple(value.shape), value.dtype, value))
        device = _device_of(func, args, kwargs)
        if func in _IN_PLACE:
            with torch.no_grad():
                args[0].copy_(value.to(args[0].device))
            return args[0]
        dtype = kwargs.get("dtype") or (args[0].dtype if func in _LIKE else value.dtype)
        return value.to(device=device, dtype=dtype)

    # -- Python random and numpy.random ---------------------------------------------------------
    def __enter__(self):
        for name in PYTHON_RANDOM_FUNCTIONS:
            self._patches.enter_context(
                _patched(python_random, name, self._recorded(getattr(self.python, name), self.python_calls, name))
            )
        for name in NUMPY_RANDOM_FUNCTIONS:
            self._patches.enter_context(
                _patched(np.random, name, self._recorded(getattr(self.numpy, name), self.numpy_calls, name))
            )
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()

    @staticmethod
    def _recorded(fn: Callable, calls: list[str], name: str) -> Callable:
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    # -- reporting ------------------------------------------------------------------------------
    @property
    def used_global_rng(self) -> bool:
        return bool(self.draws or self.python_calls or self.numpy_calls)

    def summary(self) -> str:
        parts = [
            f"{len(self.draws)} torch draw(s)"
            + (f" ({', '.join(d.describe() for d in self.draws[:6])})" if self.draws else "")
        ]
        if self.python_calls:
            parts.append(f"{len(self.python_calls)} Python random call(s)")
        if self.numpy_calls:
            parts.append(f"{len(self.numpy_calls)} numpy.random call(s)")
        return "; ".join(parts)


@contextlib.contextmanager
def _patched(module, name: str, replacement):
    original = getattr(module, name, None)
    if original is None:
        yield
        return
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def _wanted_shape(func, args, kwargs) -> tuple[int, ...] | None:
    """The shape the call asks for, where the arguments say it (else None: not checked)."""
    if func in _LIKE or func in _IN_PLACE:
        return tuple(args[0].shape)
    if func in (torch.rand, torch.randn):
        size = kwargs.get("size", args)
        if not size:
            return None
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = size[0]
        return tuple(int(s) for s in size)
    return None


_NORMAL = {torch.randn, torch.randn_like, torch.Tensor.normal_}
_UNIFORM = {torch.rand, torch.rand_like, torch.Tensor.uniform_}


def _standard_kind(func, args, kwargs) -> str | None:
    """ "normal" / "uniform" for draws of N(0,1) / U[0,1) (in-place ones with any bounds), else None."""
    if func in _NORMAL:
        return "normal"
    if func in _UNIFORM:
        return "uniform"
    return None


def _in_place_bounds(func, args, kwargs) -> tuple[float, float]:
    """(a, b) such that the in-place draw is a + (b - a) * standard draw: uniform_(from, to), normal_(mean, std)."""
    if func is torch.Tensor.uniform_:
        low = kwargs.get("from", args[1] if len(args) > 1 else 0.0)
        high = kwargs.get("to", args[2] if len(args) > 2 else 1.0)
        return float(low), float(high)
    mean = float(kwargs.get("mean", args[1] if len(args) > 1 else 0.0))
    std = float(kwargs.get("std", args[2] if len(args) > 2 else 1.0))
    return mean, mean + std


def _device_of(func, args, kwargs) -> Any:
    if kwargs.get("device") is not None:
        return kwargs["device"]
    for a in args:
        if torch.is_tensor(a):
            return a.device
    return "cpu"
