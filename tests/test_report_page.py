"""The report page as a person sees it: `compat-report/index.html` opened in a real headless
Chromium (Debian's `chromium`; `.ci/run` installs it), for a passing run, an incompatible run (a
planted defect) and two runs that could not check. From the page's DOM: every row of `rows.py` is
there with the JSON's verdict, every figure loaded with a non-zero size, no request left the
machine; each page's screenshot is written beside it (`screenshot.png`; with $COMPAT_SCREENSHOT_DIR
also copied there, to look at).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from compat.figures import FIGURES
from compat.report import render_html
from compat.rows import INCOMPATIBLE, NOT_RUN, ROWS
from tests.chromium import Chromium, find_chromium, unavailable_reason
from tests.test_report import every_figure_data, matrix, with_resources

REPO = Path(__file__).resolve().parents[1]
FIGURE_ROWS = "t2l_latent_timestep or x0_reconstruction or gradient_flow or recommended_settings"
# The gate under a planted defect (compat/mutants.py): the patches hold for the whole in-process run.
MUTANT_GATE = (
    "import sys\n"
    "from compat.gate import main\n"
    "from compat.mutants import MUTANTS\n"
    "mutant = next(m for m in MUTANTS if m.name == sys.argv[1])\n"
    "with mutant.apply():\n"
    "    code = main(sys.argv[2:])\n"
    "sys.exit(code)\n"
)


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        pytest.skip(unavailable_reason())
    with Chromium(binary) as chromium:
        yield chromium


def run_gate(folder: Path, *args: str, mutant: str | None = None) -> tuple[int, dict, str, str]:
    report = folder / "compat-report"
    prefix = [sys.executable, "-c", MUTANT_GATE, mutant] if mutant else [sys.executable, "-m", "compat"]
    proc = subprocess.run(
        [*prefix, "--report", str(report), *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-4000:]
    return proc.returncode, json.loads((report / "compat-matrix.json").read_text()), proc.stdout, proc.stderr


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def look(browser: Chromium, page: Path, name: str):
    """Visits the page, writes its screenshot beside it (and to $COMPAT_SCREENSHOT_DIR)."""
    shot = page.parent / "screenshot.png"
    visit = browser.visit(page, screenshot=shot)
    width, height = png_size(shot)
    assert width == browser.width and height >= min(visit.facts["page_height"], 16000) - 2, (width, height)
    if os.environ.get("COMPAT_SCREENSHOT_DIR"):
        target = Path(os.environ["COMPAT_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / f"{name}.png")
    return visit


def assert_page_shows(visit, matrix_json: dict, min_figures: int) -> None:
    """Every row with the JSON's verdict, every figure loaded with a size, nothing fetched."""
    facts = visit.facts
    on_page = {r["id"]: r for r in facts["rows"]}
    in_json = {r["id"]: r for r in matrix_json["rows"]}
    assert set(on_page) >= {r.id for r in ROWS}, sorted({r.id for r in ROWS} - set(on_page))
    for row_id, row in in_json.items():
        shown = on_page[row_id]
        assert shown["verdict"] == row["verdict"], (row_id, shown, row["verdict"])
        assert row["verdict"] in shown["badge"] and shown["badge_label"] == f"verdict {row['verdict']}", shown
        assert shown["finding"] == row["finding"] and shown["height"] > 0, shown
        assert shown["checks"] == len(row["tests"]), shown
    assert facts["exit_line"] == matrix_json["summary"]["exit_line"]
    images = facts["images"]
    assert len(images) >= min_figures, images
    for image in images:
        assert image["complete"] and image["decoded"] and image["scheme"] == "data", image
        assert image["natural_width"] > 0 and image["width"] > 200 and image["height"] > 100, image
        assert image["caption"] and "Look for" in image["caption"], image
    assert facts["scripts"] == 0 and facts["external"] == 0, facts
    assert visit.left_the_machine() == [], visit.left_the_machine()
    assert visit.errors == [], visit.errors


@pytest.mark.slow
def test_page_of_a_passing_run(tmp_path, browser):
    code, matrix_json, stdout, _ = run_gate(tmp_path, "--", "-k", FIGURE_ROWS)
    assert code == 0, stdout[-3000:]
    page = tmp_path / "compat-report" / "index.html"
    visit = look(browser, page, "exit0")
    assert_page_shows(visit, matrix_json, min_figures=4)
    drawn = {image["figure"] for image in visit.facts["images"]}
    assert {"fig-t2l_timesteps", "fig-x0_gain", "fig-gradient_flow", "fig-cycle_weights"} <= drawn, drawn
    ran = [r for r in visit.facts["rows"] if r["verdict"] != NOT_RUN]
    assert {r["id"] for r in ran} == set(FIGURE_ROWS.split(" or ")), ran
    assert f"{len(ROWS) - 4} of {len(ROWS)} rows not selected" in visit.facts["exit_line"]


@pytest.mark.slow
def test_page_of_an_incompatible_run(tmp_path, browser):
    code, matrix_json, stdout, _ = run_gate(tmp_path, "--", "-k", "t2l_latent_timestep", mutant="random_latent_t")
    assert code == 1, stdout[-3000:]
    visit = look(browser, tmp_path / "compat-report" / "index.html", "exit1")
    assert_page_shows(visit, matrix_json, min_figures=1)
    row = next(r for r in visit.facts["rows"] if r["id"] == "t2l_latent_timestep")
    assert row["verdict"] == INCOMPATIBLE and "latent t != 1" in row["finding"], row
    assert "t2l_latent_timestep" in visit.facts["exit_line"] and "(exit 1)" in visit.facts["exit_line"]
    assert any(image["figure"] == "fig-t2l_timesteps" for image in visit.facts["images"])
    # The summary printed: the row's one line carries the finding; the exit line names the row.
    line = next(line for line in stdout.splitlines() if " t2l_latent_timestep " in line)
    assert INCOMPATIBLE in line and "latent t != 1" in line
    assert stdout.rstrip().endswith("(exit 1)")


@pytest.mark.slow
def test_page_of_a_run_with_a_bad_checkpoint_path(tmp_path, browser):
    code, matrix_json, stdout, stderr = run_gate(tmp_path, "--checkpoint", str(tmp_path / "nope.pt"))
    assert code == 2, stdout + stderr
    visit = look(browser, tmp_path / "compat-report" / "index.html", "exit2-missing")
    assert_page_shows(visit, matrix_json, min_figures=0)
    assert all(r["verdict"] == NOT_RUN for r in visit.facts["rows"])
    assert "nope.pt" in visit.facts["problem"] and "Fix:" in visit.facts["problem"], visit.facts["problem"]
    assert visit.facts["images"] == []


@pytest.mark.slow
def test_a_run_that_cannot_read_its_checkpoint_shows_only_its_problem(tmp_path, browser):
    """The checkpoint is read inside the pytest session: still no progress dots, no pytest warning
    summary before the problem block, and a page that names the file."""
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    code, matrix_json, stdout, stderr = run_gate(tmp_path, "--checkpoint", str(noise))
    assert code == 2, stdout + stderr
    assert "checking" not in stdout and not any(
        set(line.strip()) <= set(".sF") and line.strip() for line in stdout.splitlines()
    ), stdout
    assert "warnings summary" not in stdout + stderr and "passed" not in stdout, stdout
    assert stderr.lstrip().startswith("compat gate: could not check (exit 2)") and "noise.pt" in stderr, stderr
    assert (tmp_path / "compat-report" / "pytest-output.txt").exists()
    visit = look(browser, tmp_path / "compat-report" / "index.html", "exit2-unreadable")
    assert_page_shows(visit, matrix_json, min_figures=0)
    assert "noise.pt" in visit.facts["problem"]


def test_page_with_every_figure(tmp_path, browser):
    """Rendered from a matrix holding every figure's data (the resources row's too)."""
    made = with_resources(matrix(every_figure_data(), 0, default=lambda row_id: []))
    page = tmp_path / "compat-report" / "index.html"
    page.parent.mkdir()
    from compat.report import write_report

    write_report(page.parent, made)
    visit = look(browser, page, "every-figure")
    assert_page_shows(visit, json.loads((page.parent / "compat-matrix.json").read_text()), min_figures=len(FIGURES))
    assert [image["figure"] for image in visit.facts["images"]] == [f"fig-{figure_id}" for figure_id, *_ in FIGURES]


def test_the_browser_sees_a_request_that_would_leave(tmp_path, browser):
    """The detector itself: a page fetching from the network is caught, with and without a CSP."""
    leaky = tmp_path / "leaky.html"
    leaky.write_text('<!doctype html><html><body><img src="http://compat-test.invalid/x.png"></body></html>')
    assert any("compat-test.invalid" in u for u in browser.visit(leaky).left_the_machine())
    page = render_html(matrix({}, 0)).replace("</body>", '<img src="https://compat-test.invalid/y.png"></body>')
    guarded = tmp_path / "guarded.html"
    guarded.write_text(page)
    assert browser.visit(guarded).left_the_machine(), "a load the CSP refused is still a request the page made"
