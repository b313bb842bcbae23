"""The mutation-score runner (bench/teeth.py) end to end on a tiny project: real mutmut, real
coverage, the verdict classes, the equivalent list, the score formula, resuming, bad setups."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from bench import teeth

CALC = """\
def clamp_add(a, b):
    total = a + b
    return min(total, 10)


def scale(x):
    if x < 0:
        raise ValueError("negative input")
    return x * 2


def unused(x):
    return x - 1
"""

CHECKS = """\
from tiny.calc import clamp_add, scale


def test_clamp_add():
    assert clamp_add(2, 3) == 5
    assert clamp_add(8, 5) == 10


def test_scale():
    assert scale(3) == 6
"""

PYPROJECT = """\
[tool.mutmut]
source_paths = ["tiny", "checks"]
only_mutate = ["tiny/calc.py"]
pytest_add_cli_args_test_selection = ["checks/"]
pytest_add_cli_args = ["-p", "no:cacheprovider"]
process_isolation = "fork"
timeout_multiplier = 5.0
timeout_constant = 5.0
"""

# The survivor on an executed line: `x < 0` -> `x <= 0` (scale(0) is never asked).
BOUNDARY = {"file": "tiny/calc.py", "function": "scale", "before": "if x < 0:", "after": "if x <= 0:"}


def write_project(root: Path, pyproject: str = PYPROJECT) -> Path:
    (root / "tiny").mkdir(parents=True)
    (root / "tiny" / "__init__.py").write_text("")
    (root / "tiny" / "calc.py").write_text(CALC)
    (root / "checks").mkdir()
    (root / "checks" / "test_calc.py").write_text(CHECKS)
    (root / "pyproject.toml").write_text(pyproject)
    return root


def write_equivalents(path: Path, entries: list[dict]) -> Path:
    body = "".join(
        "[[equivalent]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in e.items()) + "\n" for e in entries
    )
    path.write_text(body)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real run on the tiny project, no equivalent list; then a second run in the same workdir."""
    root = write_project(tmp_path_factory.mktemp("tiny"))
    workdir = root / "work"
    none = write_equivalents(root / "none.toml", [])
    first = teeth.run_teeth(root, workdir, equivalent_file=none)
    meta = workdir / "src" / "mutants" / "tiny" / "calc.py.meta"
    verdicts_before = json.loads(meta.read_text())["exit_code_by_key"]
    log_before = (workdir / "mutmut-run.log").read_text()
    second = teeth.run_teeth(root, workdir, equivalent_file=none)
    return root, workdir, first, second, verdicts_before, log_before


@pytest.mark.slow
def test_verdict_classes(tiny_run):
    _, workdir, result, _, _, _ = tiny_run
    by_function: dict[str, set[str]] = {}
    for group in ("survivors", "equivalent", "no_coverage"):
        for m in result[group]:
            by_function.setdefault(m["function"], set()).add(m["status"])
    counts = result["counts"]
    # `unused` is called by no test: its mutants have no coverage, never survivors.
    assert by_function["unused"] == {"no coverage"}
    assert counts["killed"] > 0 and counts["not run"] == 0 and counts["error"] == 0
    # The raise line of scale never runs: its string mutants are no coverage, not survivors.
    raise_line = CALC.splitlines().index('        raise ValueError("negative input")') + 1
    assert any(m["line"] == raise_line and m["function"] == "scale" for m in result["no_coverage"])
    assert all(m["line"] != raise_line for m in result["survivors"])
    # The boundary mutant survives, located on its source line with its text.
    survivors = sorted((m["line"], m["before"], m["after"]) for m in result["survivors"])
    assert survivors == [(7, "if x < 0:", "if x < 1:"), (7, "if x < 0:", "if x <= 0:")]
    assert counts["survived"] == 2 and counts["killed"] == 9 and counts["no coverage"] == 5  # mutmut 3.8.1's operators
    assert result["score"] == counts["killed"] / (result["total"] - counts["equivalent"] - counts["no coverage"])
    assert json.loads((workdir / "teeth-result.json").read_text()) == result


@pytest.mark.slow
def test_resumes_without_rerunning(tiny_run):
    _, workdir, first, second, verdicts_before, _ = tiny_run
    meta = workdir / "src" / "mutants" / "tiny" / "calc.py.meta"
    assert json.loads(meta.read_text())["exit_code_by_key"] == verdicts_before
    assert second == first
    # mutmut decided nothing again: every mutant kept its verdict (its progress shows 0 tried).
    assert "0.00 mutations/second" in (workdir / "mutmut-run.log").read_text()


@pytest.mark.slow
def test_equivalent_list_moves_a_survivor(tiny_run, tmp_path):
    root, workdir, first, _, _, _ = tiny_run
    listed = write_equivalents(tmp_path / "eq.toml", [{**BOUNDARY, "reason": "scale(0) is 0 either way"}])
    result = teeth.run_teeth(root, workdir, equivalent_file=listed)
    assert result["counts"]["equivalent"] == 1
    assert result["counts"]["survived"] == first["counts"]["survived"] - 1
    assert [m["reason"] for m in result["equivalent"]] == ["scale(0) is 0 either way"]
    assert result["score"] > first["score"]
    # An entry that matches no survivor is reported as stale.
    stale = write_equivalents(tmp_path / "stale.toml", [{**BOUNDARY, "after": "if x >= 0:", "reason": "r"}])
    assert len(teeth.run_teeth(root, workdir, equivalent_file=stale)["stale_equivalents"]) == 1


def test_locate_maps_a_method_diff_to_its_file_line():
    import ast

    source = textwrap.dedent("""\
        import torch


        class Trainer:
            # a comment above the method

            @staticmethod
            def step(x):
                y = x + 1
                return y * 2
        """)
    # mutmut's diff counts lines in the function text it prints (the comment above included).
    text = "# a comment above the method\n\n@staticmethod\ndef step(x):\n    y = x + 1\n    return y * 2"
    diff = (
        "--- f.py\n+++ f.py\n@@ -2,5 +2,5 @@\n \n @staticmethod\n def step(x):\n"
        "-    y = x + 1\n+    y = x - 1\n     return y * 2"
    )
    line, before, after = teeth.locate(diff, text, ast.parse(source), "Trainer.step")
    assert (line, before, after) == (9, "y = x + 1", "y = x - 1")


def test_bad_setups_are_named(tmp_path):
    root = write_project(tmp_path / "p", pyproject="[project]\nname = 'x'\n")
    with pytest.raises(teeth.TeethError, match=r"pyproject.toml has no \[tool.mutmut\] table"):
        teeth.run_teeth(root, tmp_path / "w")
    root = write_project(tmp_path / "q", pyproject=PYPROJECT.replace("tiny/calc.py", "tiny/missing.py"))
    with pytest.raises(teeth.TeethError, match="only_mutate names 'tiny/missing.py', which is not a file"):
        teeth.run_teeth(root, tmp_path / "w")
    root = write_project(tmp_path / "r")
    with pytest.raises(teeth.TeethError, match=r"\['tiny/other.py'\] not in \[tool.mutmut\] only_mutate"):
        teeth.run_teeth(root, tmp_path / "w", files=["tiny/other.py"])
    bad = write_equivalents(tmp_path / "bad.toml", [{**BOUNDARY}])  # no reason
    with pytest.raises(teeth.TeethError, match=r"bad.toml: \[\[equivalent\]\] #1 has keys .* it needs exactly"):
        teeth.load_equivalents(bad)
    twice = write_equivalents(tmp_path / "twice.toml", [{**BOUNDARY, "reason": "r"}] * 2)
    with pytest.raises(teeth.TeethError, match="listed twice"):
        teeth.load_equivalents(twice)


def test_project_config_names_real_files():
    """The project's own [tool.mutmut] table: every path exists, the test command is compat/
    without the planted-defect file."""
    table = teeth.read_mutmut_config(teeth.REPO)
    assert table["pytest_add_cli_args_test_selection"][0] == "compat/"
    assert "--ignore=compat/test_mutants.py" in table["pytest_add_cli_args_test_selection"]
    assert "cycle_vae_impl/trainers/cycle_vae_trainer.py" in table["only_mutate"]
    for entry in teeth.load_equivalents(teeth.EQUIVALENT_FILE):
        assert entry.file in table["only_mutate"], entry


def test_project_gate_target_names_the_gate_code_and_the_whole_suite():
    """The gate's own code (issue 20): [tool.mutmut] overlaid with [tool.teeth.gate]; every path
    exists, the test command is tests/ and compat/ (planted defects included), and the smoke's
    mutants are mutants of its file."""
    table = teeth.read_mutmut_config(teeth.REPO, "gate")
    selection = table["pytest_add_cli_args_test_selection"]
    assert selection[:2] == ["tests/", "compat/"] and "--ignore=compat/test_mutants.py" not in selection
    assert {"compat/gate.py", "compat/observe.py", "latentDLM_mmdit/checkpoints/loading.py"} <= set(
        table["only_mutate"]
    )
    assert not set(table["only_mutate"]) & set(teeth.read_mutmut_config(teeth.REPO)["only_mutate"])
    written = teeth.tomllib.loads(teeth.workdir_pyproject(teeth.REPO, table, table["only_mutate"]))["tool"]["mutmut"]
    assert "tests" in written["source_paths"] and "also_link" not in written  # the runner's key, not mutmut's
    file, names, _ = teeth.SMALL["gate"]
    assert file in table["only_mutate"] and all(n.startswith("compat.gate.x_exit_code__mutmut_") for n in names)


def test_a_target_overlays_the_mutmut_table_and_links_what_lives_beside_the_project(tmp_path):
    overlay = '[tool.teeth.gate]\nonly_mutate = ["tiny/calc.py"]\nalso_link = ["../fixtures"]\n'
    root = write_project(tmp_path / "p", pyproject=PYPROJECT + overlay)
    with pytest.raises(teeth.TeethError, match="unknown teeth target 'gates'; valid: trainer, gate"):
        teeth.read_mutmut_config(root, "gates")
    table = teeth.read_mutmut_config(root, "gate")
    assert table["also_link"] == ["../fixtures"] and table["pytest_add_cli_args_test_selection"] == ["checks/"]
    (tmp_path / "fixtures").mkdir()
    src = teeth.prepare_workdir(root, tmp_path / "w", table, table["only_mutate"])
    # Beside the coverage run's copy (src/) and beside mutmut's (src/mutants/): a test looks from its file.
    assert (src.parent / "fixtures").resolve() == (src / "fixtures").resolve() == (tmp_path / "fixtures").resolve()
    bare = write_project(tmp_path / "q")
    with pytest.raises(teeth.TeethError, match=r"no \[tool.teeth.gate\] table"):
        teeth.read_mutmut_config(bare, "gate")


def test_report_refuses_verdicts_of_other_sources(tmp_path):
    root = write_project(tmp_path / "p")
    table = teeth.read_mutmut_config(root)
    files = table["only_mutate"]
    with pytest.raises(teeth.TeethError, match="were not recorded for these sources"):
        teeth.run_teeth(root, tmp_path / "w", run=False)
    teeth.prepare_workdir(root, tmp_path / "w", table, files)  # stamps the current sources
    text = teeth.workdir_pyproject(root, table, files)
    stamped = (tmp_path / "w" / "fingerprint.txt").read_text()
    assert teeth._fingerprint(root, table, files, text) == stamped
    # New timeout limits keep the verdicts (mutmut re-tests the timeouts itself).
    slower = {**table, "timeout_multiplier": 99.0}
    assert teeth._fingerprint(root, slower, files, teeth.workdir_pyproject(root, slower, files)) == stamped
    # A changed test changes the fingerprint; a changed mutated file does not (mutmut re-tests it).
    (root / "tiny" / "calc.py").write_text(CALC.replace("* 2", "* 3"))
    assert teeth._fingerprint(root, table, files, text) == stamped
    (root / "checks" / "test_calc.py").write_text(CHECKS + "\n# edited\n")
    assert teeth._fingerprint(root, table, files, text) != stamped
    with pytest.raises(teeth.TeethError, match="were not recorded for these sources"):
        teeth.run_teeth(root, tmp_path / "w", run=False)


@pytest.mark.slow
def test_only_mutants_runs_just_those(tiny_run, tmp_path):
    """The smoke mode (--small): named mutants only, and the result holds just them."""
    root = tiny_run[0]
    none = write_equivalents(tmp_path / "none.toml", [])
    result = teeth.run_teeth(
        root, tmp_path / "w", only_mutants=["tiny.calc.x_clamp_add__mutmut_1"], equivalent_file=none
    )
    assert result["total"] == 1 and result["counts"]["killed"] == 1


@pytest.mark.slow
def test_sample_runs_a_seeded_draw_and_states_its_interval(tiny_run, tmp_path):
    """--teeth-sample: N mutants drawn with a seed from all of them; the same seed, the same draw;
    the result says what was sampled and the score's 95% interval, which holds the score."""
    root, _, full, _, _, _ = tiny_run
    none = write_equivalents(tmp_path / "none.toml", [])
    result = teeth.run_teeth(root, tmp_path / "w", sample=6, seed=3, equivalent_file=none)
    src = tmp_path / "w" / "src"
    assert result["total"] == 6 and result["counts"]["not run"] == 0
    assert result["sample"] == {"size": 6, "population": full["total"], "seed": 3}
    drawn = teeth.sample_names(src, ["tiny/calc.py"], 6, 3)
    assert drawn == teeth.sample_names(src, ["tiny/calc.py"], 6, 3) != teeth.sample_names(src, ["tiny/calc.py"], 6, 4)
    low, high = result["score_interval_95"]
    if result["score"] is not None:
        assert low <= result["score"] <= high
    assert any("a sample of 6 of" in line for line in teeth.report(result))
    with pytest.raises(teeth.TeethError, match="either a sample or mutant names"):
        teeth.run_teeth(root, tmp_path / "w", sample=2, only_mutants=["tiny.calc.x_scale__mutmut_1"])
