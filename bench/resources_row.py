"""The resources row alone, as `python -m bench --only resources` measures it: the gate's inputs
are read (configs, the checkpoint's names and shapes, never its weights) and the row's checks run
in this process, so its wall time and peak RSS are the row's own.

    python -m bench.resources_row --checkpoint CKPT --stable-config YAML --cycle-config YAML \\
        [--gpu-memory 80GiB] [--gpu-tflops 989] [--seq-len N]

Prints each check's outcome and measured values, and a last line `@@resources=<json>`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pytest

from compat.options import OPTIONS, CompatOptions


def run_row(options: CompatOptions) -> dict:
    """{check: (outcome, message)} and the measured values of the resources row on `options`."""
    from compat.harness import CompatContext
    from compat.test_row_resources import CHECKS

    started = time.perf_counter()
    ctx = CompatContext.create(options, Path(tempfile.mkdtemp(prefix="resources-row-")), load_model=False)
    setup = time.perf_counter() - started
    measured: list[tuple[str, str]] = []
    outcomes: dict[str, tuple[str, str]] = {}
    for name, check in CHECKS.items():
        try:
            check(ctx, lambda key, value, review=False: measured.append((key, str(value))))
        except pytest.skip.Exception as exc:
            outcomes[name] = ("skipped", str(exc))
        except AssertionError as exc:
            outcomes[name] = ("failed", str(exc).splitlines()[0])
        else:
            outcomes[name] = ("passed", "")
    return {
        "outcomes": outcomes,
        "measured": measured,
        "setup_seconds": setup,
        "row_seconds": time.perf_counter() - started - setup,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resources_row", description=__doc__.split("\n\n")[0])
    for option in OPTIONS:
        parser.add_argument(f"--{option.name}", type=option.type, default=option.default, metavar=option.metavar)
    args = parser.parse_args(argv)
    result = run_row(CompatOptions(**{o.dest: getattr(args, o.dest) for o in OPTIONS}))
    for name, (outcome, message) in result["outcomes"].items():
        print(f"{name}: {outcome} {message}")
    for key, value in result["measured"]:
        print(f"  {key} = {value}")
    print("@@resources=" + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
