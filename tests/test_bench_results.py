"""The README's benchmark tables are `bench/results.json` (the figures as last measured, with their date,
machine and commit) rendered against the tree as it is: a figure whose inputs changed since it was
measured shows as stale until `python -m bench` measures it again."""

from __future__ import annotations

import json

from bench import results


def test_the_readme_tables_are_the_recorded_figures_as_the_tree_is():
    readme = results.README.read_text()
    assert readme == results.readme_with_tables(readme, results.load()), (
        "README.md's benchmark tables are not bench/results.json rendered against this tree: run "
        "python -m bench.results --write-readme (and python -m bench for the figures marked stale)"
    )


def test_every_recorded_figure_says_when_and_where_it_was_measured():
    recorded = results.load()
    assert {"gate_memory", "gate_wall"} <= set(recorded), sorted(recorded)
    for name, entry in recorded.items():
        assert name in results.FIGURE_INPUTS, f"{name}: no FIGURE_INPUTS entry"
        assert entry["date"][:2] == "20" and "cores" in entry["machine"] and entry["inputs"], (name, entry)


def test_a_change_to_a_figures_inputs_marks_it_stale(tmp_path):
    (tmp_path / "compat").mkdir()
    source = tmp_path / "compat" / "report.py"
    source.write_text("x = 1\n")
    inputs = ("compat/report.py",)
    entry = {
        "ratio": 0.5,
        "target": "target <= 1.0",
        "verdict": "meets target",
        "detail": "2.0 s",
        "date": "2026-12-07",
        "machine": "2 cores, 24 GiB",
        "commit": "abc1234",
        "inputs": results.inputs_digest(inputs, tmp_path),
    }
    saved = dict(results.FIGURE_INPUTS)
    results.FIGURE_INPUTS["report_render"] = inputs
    try:
        fresh = results.render_table({"report_render": entry}, tmp_path)
        source.write_text("x = 2\n")
        stale = results.render_table({"report_render": entry}, tmp_path)
    finally:
        results.FIGURE_INPUTS.clear()
        results.FIGURE_INPUTS.update(saved)
    assert "stale" not in fresh and "2026-12-07" in fresh
    assert "**stale**" in stale
    assert json.dumps(entry)  # the entry is what the file holds: plain JSON
