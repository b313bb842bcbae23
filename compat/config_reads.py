"""Which config keys a trainer reads, observed: a key is given to the trainer as an interpolation of a
resolver that records each time it is resolved, and returns the key's value.

A user's trainer is judged by what its own config and upstream's protocol promise. A setting only
this project has (e.g. `loss.on_nonfinite`) applies to a trainer that reads it (this project's
trainers validate every key, so they do); a trainer that never looks at it (upstream's) is not judged
by it, and the row says so. Reading is what a trainer does with its config: attribute or item access,
`.get`, `OmegaConf.select`, or resolving the whole config (`to_container(resolve=True)`). Only reads
made while the trainer's own code runs count (`trainer_running`, entered by `compat.subjects` around
the trainer's constructor and step): the harness reading the same config (its dtype) is not the trainer.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

RESOLVER = "compat_read"
_WATCHED: dict[str, tuple["ReadLog", str, Any]] = {}  # token -> (log, key, value)
_TOKENS = itertools.count()
_TRAINER_RUNNING = contextvars.ContextVar("compat_trainer_running", default=False)


@contextlib.contextmanager
def trainer_running():
    """Marks the trainer's own code running: reads of watched keys in here are the trainer's."""
    token = _TRAINER_RUNNING.set(True)
    try:
        yield
    finally:
        _TRAINER_RUNNING.reset(token)


def _resolve(token: str) -> Any:
    log, key, value = _WATCHED[token]
    if _TRAINER_RUNNING.get():
        log.read.add(key)
    return value


@dataclass
class ReadLog:
    """The watched keys (dotted) and those read so far."""

    watched: tuple[str, ...]
    read: set[str] = field(default_factory=set)

    def was_read(self, key: str) -> bool:
        return key in self.read


def watching_reads(config: DictConfig, keys: tuple[str, ...]) -> tuple[DictConfig, ReadLog]:
    """A copy of `config` (only read) whose `keys` hold the same values behind a recording resolver,
    and the log their reads go to.

    Args:
        config: the config the trainer would get.
        keys: dotted keys to watch; each must hold a scalar (str, int, float, bool).
    """
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _resolve)
    watched = OmegaConf.create(OmegaConf.to_container(config, resolve=True))
    log = ReadLog(tuple(keys))
    for key in keys:
        value = OmegaConf.select(watched, key, throw_on_missing=True)
        if not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"watching_reads: {key} holds {type(value).__name__}, not a scalar")
        token = f"t{next(_TOKENS)}"
        _WATCHED[token] = (log, key, value)
        OmegaConf.update(watched, key, f"${{{RESOLVER}:{token}}}", merge=False)
    return watched, log
