"""Unit-test configuration. The tiny models, vocabulary, batches and draws live in
`tests/builders.py` as plain functions (`from tests.builders import tiny_model, ...`): tests call
them with their own seeds and sizes, which fixtures would hide.

`tests` is imported as a namespace package from the repository root; a distribution that installs
a top-level package named `tests` would shadow it, and every test file would then import the wrong
builders. That is refused here, at collection, with what to do."""

from __future__ import annotations

from pathlib import Path

from tests import builders

if Path(builders.__file__).resolve().parent != Path(__file__).resolve().parent:
    raise ImportError(
        f"`tests.builders` resolves to {builders.__file__}, not to {Path(__file__).parent}: an installed "
        "package named `tests` shadows this folder; uninstall it, or run pytest from the repository root"
    )
