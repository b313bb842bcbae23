"""The benchmark's figures as last measured, and the README's table rendered from them.

`python -m bench` (full sizes) records every figure it measured in `bench/results.json`: the ratio,
the target, the verdict, the measured detail, the date, the machine, the commit, and a digest of the
files the figure depends on (`FIGURE_INPUTS`). The README's benchmark table is rendered from that
file (`python -m bench.results --write-readme`); a figure whose inputs changed since it was measured
is marked **stale** there, and `tests/test_bench_results.py` fails when the README's table is not the
rendering of the file against the tree as it is: a change that affects a figure shows, until the
figure is measured again.

    python -m bench.results --write-readme     # re-render the README's table (marks stale figures)
    python -m bench.results --check            # exit 1 when the README's table is not current
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.json"
README = REPO / "README.md"
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"
ROWS_BEGIN, ROWS_END = "<!-- bench-rows:begin -->", "<!-- bench-rows:end -->"

# What each figure depends on: a change to any of these files may change it.
_PRODUCT = ("latentDLM_mmdit", "cycle_vae_impl")
_GATE = (*_PRODUCT, "compat", "bench/run.py", "bench/random_checkpoint.py", "bench/row_profile.py")
FIGURE_INPUTS: dict[str, tuple[str, ...]] = {
    "gate_memory": _GATE,
    "gate_wall": _GATE,
    "cycle_step_cost": (*_PRODUCT, "bench/run.py"),
    "cycle_step_w0": (*_PRODUCT, "bench/run.py"),
    "compat_suite": (*_PRODUCT, "compat"),
    "loader_feed_w0": ("latentDLM_mmdit/training", "latentDLM_mmdit/data.py", "bench/loader.py"),
    "loader_feed_w1": ("latentDLM_mmdit/training", "latentDLM_mmdit/data.py", "bench/loader.py"),
    "gate_plugin_spec": (*_GATE, "tests/foreign_trainers"),
    "gate_plugin_foreign": (*_GATE, "tests/foreign_trainers"),
    "checkpoint_save": ("latentDLM_mmdit/checkpoints", "latentDLM_mmdit/training", "bench/run.py"),
    "report_render": ("compat/report.py", "compat/figures.py", "compat/figure_data.py", "bench/data"),
    "resources_wall": (*_PRODUCT, "compat/resources.py", "compat/test_row_resources.py", "bench/resources_row.py"),
    "resources_rss": (*_PRODUCT, "compat/resources.py", "compat/test_row_resources.py", "bench/resources_row.py"),
}
ORDER = tuple(FIGURE_INPUTS)


@dataclass
class Figure:
    """One measured figure, as printed and as recorded."""

    name: str
    ratio: float
    target: str
    ok: bool | None
    detail: str
    rows: list[dict] = field(default_factory=list)  # gate_memory with --per-row: one entry per row

    @property
    def verdict(self) -> str:
        return "-" if self.ok is None else ("meets target" if self.ok else "MISSES target")

    def __str__(self) -> str:
        return f"{self.name:<16} ratio {self.ratio:8.3f}   {self.target:<22} {self.verdict:<14} {self.detail}"


def line(name: str, ratio: float, target: str, detail: str, ok: bool | None) -> Figure:
    """One figure (printed as its line; recorded in bench/results.json by a full-size run)."""
    return Figure(name, ratio, target, ok, detail)


def inputs_digest(paths: tuple[str, ...], root: Path = REPO) -> str:
    """sha256 over the relative path and bytes of every file under `paths` (caches left out)."""
    digest = hashlib.sha256()
    files = []
    for rel in paths:
        path = root / rel
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for path in sorted(files):
        if "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def machine() -> str:
    """This machine as a figure's provenance: cores, memory, torch, OS."""
    import psutil
    import torch

    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} cores, {memory:.0f} GiB, torch {torch.__version__}, {platform.system()} {platform.machine()}"
    )


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def load(path: Path = RESULTS) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.is_file() else {}


def record(figures: list[Figure], path: Path = RESULTS) -> None:
    """Writes `figures` into the results file (the others keep their last measurement)."""
    results = load(path)
    today, where, commit = datetime.date.today().isoformat(), machine(), _commit()
    for fig in figures:
        if fig.name not in FIGURE_INPUTS:
            raise KeyError(f"bench figure {fig.name!r} has no FIGURE_INPUTS entry (bench/results.py)")
        results[fig.name] = {
            **asdict(fig),
            "verdict": fig.verdict,
            "date": today,
            "machine": where,
            "commit": commit,
            "inputs": inputs_digest(FIGURE_INPUTS[fig.name]),
        }
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def is_stale(name: str, entry: dict, root: Path = REPO) -> bool:
    return entry.get("inputs") != inputs_digest(FIGURE_INPUTS[name], root)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render_table(results: dict[str, dict], root: Path = REPO) -> str:
    """The README's table: one line per recorded figure, its date and machine, stale ones marked."""
    lines = ["| figure | ratio | target | verdict | measured | what |", "|---|---|---|---|---|---|"]
    for name in ORDER:
        entry = results.get(name)
        if entry is None:
            continue
        stale = is_stale(name, entry, root)
        verdict = entry["verdict"] + ("; **stale**: its inputs changed since" if stale else "")
        lines.append(
            f"| {name} | {entry['ratio']:.3f} | {_cell(entry['target'])} | {_cell(verdict)} | "
            f"{entry['date']}, {_cell(entry['machine'])}, commit {entry.get('commit') or '?'} | {_cell(entry['detail'])} |"
        )
    return "\n".join(lines)


def render_rows(results: dict[str, dict]) -> str:
    """The full-size gate's per-row lines (`--per-row`), as recorded with gate_memory."""
    entry = results.get("gate_memory") or {}
    rows = entry.get("rows") or []
    if not rows:
        return "(not measured with --per-row)"
    lines = [
        f"gate rows on {entry['date']} ({_cell(entry['machine'])}): seconds, the largest RSS rise within one "
        "check, and the process's peak while the row ran",
        "",
        "| row | checks | seconds | own rise (GiB) | peak RSS (GiB) | peak / checkpoint |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['row']} | {r['checks']} | {r['seconds']:.1f} | {r['rise_gib']:.2f} | {r['peak_gib']:.2f} | "
        f"{r['peak_ratio']:.2f} |"
        for r in rows
    ]
    return "\n".join(lines)


def _replace_block(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text or end not in text:
        raise ValueError(f"README.md has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def readme_with_tables(readme: str, results: dict[str, dict], root: Path = REPO) -> str:
    readme = _replace_block(readme, BEGIN, END, render_table(results, root))
    return _replace_block(readme, ROWS_BEGIN, ROWS_END, render_rows(results))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv not in (["--write-readme"], ["--check"]):
        print(__doc__.split("\n\n")[-1], file=sys.stderr)
        return 2
    text = README.read_text()
    wanted = readme_with_tables(text, load())
    if argv == ["--check"]:
        if wanted != text:
            print(
                "README.md's benchmark tables are not bench/results.json as the tree is: python -m bench.results --write-readme"
            )
            return 1
        return 0
    README.write_text(wanted)
    stale = [name for name, entry in load().items() if name in FIGURE_INPUTS and is_stale(name, entry)]
    print(f"README.md's benchmark tables written; stale: {', '.join(stale) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
