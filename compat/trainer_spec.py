"""Which trainer class the gate judges, given as a SPEC, and what it supports.

    package.module:Class       imported as installed
    path/to/file.py:Class      a file of the user's repository: the folder above its package chain
                               (the repository root, as the user's code imports from it) and the
                               file's own folder (sibling modules) are added to the END of the
                               import path, so this project's modules of the same names win

The protocol (`compat.protocol.CompatTrainer`) is upstream's: the constructor
`(model, tokenizer, text_noise_schedule, dtype, config)` and `forward(batch) -> (loss, metrics)`.
What a class supports beyond that is found by inspecting it, never by its name: a `step=` keyword,
a `draws=` keyword with a `DRAW_NAMES` tuple.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from compat.outcomes import GateInputError


@dataclass(frozen=True)
class TrainerSpec:
    """A trainer class and what the harness found out about it."""

    spec: str
    cls: type
    source_file: Path | None
    commit: str | None
    accepts_step: bool
    accepts_draws: bool
    draw_names: tuple[str, ...]

    @classmethod
    def of(cls, trainer_cls: type, spec: str | None = None) -> "TrainerSpec":
        """Inspects a class (built-in or loaded)."""
        try:
            parameters = inspect.signature(trainer_cls.forward).parameters
        except (TypeError, ValueError, AttributeError):
            parameters = {}
        names = set(parameters)
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        draw_names = tuple(getattr(trainer_cls, "DRAW_NAMES", ()) or ())
        try:
            source = Path(inspect.getsourcefile(trainer_cls) or "").resolve()
        except TypeError:
            source = None
        return cls(
            spec or f"{trainer_cls.__module__}:{trainer_cls.__qualname__}",
            trainer_cls,
            source if source and source.is_file() else None,
            _git_commit(source),
            "step" in names or var_kw,
            ("draws" in names or var_kw) and bool(draw_names),
            draw_names,
        )

    @classmethod
    def load(cls, spec: str, option: str = "--cycle-trainer") -> "TrainerSpec":
        """Imports the class a SPEC names; GateInputError when it cannot (the message says why)."""
        if spec.count(":") != 1 or not all(spec.split(":")):
            raise GateInputError(
                f"{option} {spec!r} is not a SPEC", "write package.module:Class or path/to/file.py:Class"
            )
        target, name = spec.split(":")
        try:
            module = _import_file(Path(target)) if target.endswith(".py") else importlib.import_module(target)
        except GateInputError:
            raise
        except Exception as exc:  # the user's module failed to import: say how, not a traceback
            raise GateInputError(
                f"{option} {spec}: importing {target} failed with {type(exc).__name__}: {exc}",
                "fix the import (run `python -c 'import ...'` in your repository)",
            ) from None
        trainer_cls = getattr(module, name, None)
        if not inspect.isclass(trainer_cls):
            found = sorted(n for n, v in vars(module).items() if inspect.isclass(v) and v.__module__ == module.__name__)
            raise GateInputError(
                f"{option} {spec}: {target} has no class {name!r} (classes there: {', '.join(found) or 'none'})",
                "name the trainer class after the colon",
            )
        if not callable(getattr(trainer_cls, "forward", None)) and not callable(trainer_cls):
            raise GateInputError(
                f"{option} {spec}: {name} has no forward(batch) method",
                "a trainer must implement forward(batch) -> (loss, metrics)",
            )
        return cls.of(trainer_cls, spec)

    def describe(self) -> str:
        where = f" ({self.source_file}" + (f" @ {self.commit}" if self.commit else "") + ")" if self.source_file else ""
        extras = [
            "step=" if self.accepts_step else "no step=",
            f"draws= {list(self.draw_names)}" if self.accepts_draws else "no draws= (global RNG captured)",
        ]
        return f"{self.cls.__module__}.{self.cls.__qualname__}{where}; {', '.join(extras)}"


def _import_file(path: Path):
    """Imports a user's file as its repository would: a module of its package chain, the
    repository root and the file's folder appended to sys.path."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise GateInputError(f"trainer file {path} does not exist", "check the path before the colon")
    package_root = path.parent
    parts = [path.stem]
    while (package_root / "__init__.py").is_file():
        parts.insert(0, package_root.name)
        package_root = package_root.parent
    folders = [package_root, path.parent]
    for folder in map(str, folders):
        if folder not in sys.path:
            sys.path.append(folder)
    module_name = ".".join(parts)
    existing = sys.modules.get(module_name)
    if existing is not None and Path(getattr(existing, "__file__", "") or "").resolve() == path:
        return existing
    with _own_siblings(folders):
        if existing is not None or len(parts) == 1 and module_name in sys.builtin_module_names:
            # A module of that name is already loaded from elsewhere (e.g. this project's own): load the
            # user's file under a private name instead of shadowing it.
            module_name = f"compat_candidate_{abs(hash(str(path)))}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(module_name)


@contextlib.contextmanager
def _own_siblings(folders: list[Path]):
    """While a user's file is imported, its `import helpers` finds the helpers.py beside it, even
    when another trainer's helpers.py (or any module of that name) was imported before: the folders
    go first on sys.path, cached modules they would shadow step aside, and both are put back after
    (the user's module keeps the objects it bound)."""
    names = {f.stem for folder in folders for f in folder.glob("*.py") if f.stem.isidentifier()}
    stepped_aside = {}
    for name in names:
        cached = sys.modules.get(name)
        if cached is not None and Path(getattr(cached, "__file__", "") or "").resolve().parent not in folders:
            stepped_aside[name] = sys.modules.pop(name)
    saved_path = list(sys.path)
    sys.path[:0] = [str(f) for f in folders]
    try:
        yield
    finally:
        sys.path[:] = saved_path
        sys.modules.update(stepped_aside)


def _git_commit(path: Path | None) -> str | None:
    if path is None or not path.exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(path.parent), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
