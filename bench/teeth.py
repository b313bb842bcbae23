"""Teeth: the compat suite's mutation score, measured with mutmut over mutants nobody chose.

    python -m bench --only teeth                  # every file of [tool.mutmut] only_mutate
    python -m bench --only teeth --teeth-file latentDLM_mmdit/losses.py   # one file (repeatable)
    python -m bench --small --only teeth          # a smoke run: 3 mutants of losses.py
    python -m bench --only teeth --teeth-sample 150   # 150 mutants drawn at random (seeded) from all

A sampled run (`--teeth-sample N`, `--teeth-seed S`) draws N of the mutants of the chosen files
uniformly without replacement, with a fixed seed (the same sample every time for the same sources),
runs only those, and states the score with its 95% Wilson interval: an estimate of the full score
whose error is known, for a machine where the full run (hours) does not fit.

mutmut (pinned in the `test` extra) mutates the files listed in pyproject.toml's [tool.mutmut]
`only_mutate` and runs, for each mutant, only the compat tests that call the mutated function (its
own per-function map, recorded once), with `-x -q -p no:randomly` and a wall limit per mutant. It
runs in a copy of the sources (the workdir), never in the source tree, and records each verdict as
it goes: an interrupted run resumes where it stopped. A line-coverage run of the same tests (once,
coverage.py) tells a survivor whose mutated line never executed ("no coverage") from a gap.

Verdicts: killed, survived, equivalent (a survivor listed in bench/teeth_equivalent.toml, keyed by
file + function + the mutated source text, never by line number), timeout (the mutant ran past its
wall limit: counted as not killed), no coverage (no compat test calls the function, or the mutated
line never ran), error (any other exit: counted as not killed), not run (the run was interrupted).

    score = killed / (total - equivalent - no coverage - not run)        target >= 0.90
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from bench.results import line

REPO = Path(__file__).resolve().parents[1]
EQUIVALENT_FILE = REPO / "bench" / "teeth_equivalent.toml"
TARGET = 0.90
# What is mutated: "trainer" (the trainers, losses, diffusion and masking code; [tool.mutmut]) or
# "gate" (the gate's own code: [tool.mutmut] overlaid with [tool.teeth.gate], its own workdir).
TARGETS = ("trainer", "gate")
# --small: 3 mutants of one function per target, with a test selection that runs in seconds.
SMALL = {
    "trainer": (
        "latentDLM_mmdit/losses.py",
        [f"latentDLM_mmdit.losses.x_normalized_latent_mse__mutmut_{i}" for i in (1, 2, 3)],
        None,  # the target's own selection (pytest compat/)
    ),
    "gate": (
        "compat/gate.py",
        [f"compat.gate.x_exit_code__mutmut_{i}" for i in (1, 2, 3)],
        ["tests/test_gate.py", "-m", "not slow"],
    ),
}
# Keys of a target's table that this runner uses and does not pass on to mutmut.
RUNNER_KEYS = ("also_link",)
EQUIVALENT_KEYS = ("file", "function", "before", "after", "reason")
# Keys of [tool.mutmut] this runner needs; any other key is passed on to mutmut as it is.
REQUIRED_KEYS = ("source_paths", "only_mutate", "pytest_add_cli_args_test_selection")
TIMEOUT_KEYS = ("timeout_multiplier", "timeout_constant")

# mutmut 3.8's exit codes per mutant (mutmut/stats.py status_by_exit_code), grouped into ours.
KILLED_CODES = {1, 3}
SURVIVED_CODES = {0}
NO_TESTS_CODES = {5, 33}
TIMEOUT_CODES = {36, 24, -24, 152, 255}


class TeethError(Exception):
    """A problem with the teeth setup (config, equivalent list, workdir) that the user must fix."""


@dataclass(frozen=True)
class Equivalent:
    """A reviewed survivor that cannot change behaviour.

    file: path of the mutated file, relative to the project root.
    function: "function" or "Class.method", as mutmut names the mutated function.
    before / after: the mutated source line(s) before and after the mutation, stripped.
    reason: one line: why no observable behaviour changes.
    """

    file: str
    function: str
    before: str
    after: str
    reason: str

    def key(self) -> tuple[str, str, str, str]:
        return self.file, self.function, self.before, self.after


@dataclass
class Mutant:
    """One mutant and its verdict.

    name: mutmut's key, e.g. latentDLM_mmdit.losses.x_masked_text_ce__mutmut_3.
    file: the mutated file, relative to the project root; function: "function" or "Class.method".
    line: line of the mutated source in `file` (0 when not looked up: only survivors are).
    before / after: the mutated source text (survivors only).
    status: killed, survived, equivalent, timeout, no coverage, error or not run.
    exit_code: mutmut's recorded exit code (None when not run).
    """

    name: str
    file: str
    function: str
    status: str
    exit_code: int | None
    line: int = 0
    before: str = ""
    after: str = ""
    reason: str = ""


# -- configuration -----------------------------------------------------------------------------------
def read_mutmut_config(project: Path, target: str = "trainer") -> dict:
    """The [tool.mutmut] table of `project`/pyproject.toml (for `target` "gate", overlaid with
    [tool.teeth.gate]), checked for the keys this runner needs."""
    if target not in TARGETS:
        raise TeethError(f"unknown teeth target {target!r}; valid: {', '.join(TARGETS)}")
    pyproject = project / "pyproject.toml"
    try:
        tool = tomllib.loads(pyproject.read_text())["tool"]
        table = dict(tool["mutmut"])
    except FileNotFoundError:
        raise TeethError(f"{pyproject} does not exist: teeth reads its [tool.mutmut] table") from None
    except KeyError:
        raise TeethError(
            f"{pyproject} has no [tool.mutmut] table: add one (see README, 'Teeth: mutation score')"
        ) from None
    if target != "trainer":
        overlay = tool.get("teeth", {}).get(target)
        if not overlay:
            raise TeethError(f"{pyproject} has no [tool.teeth.{target}] table: add one (see README)")
        table.update(overlay)
    missing = [k for k in REQUIRED_KEYS if not table.get(k)]
    if missing:
        raise TeethError(f"{pyproject} [tool.mutmut] lacks {', '.join(missing)}: list them (see README)")
    for path in list(table["source_paths"]) + list(table.get("also_copy", [])):
        if not (project / path).exists():
            raise TeethError(f"{pyproject} [tool.mutmut] names {path!r}, which does not exist under {project}")
    for path in table["only_mutate"]:
        if not (project / path).is_file():
            raise TeethError(
                f"{pyproject} [tool.mutmut] only_mutate names {path!r}, which is not a file under "
                f"{project} (give file paths, not globs)"
            )
    return table


def load_equivalents(path: Path) -> list[Equivalent]:
    """The reviewed equivalent mutants of `path` (a TOML file of [[equivalent]] tables)."""
    if not path.is_file():
        return []
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise TeethError(f"{path} is not valid TOML ({error}): fix the file") from None
    unknown = set(data) - {"equivalent"}
    if unknown:
        raise TeethError(f"{path}: unknown top-level keys {sorted(unknown)}; only [[equivalent]] tables belong there")
    entries = []
    for i, entry in enumerate(data.get("equivalent", [])):
        keys = set(entry)
        if keys != set(EQUIVALENT_KEYS):
            raise TeethError(
                f"{path}: [[equivalent]] #{i + 1} has keys {sorted(keys)}; it needs exactly {list(EQUIVALENT_KEYS)}"
            )
        if not all(isinstance(entry[k], str) for k in EQUIVALENT_KEYS) or not entry["reason"].strip():
            raise TeethError(f"{path}: [[equivalent]] #{i + 1}: every key must be a string and the reason non-empty")
        entries.append(Equivalent(**{k: entry[k] for k in EQUIVALENT_KEYS}))
    keys = [e.key() for e in entries]
    if len(set(keys)) != len(keys):
        raise TeethError(f"{path}: an equivalent mutant is listed twice; remove the duplicate")
    return entries


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TeethError(f"[tool.mutmut] value {value!r} has a type this runner cannot copy (str, number, bool, list)")


def workdir_pyproject(project: Path, table: dict, only_mutate: list[str]) -> str:
    """The project's pyproject.toml (pytest settings included) with [tool.mutmut] narrowed to
    `only_mutate` and git change detection off (the workdir is a copy, not a checkout)."""
    text = (project / "pyproject.toml").read_text()
    text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text)
    table = {k: v for k, v in table.items() if k not in RUNNER_KEYS}
    table = {**table, "only_mutate": only_mutate, "use_git_change_detection": False}
    lines = ["", "[tool.mutmut]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return text.rstrip() + "\n" + "\n".join(lines) + "\n"


def _copy_inputs(project: Path, src: Path, table: dict) -> None:
    """Fresh copies of the source paths and also_copy files (modification times kept: mutmut
    regenerates the mutants of a file only when the file is newer than them)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for rel in list(table["source_paths"]) + list(table.get("also_copy", [])):
        source, target = project / rel, src / rel
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _link_inputs(project: Path, src: Path, table: dict) -> None:
    """`also_link` paths (relative to the project, e.g. "../shared", fixtures that live beside the
    repository), linked by name beside the two copies the tests run in: `src/` (the coverage run)
    and mutmut's `src/mutants/` (a test finds ../shared from its own file)."""
    for rel in table.get("also_link", []):
        target = (project / rel).resolve()
        for link in (src.parent / Path(rel).name, src / Path(rel).name):
            if link.is_symlink() or link.exists():
                link.unlink()
            if target.exists():  # absent (a clone without ../shared): the tests that need it skip, saying so
                link.symlink_to(target, target_is_directory=target.is_dir())


def _fingerprint(root: Path, table: dict, only_mutate: list[str], pyproject_text: str) -> str:
    """Hash of everything that can change a verdict other than the mutated files themselves
    (mutmut re-tests the functions of those that changed): the tests, the other sources under
    `root`, the workdir's pyproject.toml text, mutmut's version."""
    from importlib.metadata import version

    # The timeout keys stay out: when they change mutmut itself re-tests exactly the timeouts.
    kept = {k: v for k, v in table.items() if k not in TIMEOUT_KEYS}
    digest = hashlib.sha256(json.dumps([kept, only_mutate, version("mutmut")], sort_keys=True).encode())
    for rel in list(table["source_paths"]) + list(table.get("also_copy", [])) + ["pyproject.toml"]:
        if rel == "pyproject.toml":
            text = "\n".join(line for line in pyproject_text.splitlines() if line.split(" = ")[0] not in TIMEOUT_KEYS)
            digest.update(b"pyproject.toml\0" + text.encode())
            continue
        base = root / rel
        for f in sorted(base.rglob("*")) if base.is_dir() else [base]:
            rel_f = f.relative_to(root).as_posix()
            if f.is_file() and rel_f not in only_mutate and "__pycache__" not in f.parts and f.suffix != ".pyc":
                digest.update(rel_f.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def prepare_workdir(project: Path, workdir: Path, table: dict, only_mutate: list[str], refresh: bool = True) -> Path:
    """Copy the sources into `workdir`/src; previous results are kept unless the fingerprint
    changed. Returns the folder mutmut runs in. refresh=False copies nothing and refuses results
    recorded for other sources."""
    src = workdir / "src"
    pyproject_text = workdir_pyproject(project, table, only_mutate)
    stamp = workdir / "fingerprint.txt"
    if not refresh:
        if not stamp.is_file() or stamp.read_text() != _fingerprint(project, table, only_mutate, pyproject_text):
            raise TeethError(
                f"the verdicts in {workdir} were not recorded for these sources and files: run "
                "without --report to bring them up to date"
            )
        return src
    src.mkdir(parents=True, exist_ok=True)
    _copy_inputs(project, src, table)
    _link_inputs(project, src, table)
    (src / "pyproject.toml").write_text(pyproject_text)
    fingerprint = _fingerprint(src, table, only_mutate, pyproject_text)
    if not stamp.is_file() or stamp.read_text() != fingerprint:
        shutil.rmtree(src / "mutants", ignore_errors=True)
        (workdir / "coverage.json").unlink(missing_ok=True)
        stamp.write_text(fingerprint)
    return src


def _env() -> dict[str, str]:
    """One thread per worker (the CPU-time limit and the worker count assume it), fixed hashing."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    env.pop("MUTANT_UNDER_TEST", None)
    return env


# -- line coverage -----------------------------------------------------------------------------------
def line_coverage(src: Path, workdir: Path, table: dict, only_mutate: list[str]) -> dict[str, set[int]]:
    """Executed lines of each mutated file under the test selection, unmutated (cached per fingerprint)."""
    cached = workdir / "coverage.json"
    if not cached.is_file():
        data_file = workdir / ".coverage"
        include = ",".join(str(src / f) for f in only_mutate)
        cmd = [
            sys.executable,
            "-m",
            "coverage",
            "run",
            f"--data-file={data_file}",
            f"--include={include}",
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            *table["pytest_add_cli_args_test_selection"],
            *table.get("pytest_add_cli_args", []),
        ]
        proc = subprocess.run(cmd, check=False, cwd=src, env=_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise TeethError(
                f"the unmutated tests fail under coverage (exit {proc.returncode}); fix them first:\n"
                f"{proc.stdout[-3000:]}{proc.stderr[-2000:]}"
            )
        out = workdir / "coverage-raw.json"
        subprocess.run(
            [sys.executable, "-m", "coverage", "json", f"--data-file={data_file}", "-o", str(out)],
            cwd=src,
            env=_env(),
            check=True,
            capture_output=True,
        )
        files = json.loads(out.read_text())["files"]
        executed = {}
        for name, info in files.items():
            path = Path(name) if Path(name).is_absolute() else src / name
            executed[path.resolve().relative_to(src.resolve()).as_posix()] = info["executed_lines"]
        cached.write_text(json.dumps(executed, sort_keys=True))
    return {f: set(lines) for f, lines in json.loads(cached.read_text()).items()}


def statement_start(tree: ast.Module, line: int) -> int:
    """First line of the innermost statement spanning `line` (coverage reports statements by it)."""
    best = None
    for node in ast.walk(tree):
        spans = isinstance(node, ast.stmt) and node.lineno <= line <= (node.end_lineno or node.lineno)
        if spans and (best is None or node.lineno >= best.lineno):
            best = node
    return best.lineno if best is not None else line


# -- mutmut ------------------------------------------------------------------------------------------
def _mutmut(args: list[str], src: Path, **kwargs) -> subprocess.CompletedProcess:
    # The click group itself, so that mutmut.__main__ is imported as a module (its fork setup).
    cmd = [sys.executable, "-c", "import sys; from mutmut.__main__ import cli; sys.exit(cli())", *args]
    return subprocess.run(cmd, check=False, cwd=src, env=_env(), **kwargs)


def function_of(name: str) -> str:
    """ "Class.method" or "function" from a mutmut key (xǁClassǁmethod__mutmut_3 / x_function__mutmut_3)."""
    mangled = name.partition("__mutmut_")[0].rpartition(".")[2]
    if mangled.startswith("xǁ"):
        _, cls, method = mangled.split("ǁ")
        return f"{cls}.{method}"
    return mangled[len("x_") :]


def read_verdicts(src: Path, only_mutate: list[str]) -> list[Mutant]:
    """Every mutant of the mutated files with mutmut's recorded exit code, in a fixed order
    (file order of only_mutate, then mutmut's numbering)."""
    mutants = []
    for file in only_mutate:
        meta = src / "mutants" / (file + ".meta")
        if not meta.is_file():
            raise TeethError(f"mutmut wrote no results for {file} ({meta} is missing): see the mutmut log")
        codes = json.loads(meta.read_text())["exit_code_by_key"]

        def order(name: str):
            base, _, number = name.rpartition("__mutmut_")
            return base, int(number)

        for name in sorted(codes, key=order):
            mutants.append(
                Mutant(
                    name=name,
                    file=file,
                    function=function_of(name),
                    status=status_of(codes[name]),
                    exit_code=codes[name],
                )
            )
    return mutants


def status_of(code: int | None) -> str:
    if code is None:
        return "not run"
    if code in KILLED_CODES:
        return "killed"
    if code in SURVIVED_CODES:
        return "survived"
    if code in NO_TESTS_CODES:
        return "no coverage"
    if code in TIMEOUT_CODES:
        return "timeout"
    return "error"


_DIFF_SCRIPT = """
import json, sys
import libcst as cst
from mutmut.mutation.diff_apply import (get_diff_for_mutant, read_functions_from_index, read_mutants_module,
                                        read_original_function)
out = {}
for name, path in json.loads(sys.stdin.read()):
    functions = read_functions_from_index(name, path)
    original = functions[0] if functions else read_original_function(read_mutants_module(path), name)
    out[name] = [get_diff_for_mutant(name, path=path), cst.Module([original]).code.strip()]
print(json.dumps(out))
"""


def mutant_diffs(src: Path, mutants: list[Mutant]) -> dict[str, tuple[str, str]]:
    """mutmut's unified diff (original function -> mutant) of each of `mutants`, and the text of
    the original function that the diff's line numbers count in."""
    if not mutants:
        return {}
    proc = subprocess.run(
        [sys.executable, "-c", _DIFF_SCRIPT],
        check=False,
        cwd=src,
        env=_env(),
        capture_output=True,
        text=True,
        input=json.dumps([[m.name, m.file] for m in mutants]),
    )
    if proc.returncode != 0:
        raise TeethError(f"could not read the mutants' diffs from mutmut: {proc.stderr[-2000:]}")
    return {name: (diff, text) for name, (diff, text) in json.loads(proc.stdout).items()}


def function_start(tree: ast.Module, function: str) -> int:
    """First line (decorators included) of a top-level function or a method "Class.method"."""
    cls, _, name = function.rpartition(".")
    body = tree.body
    if cls:
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), [])
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return min([node.lineno] + [d.lineno for d in node.decorator_list])
    raise TeethError(f"function {function} not found in the source mutmut mutated")


def locate(diff: str, function_text: str, tree: ast.Module, function: str) -> tuple[int, str, str]:
    """(line in the source file, mutated text before, after) of a mutant's diff.

    diff: mutmut's unified diff; its line numbers count in `function_text`, the original
    function as mutmut prints it (possibly with the comment lines above it)."""
    lines = diff.splitlines()
    hunks = [i for i, line in enumerate(lines) if line.startswith("@@")]
    if not hunks:
        raise TeethError(f"mutmut's diff of a mutant of {function} has no hunk:\n{diff}")
    first_removed, before, after = None, [], []
    for i in hunks:
        index = int(re.match(r"@@ -(\d+)", lines[i]).group(1))  # 1-based line in function_text
        for hunk_line in lines[i + 1 :]:
            if hunk_line.startswith("@@"):
                break
            if hunk_line.startswith("-"):
                first_removed = index if first_removed is None else first_removed
                before.append(hunk_line[1:].strip())
                index += 1
            elif hunk_line.startswith("+"):
                after.append(hunk_line[1:].strip())
            else:
                index += 1
    text_lines = function_text.splitlines()
    header = next((i for i, line in enumerate(text_lines) if line.lstrip().startswith(("@", "def ", "async def "))), 0)
    index = first_removed if first_removed is not None else int(re.match(r"@@ -(\d+)", lines[hunks[0]]).group(1))
    return function_start(tree, function) + (index - 1 - header), " / ".join(before), " / ".join(after)


# -- the run -----------------------------------------------------------------------------------------
def classify(mutants: list[Mutant], src: Path, executed: dict[str, set[int]], equivalents: list[Equivalent]) -> None:
    """Locate each survivor, timeout and error, and mark a survivor equivalent (reviewed list) or
    no coverage (its mutated line never ran), in place."""
    shown = [m for m in mutants if m.status in ("survived", "timeout", "error")]
    diffs = mutant_diffs(src, shown)
    trees = {f: ast.parse((src / f).read_text()) for f in {m.file for m in shown}}
    reviewed = {e.key(): e for e in equivalents}
    for m in shown:
        diff, text = diffs[m.name]
        m.line, m.before, m.after = locate(diff, text, trees[m.file], m.function)
        if m.status != "survived":
            continue
        listed = reviewed.get((m.file, m.function, m.before, m.after))
        if listed is not None:
            m.status, m.reason = "equivalent", listed.reason
        elif statement_start(trees[m.file], m.line) not in executed.get(m.file, set()):
            m.status = "no coverage"


STATUSES = ("killed", "survived", "equivalent", "timeout", "no coverage", "error", "not run")


def score_of(counts: dict[str, int]) -> float | None:
    """killed / (total - equivalent - no coverage - not run); None when nothing counts."""
    judged = sum(counts.values()) - counts["equivalent"] - counts["no coverage"] - counts["not run"]
    return counts["killed"] / judged if judged else None


def run_teeth(
    project: Path,
    workdir: Path,
    files: list[str] | None = None,
    only_mutants: list[str] | None = None,
    max_children: int = 2,
    equivalent_file: Path | None = None,
    run: bool = True,
    sample: int | None = None,
    seed: int = 0,
    target: str = "trainer",
    test_selection: list[str] | None = None,
) -> dict:
    """Run mutmut over `files` (default: the config's only_mutate) of `project` with its compat
    test selection, and return the result (also written to `workdir`/teeth-result.json).

    project: folder with pyproject.toml ([tool.mutmut]) and the sources.
    workdir: where the copy, mutmut's state and the result go; reuse it to resume.
    files: a subset of only_mutate (paths relative to `project`).
    only_mutants: mutmut names (fnmatch patterns) to run, always afresh; the result holds only those.
    max_children: parallel mutant workers (one thread each).
    equivalent_file: the reviewed equivalent list (default: bench/teeth_equivalent.toml).
    run: False reports the verdicts recorded so far without running mutmut (a partial run's
        undecided mutants count as not run).
    sample: run only this many mutants, drawn uniformly without replacement from every mutant of
        `files` with `seed` (see `sample_names`); the result states the sample and the score's 95%
        interval.
    seed: the sample's seed.
    target: "trainer" ([tool.mutmut]) or "gate" (overlaid with [tool.teeth.gate]).
    test_selection: replaces the target's pytest test selection (the smoke runs use a fast one).
    """
    table = read_mutmut_config(project, target)
    if test_selection is not None:
        table["pytest_add_cli_args_test_selection"] = list(test_selection)
    configured = list(table["only_mutate"])
    files = list(files or configured)
    unknown = [f for f in files if f not in configured]
    if unknown:
        raise TeethError(
            f"{unknown} not in [tool.mutmut] only_mutate of {project / 'pyproject.toml'}; choose among {configured}"
        )
    equivalents = load_equivalents(equivalent_file or EQUIVALENT_FILE)
    workdir.mkdir(parents=True, exist_ok=True)
    src = prepare_workdir(project, workdir, table, files, refresh=run)
    executed = line_coverage(src, workdir, table, files)

    names = list(only_mutants or [])
    log = workdir / "mutmut-run.log"
    population = None
    if sample is not None:
        if names:
            raise TeethError("a sampled run draws its own mutants: give either a sample or mutant names")
        if sample < 1:
            raise TeethError(f"the sample size must be at least 1, got {sample}")
        if run:
            list_mutants(src, log)
        population = len(read_verdicts(src, files))
        names = sample_names(src, files, sample, seed)
    if run:
        with log.open("w") as out:
            proc = _mutmut(
                ["run", "--max-children", str(max_children), *names], src, stdout=out, stderr=subprocess.STDOUT
            )
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise TeethError(f"mutmut run exited {proc.returncode} (log: {log}):\n{tail}")

    mutants = read_verdicts(src, files)
    if names:
        mutants = [m for m in mutants if any(fnmatch(m.name, p) for p in names)]
    classify(mutants, src, executed, equivalents)
    counts = {s: sum(m.status == s for m in mutants) for s in STATUSES}
    # An entry is stale when every mutant of its file was decided and none matches it.
    decided = {f for f in files if not any(m.file == f and m.status == "not run" for m in mutants)}
    found = {(m.file, m.function, m.before, m.after) for m in mutants if m.status == "equivalent"}
    stale = [asdict(e) for e in equivalents if e.file in decided and e.key() not in found and not names]
    result = {
        "code": target,  # what was mutated: the trainer code or the gate's
        "files": files,
        "counts": counts,
        "total": len(mutants),
        "score": score_of(counts),
        "score_formula": "killed / (total - equivalent - no coverage - not run)",
        "target": TARGET,
        "test_selection": table["pytest_add_cli_args_test_selection"],
        "survivors": [asdict(m) for m in mutants if m.status in ("survived", "timeout", "error")],
        "equivalent": [asdict(m) for m in mutants if m.status == "equivalent"],
        "no_coverage": [asdict(m) for m in mutants if m.status == "no coverage"],
        "stale_equivalents": stale,
        "log": str(log),
    }
    if population is not None:
        result["sample"] = {"size": len(mutants), "population": population, "seed": seed}
        result["score_interval_95"] = wilson_interval(counts)
    (workdir / "teeth-result.json").write_text(json.dumps(result, indent=1))
    return result


# A name that matches no mutant: mutmut generates every mutant and records its per-test stats, then
# stops on its own check that the filter matched nothing (the only way to list the mutants of 3.8).
LIST_ONLY = "teeth-list-only-matches-nothing"
NOTHING_MATCHES = "Filtered for specific mutants, but nothing matches"


def list_mutants(src: Path, log: Path) -> None:
    """Have mutmut generate the mutants of the workdir (and its stats), running none."""
    with log.open("w") as out:
        proc = _mutmut(["run", "--max-children", "1", LIST_ONLY], src, stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    if proc.returncode == 0 or NOTHING_MATCHES not in text:
        raise TeethError(
            f"mutmut did not list the mutants as expected (exit {proc.returncode}, log {log}):\n{text[-3000:]}"
        )


def sample_names(src: Path, files: list[str], size: int, seed: int) -> list[str]:
    """`size` mutant names drawn uniformly without replacement from every mutant of `files`
    (all of them when there are fewer), with `seed`: the same sample for the same mutants."""
    names = [m.name for m in read_verdicts(src, files)]
    if size >= len(names):
        return names
    return sorted(random.Random(seed).sample(names, size))


def wilson_interval(counts: dict[str, int]) -> list[float] | None:
    """95% Wilson score interval of killed / judged (judged: the score's denominator)."""
    from scipy.stats import binomtest

    judged = counts["killed"] + counts["survived"] + counts["timeout"] + counts["error"]
    if judged == 0:
        return None
    ci = binomtest(counts["killed"], judged).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def report(result: dict) -> list[str]:
    """The printed lines: counts, score, survivors with file:line and the mutation."""
    c = result["counts"]
    out = [
        f"teeth ({result.get('code', 'trainer')} code): {result['total']} mutants of {', '.join(result['files'])}",
        "  " + ", ".join(f"{s} {c[s]}" for s in STATUSES),
        f"  score = {result['score_formula']} = "
        + ("n/a" if result["score"] is None else f"{result['score']:.3f}")
        + f" (target >= {TARGET:.2f})",
    ]
    if "sample" in result:
        smp, ci = result["sample"], result["score_interval_95"]
        out.insert(
            1,
            f"  a sample of {smp['size']} of {smp['population']} mutants (seed {smp['seed']}); "
            + ("95% interval n/a" if ci is None else f"score 95% interval [{ci[0]:.3f}, {ci[1]:.3f}] (Wilson)"),
        )
    for m in result["survivors"]:
        where = f"{m['file']}:{m['line']}" if m["line"] else m["file"]
        change = f"{m['before']!r} -> {m['after']!r}" if m["before"] or m["after"] else m["name"]
        out.append(f"  {m['status'].upper():<8} {where} {m['function']}: {change}")
    for e in result["stale_equivalents"]:
        out.append(f"  stale equivalent entry (no such survivor now): {e['file']} {e['function']}: {e['before']!r}")
    return out


def target_workdir(workdir: Path | None, target: str, small: bool = False) -> Path:
    """Where a target's run keeps its copy and verdicts: `.teeth/` for the trainer code, `.teeth/gate/`
    for the gate's (under `workdir` when given); the smoke runs in `small/` below that."""
    base = workdir or REPO / ".teeth"
    base = base if target == "trainer" else base / target
    return base / "small" if small else base


def teeth_figure(
    small: bool,
    workdir: Path | None,
    files: list[str] | None = None,
    sample: int | None = None,
    seed: int = 0,
    target: str = "trainer",
) -> list[str]:
    """bench's teeth line (after the report lines). `small`: 3 mutants of one function (a smoke run)."""
    workdir = target_workdir(workdir, target, small)
    if small:
        file, names, selection = SMALL[target]
        result = run_teeth(REPO, workdir, files=[file], only_mutants=names, target=target, test_selection=selection)
    else:
        result = run_teeth(REPO, workdir, files=files, sample=sample, seed=seed, target=target)
    score = result["score"]
    c = result["counts"]
    detail = (
        f"{c['killed']} killed of {result['total']} mutants ({c['equivalent']} equivalent, {c['no coverage']} "
        f"no coverage, {c['timeout']} timeout, {c['not run']} not run); {len(result['files'])} files; "
        f"result {workdir / 'teeth-result.json'}"
    )
    if "sample" in result:
        ci = result["score_interval_95"]
        detail = (
            f"sample of {result['sample']['size']} of {result['sample']['population']} mutants "
            f"(seed {result['sample']['seed']}), 95% interval "
            + ("n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]")
            + f"; {detail}"
        )
    ok = None if small or score is None else score >= TARGET
    return [
        *report(result),
        line(
            "teeth" if target == "trainer" else f"teeth_{target}",
            score if score is not None else float("nan"),
            f"target >= {TARGET:.2f}" + (" (full)" if small else ""),
            detail,
            ok,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.teeth [--target gate]`: run mutmut over the target's files and print the
    score; `--report` prints the verdicts recorded so far (nothing run); `--small` runs the target's
    3-mutant smoke. For the trainer code, the same run as `python -m bench --only teeth`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.teeth", description=main.__doc__)
    parser.add_argument(
        "--target",
        choices=TARGETS,
        default="trainer",
        help="trainer: the trainers, losses, diffusion and masking code ([tool.mutmut]); gate: the gate's "
        "own code ([tool.teeth.gate], tests/ and compat/ as the test command)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="the teeth workdir (default .teeth/, .teeth/gate/ for the gate)"
    )
    parser.add_argument(
        "--file",
        action="append",
        default=None,
        metavar="PATH",
        help="a file of the target's only_mutate (repeatable; default: all)",
    )
    parser.add_argument("--report", action="store_true", help="report the recorded verdicts, run nothing")
    parser.add_argument("--small", action="store_true", help="the target's smoke: 3 mutants, a fast test selection")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant workers (default 2)")
    parser.add_argument("--sample", type=int, default=None, metavar="N", help="run N mutants drawn at random")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    args = parser.parse_args(argv)
    try:
        if args.small:
            print(*teeth_figure(True, args.workdir, target=args.target), sep="\n")
            return 0
        result = run_teeth(
            REPO,
            target_workdir(args.workdir, args.target),
            files=args.file,
            max_children=args.max_children,
            run=not args.report,
            sample=args.sample,
            seed=args.seed,
            target=args.target,
        )
    except TeethError as error:
        print(f"teeth: {error}", file=sys.stderr)
        return 2
    print(*report(result), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
