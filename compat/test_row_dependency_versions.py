"""Row: dependency versions.

A checkpoint that loads strictly is no proof of equal outputs: hyper-connections changed its forward
between 0.3.9 and 0.4.11 without changing the state-dict layout (outputs differ by up to 1.68), and
mmdit 0.2.x / 0.3.x differ in layout. So the versions of mmdit, hyper-connections and x-transformers
the checkpoint was written with must equal the installed ones. Checked:

- the versions recorded in the checkpoint's metadata against `checkpoints.installed_versions()`:
  a difference in mmdit, hyper-connections or x-transformers fails the row; a torch difference is a
  measured risk (review); a checkpoint that records nothing (upstream `.pt`) is reported as 'not
  recorded' with review, never passed silently; the library's own comparison
  (`checkpoints.compare_versions`, which the loader uses to warn) must agree with this one;
- the installed versions against the project's pins, read from the installed distribution's
  requirements (`importlib.metadata.requires('mmdit-compat')`, else pyproject.toml), so the check
  follows the pins: mmdit, hyper-connections and x-transformers must be pinned exactly and
  installed at the pin; torch must be inside its range.
"""

from __future__ import annotations

from importlib import metadata as importlib_metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from compat.harness import row_runner, row_test
from compat.outcomes import cannot_check, expect
from latentDLM_mmdit import checkpoints

pytestmark = pytest.mark.compat_row("dependency_versions")

DISTRIBUTION = "mmdit-compat"
EXACT = ("mmdit", "hyper-connections", "x-transformers")  # change outputs: must match exactly
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def recorded_versions(ctx) -> dict[str, str] | None:
    """Versions recorded in the checkpoint under test (None when it records none), from the metadata
    read when the gate opened it."""
    versions = ctx.checkpoint_metadata.get("versions")
    return {str(k): str(v) for k, v in versions.items()} if isinstance(versions, dict) else None


def project_requirements() -> tuple[list[Requirement], str]:
    """The project's runtime requirements and where they were read."""
    try:
        raw = importlib_metadata.requires(DISTRIBUTION) or []
        where = f"installed {DISTRIBUTION} metadata"
    except importlib_metadata.PackageNotFoundError:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            cannot_check(f"{DISTRIBUTION} is not installed and this Python cannot read {PYPROJECT}")

        raw = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
        where = str(PYPROJECT)
    reqs = [Requirement(r) for r in raw]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})], where


def check_recorded_vs_installed(ctx, measure):
    installed = checkpoints.installed_versions()
    for name in checkpoints.TRACKED_PACKAGES:
        measure(f"installed_{name}", installed[name])
    recorded = recorded_versions(ctx)
    if recorded is None:
        measure(
            "recorded_versions",
            "the checkpoint records no library versions (upstream's .pt files do not), so a changed mmdit / "
            "hyper-connections cannot be detected: train the cycle run with the pinned versions and keep its "
            "checkpoints in this project's format, which records them",
            review=True,
        )
        return
    differing = {}
    for name in checkpoints.TRACKED_PACKAGES:
        if name not in recorded:
            measure(
                f"recorded_{name}",
                f"{name} is not recorded in the checkpoint: a change of it cannot be seen",
                review=True,
            )
            continue
        measure(f"recorded_{name}", recorded[name])
        if recorded[name] != installed[name]:
            if name in EXACT:
                differing[name] = (recorded[name], installed[name])
            else:
                measure(
                    f"{name}_differs",
                    f"the checkpoint was written with {name} {recorded[name]}, {installed[name]} is installed: "
                    "re-check the outputs or install the recorded version",
                    review=True,
                )
    library = checkpoints.compare_versions(recorded)
    expect(
        library == differing,
        f"the checkpoint loader's version check (compare_versions) reports {library or 'no difference'} where the "
        f"recorded and installed versions differ by {differing or 'nothing'}, so it would warn wrongly",
        "compare every tracked package's recorded version with the installed one",
    )
    expect(
        not differing,
        "the checkpoint was written with "
        + ", ".join(f"{k} {v[0]}" for k, v in differing.items())
        + " but "
        + ", ".join(f"{k} {v[1]}" for k, v in differing.items())
        + " is installed, and outputs can change even when the weights load (hyper-connections changed its "
        "forward without changing the layout)",
        "install the recorded versions (" + ", ".join(f"{k}=={v[0]}" for k, v in differing.items()) + ")",
    )


def check_installed_match_pins(ctx, measure):
    requirements, where = project_requirements()
    by_name = {canonicalize_name(r.name): r for r in requirements}
    installed = checkpoints.installed_versions()
    for name in EXACT:
        req = by_name.get(canonicalize_name(name))
        expect(req is not None, f"{where} does not require {name}", f"pin {name} exactly (==)")
        pins = [s.version for s in req.specifier if s.operator == "=="]
        expect(
            len(pins) == 1 and len(req.specifier) == 1,
            f"{where} requires {req}, not an exact pin, and {name} changes outputs between versions",
            f"pin it with == ({name}=={installed[name]})",
        )
        measure(f"pin_{name}", pins[0])
        expect(
            installed[name] == pins[0],
            f"installed {name} {installed[name]} differs from the pin {name}=={pins[0]} ({where}), so outputs can "
            "differ from the recorded fixtures and checkpoints",
            f"pip install {name}=={pins[0]}",
        )
    torch_req = by_name.get("torch")
    if torch_req is not None:
        measure("torch_range", str(torch_req.specifier))
        expect(
            torch_req.specifier.contains(Version(installed["torch"]), prereleases=True),
            f"installed torch {installed['torch']} is outside the supported range {torch_req.specifier} ({where})",
            f"install a torch in {torch_req.specifier}",
        )


CHECKS = {
    "recorded_vs_installed": check_recorded_vs_installed,
    "installed_match_pins": check_installed_match_pins,
}


run_row = row_runner(CHECKS)
test_dependency_versions = row_test(CHECKS)
