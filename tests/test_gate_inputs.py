"""The gate on inputs a user really passes, good and bad: one exit-code contract, a written
matrix, one short error block, no traceback, nothing executed, every input file unchanged.

Each case runs `python -m compat` in a subprocess, as a user would.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compat.outcomes import GateInputError
from compat.inputs import resolve_device
from compat.rows import NOT_RUN, ROWS
from cycle_vae_impl.configs import config_path
from latentDLM_mmdit.checkpoints import save_checkpoint
from latentDLM_mmdit.config import load_config
from latentDLM_mmdit.data import write_upstream_format
from latentDLM_mmdit.factory import build_model
from latentDLM_mmdit.tokenizer import vocab_from_config
from tests.builders import tiny_batch

REPO = Path(__file__).resolve().parents[1]


def sha256_tree(paths: list[Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run_gate(tmp_path: Path, *args: str, timeout: int = 600) -> tuple[int, dict, str, str]:
    report = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "compat", "--report", str(report), "--quiet", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    matrix = json.loads((report / "compat-matrix.json").read_text())
    assert (report / "compat-matrix.md").read_text().startswith("# Compatibility matrix")
    return proc.returncode, matrix, proc.stdout, proc.stderr


def pytest_compat(cwd: Path, selection: str, *args: str) -> subprocess.CompletedProcess:
    """`pytest compat/ -k selection *args` as a CI job runs it, from `cwd`."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(REPO / "compat"), "-p", "no:cacheprovider", "-q", "-k", selection, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_could_not_check(code, matrix, stdout, stderr, *needles: str) -> None:
    assert code == 2, f"exit {code}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    assert "Traceback" not in stdout + stderr, (stdout + stderr)[-4000:]
    rows = {r["id"]: r for r in matrix["rows"]}
    assert set(rows) == {r.id for r in ROWS}
    assert all(r["verdict"] == NOT_RUN for r in rows.values()), {k: r["verdict"] for k, r in rows.items()}
    assert all(r["not_run_kind"] == "could not check" for r in rows.values())
    error = matrix["input_error"]
    assert error and error["problem"] and error["fix"], matrix
    block = stderr[stderr.index("compat gate: could not check") :]
    for needle in needles:
        assert needle in " ".join(block.split()), f"{needle!r} not in the error block:\n{block}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A checkpoint of the packaged tiny model and upstream-format data that fit it."""
    folder = tmp_path_factory.mktemp("tiny")
    config = load_config(config_path("cycle"))
    model = build_model(config, seed=0)
    checkpoint = save_checkpoint(folder / "tiny.safetensors", model, config=config, trainer_kind="stable", step=1)
    samples = tiny_batch(6, 20, int(config.model.latent_dim), 3, vocab_from_config(config))
    for i in range(6):  # padded tails of different lengths, the longest real sample 15 tokens
        samples["attention_mask"][i, 15 - i :] = 0
    tokens, latents = write_upstream_format(folder / "data", samples)
    return {"checkpoint": checkpoint, "tokens": tokens, "latents": latents, "config": config}


def _evil_pickle(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "state": Payload()}, path)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_CHECKPOINTS = {
    "missing": (lambda d, t: d / "nope.pt", ("nope.pt",)),
    "empty": (lambda d, t: _write(d / "empty.safetensors", b""), ("empty.safetensors",)),
    "truncated": (
        lambda d, t: _write(d / "cut.safetensors", t["checkpoint"].read_bytes()[:5000]),
        ("cut.safetensors",),
    ),
    "header_bomb": (
        lambda d, t: _write(d / "bomb.safetensors", (10**15).to_bytes(8, "little") + b"{}"),
        ("bomb.safetensors",),
    ),
    "random_bytes": (lambda d, t: _write(d / "noise.pt", os.urandom(4096)), ("noise.pt",)),
    "plain_directory": (lambda d, t: (d / "folder").mkdir() or d / "folder", ("folder",)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS), ids=list(BAD_CHECKPOINTS))
def test_bad_checkpoint_exits_2_and_names_the_file(tmp_path, tiny, case):
    make, needles = BAD_CHECKPOINTS[case]
    path = make(tmp_path, tiny)
    before = sha256_tree([path]) if path.exists() else {}
    assert_could_not_check(*run_gate(tmp_path, "--checkpoint", str(path)), *needles)
    assert (sha256_tree([path]) if path.exists() else {}) == before


@pytest.mark.slow
def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / "evil.pt"
    _evil_pickle(path, marker)
    before = sha256_tree([path])
    code, matrix, stdout, stderr = run_gate(tmp_path, "--checkpoint", str(path))
    assert_could_not_check(code, matrix, stdout, stderr, "evil.pt")
    assert not marker.exists(), "the pickle's payload ran"
    assert "weights_only=False" not in stdout + stderr, "never advise loading a foreign file with weights_only=False"
    assert sha256_tree([path]) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, needles",
    [
        (["--data-latents", "{latents}"], ["--data-latents", "--data-tokens"]),
        (["--batch-size", "1"], ["--batch-size"]),
        (["--no-such-option"], ["--no-such-option"]),
        (["--cycle-config", "{missing}"], ["--cycle-config", "missing.yaml"]),
        (["--compile-backend", "indcutor"], ["--compile-backend", "indcutor", "aot_eager"]),
        (["--compile-scope", "model"], ["--compile-scope", "trainer"]),
        (["--gpu-memory", "80"], ["--gpu-memory", "has no unit", "80GiB"]),
        (["--gpu-memory", "80 GiBs"], ["--gpu-memory", "unknown unit", "80GiB"]),
        (["--gpu-tflops", "0"], ["--gpu-tflops", "989"]),
        (["--", "-k", "l2t", "--compat-batch-size=3"], ["--compat-batch-size after --", "--batch-size VALUE"]),
    ],
    ids=[
        "half-data-options",
        "batch-of-one",
        "unknown-option",
        "missing-config",
        "compile-backend-typo",
        "compile-scope",
        "gpu-memory-without-unit",
        "gpu-memory-unknown-unit",
        "gpu-tflops-zero",
        "pytest-spelling-after-dashes",
    ],
)
def test_usage_errors_exit_2_with_the_matrix_written(tmp_path, tiny, args, needles):
    args = [a.format(latents=tiny["latents"], missing=tmp_path / "missing.yaml") for a in args]
    assert_could_not_check(*run_gate(tmp_path, *args), *needles)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_exits_2(tmp_path):
    assert_could_not_check(*run_gate(tmp_path, "--device", "cuda"), "CUDA is not available", "--device cpu")


def _corrupt_npz(tokens: Path) -> Path:
    bad = sorted(tokens.glob("*.npz"))[1]
    bad.write_bytes(b"not a zip archive")
    return bad


def _object_npz(tokens: Path) -> Path:
    bad = sorted(tokens.glob("*.npz"))[2]
    ids = np.empty(20, dtype=object)
    ids[:] = [1] * 20
    np.savez(bad, input_ids=ids, attention_mask=np.ones(20, dtype=np.int64))
    return bad


def _zero_mask(tokens: Path) -> Path:
    bad = sorted(tokens.glob("*.npz"))[0]
    with np.load(bad) as archive:
        ids = archive["input_ids"]
    np.savez(bad, input_ids=ids, attention_mask=np.zeros_like(ids))
    return bad


def _out_of_vocab(tokens: Path) -> Path:
    bad = sorted(tokens.glob("*.npz"))[3]
    with np.load(bad) as archive:
        mask = archive["attention_mask"]
    np.savez(bad, input_ids=np.full_like(mask, 30439), attention_mask=mask)
    return bad


@pytest.mark.slow
@pytest.mark.parametrize(
    "spoil, needle",
    [
        (_corrupt_npz, "cannot be read"),
        (_object_npz, "input_ids"),
        (_zero_mask, "all-zero attention_mask"),
        (_out_of_vocab, "30439"),
    ],
    ids=["corrupt-npz", "object-array", "all-zero-mask", "id-outside-vocab"],
)
def test_bad_data_exits_2_naming_the_file(tmp_path, tiny, spoil, needle):
    data = tmp_path / "data"
    tokens, latents = data / "tokens", data / "latents"
    import shutil

    shutil.copytree(tiny["tokens"], tokens)
    shutil.copytree(tiny["latents"], latents)
    bad = spoil(tokens)
    before = sha256_tree([data, tiny["checkpoint"]])
    code, matrix, stdout, stderr = run_gate(
        tmp_path, "--checkpoint", str(tiny["checkpoint"]), "--data-tokens", str(tokens), "--data-latents", str(latents)
    )
    assert_could_not_check(code, matrix, stdout, stderr, bad.name, needle)
    assert sha256_tree([data, tiny["checkpoint"]]) == before


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("gpu0", "is not a device"),
        ("mps", "only cpu and cuda"),
        (f"cuda:{torch.cuda.device_count() + 7}", "CUDA"),  # not available here, or past the last device
    ],
    ids=["malformed", "other-backend", "cuda-missing-or-past-last"],
)
def test_device_refusals_name_the_device(spec, needle):
    with pytest.raises(GateInputError, match=needle) as caught:
        resolve_device(spec)
    assert spec in caught.value.problem and "--device" in caught.value.fix + caught.value.problem


@pytest.mark.slow
def test_the_session_checks_the_gates_own_options_relative_paths_included(tmp_path, tiny):
    """The gate hands its parsed options to the session as one object (no argv round trip): a path
    relative to where the gate runs, and a non-default number, reach the rows as given."""
    relative = os.path.relpath(tiny["checkpoint"], tmp_path)
    assert not Path(relative).is_absolute()
    code, matrix, stdout, stderr = run_gate(
        tmp_path, "--checkpoint", relative, "--batch-size", "3", "--", "-k", "forward_contract"
    )
    assert code == 0, stdout[-3000:] + stderr[-2000:]
    assert matrix["context"]["batch"].startswith("3 x "), matrix["context"]
    assert Path(matrix["context"]["checkpoint"].split(" ")[0]).name == Path(tiny["checkpoint"]).name, matrix["context"]


@pytest.mark.slow
def test_seq_len_follows_the_data_so_padding_is_checked(tmp_path, tiny):
    code, matrix, stdout, stderr = run_gate(
        tmp_path,
        "--checkpoint",
        str(tiny["checkpoint"]),
        "--data-tokens",
        str(tiny["tokens"]),
        "--data-latents",
        str(tiny["latents"]),
        "--",
        "-k",
        "forward_contract",
    )
    assert code == 0, stdout[-3000:] + stderr[-2000:]
    assert "15 tokens (the longest real length" in matrix["context"]["batch"], matrix["context"]
    row = next(r for r in matrix["rows"] if r["id"] == "forward_contract")
    assert row["verdict"] == "OK", row
    assert "padding_leak=none" in row["measured"]


@pytest.mark.slow
def test_configs_differing_only_in_dtype_are_reported_as_that(tmp_path, tiny):
    from omegaconf import OmegaConf

    stable = tmp_path / "stable_bf16.yaml"
    OmegaConf.save(load_config(config_path("stable"), ["training.dtype=bf16"]), stable)
    code, matrix, stdout, stderr = run_gate(
        tmp_path,
        "--stable-config",
        str(stable),
        "--",
        "-k",
        "config_resolution or latent_loss_form or t2l_latent_timestep or pretrained_checkpoint",
    )
    rows = {r["id"]: r for r in matrix["rows"]}
    assert code == 0, stdout[-3000:] + stderr[-2000:]
    assert not [r for r in rows.values() if r["verdict"] == "INCOMPATIBLE"]
    assert rows["config_resolution"]["verdict"] == "REVIEW"
    assert "the stable config trains in bf16, the cycle config in fp32" in rows["config_resolution"]["measured"]


@pytest.mark.slow
def test_nonfinite_weights_are_named_and_block_the_rows_that_use_them(tmp_path, tiny):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(tiny["checkpoint"]), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(tiny["checkpoint"]))
    tensors["latent_head.0.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    code, matrix, stdout, stderr = run_gate(tmp_path, "--checkpoint", str(path))
    rows = {r["id"]: r for r in matrix["rows"]}
    assert code == 1, stdout[-3000:] + stderr[-2000:]
    assert "Traceback" not in stdout + stderr
    assert rows["pretrained_checkpoint"]["verdict"] == "INCOMPATIBLE"
    assert "latent_head.0.weight (1 of" in rows["pretrained_checkpoint"]["measured"]
    incompatible = sorted(r for r, v in rows.items() if v["verdict"] == "INCOMPATIBLE")
    assert incompatible == ["pretrained_checkpoint"], {
        r: v["measured"][:200] for r, v in rows.items() if v["verdict"] == "INCOMPATIBLE"
    }
    blocked = [r for r, v in rows.items() if v["verdict"] == "NOT RUN"]
    assert "l2t_masking" in blocked and all(rows[r]["not_run_kind"] == "blocked" for r in blocked)
    assert all("non-finite" in rows[r]["measured"] for r in blocked)


@pytest.mark.slow
def test_pytest_junitxml_carries_each_rows_verdict_and_measured_values(tmp_path):
    import xml.etree.ElementTree as ET

    xml_path = tmp_path / "report.xml"
    proc = pytest_compat(
        tmp_path,
        "l2t_masking or none_timesteps",
        f"--junitxml={xml_path}",
        f"--compat-report={tmp_path / 'compat-report'}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "INTERNALERROR" not in proc.stdout + proc.stderr
    root = ET.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    suite_props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert suite_props["compat.l2t_masking.verdict"] == "OK"
    assert suite_props["compat.none_timesteps.verdict"] == "OK"
    assert suite_props["compat.ddp.verdict"] == "NOT RUN"
    assert "B4_l2t_loss_stable=" in suite_props["compat.l2t_masking.measured"]
    case_props = {
        p.get("name"): p.get("value")
        for case in suite.iter("testcase")
        if "l2t_masking" in case.get("classname", "") + case.get("name", "")
        for p in case.iter("property")
    }
    assert "measured.B4_l2t_loss_stable" in case_props, case_props
    # The pytest path writes the report (its JSON with the exit code the run ends with), names the
    # page in JUnit and prints the gate's summary at the end.
    page = Path(suite_props["compat.report.html"])
    assert page == (tmp_path / "compat-report" / "index.html").resolve() and page.is_file()
    matrix = json.loads((tmp_path / "compat-report" / "compat-matrix.json").read_text())
    assert matrix["exit_code"] == 0
    last = proc.stdout.strip().splitlines()
    summary = f"compat gate: no incompatible row; {len(ROWS) - 2} of {len(ROWS)} rows not selected (-k; 2 ran) (exit 0)"
    assert summary in last[-3:], last[-30:]
    assert any(line.split()[:2] == ["l2t_masking", "OK"] for line in last), last[-30:]


def test_every_unusable_data_sample_is_named(tmp_path, tiny):
    """Three over-long samples: each file named (not only the first), with the count."""
    import shutil

    from compat.inputs import read_data_samples
    from compat.options import CompatOptions

    data = tmp_path / "data"
    tokens, latents = data / "tokens", data / "latents"
    shutil.copytree(tiny["tokens"], tokens)
    shutil.copytree(tiny["latents"], latents)
    files = sorted(tokens.glob("*.npz"))
    long = int(tiny["config"].model.max_seq_len) + 8
    for bad in files[:3]:
        np.savez(bad, input_ids=np.full(long, 5), attention_mask=np.ones(long, dtype=np.int64))
    options = CompatOptions(data_tokens=str(tokens), data_latents=str(latents))
    with pytest.raises(GateInputError) as info:
        read_data_samples(options, vocab_from_config(tiny["config"]), int(tiny["config"].model.max_seq_len), 16)
    problem = info.value.problem
    assert problem.startswith("data: 3 of the first 6 samples cannot be used")
    assert all(bad.name in problem for bad in files[:3]), problem
    assert problem.count("exceeds model.max_seq_len") == 3


@pytest.mark.slow
def test_pytest_on_a_users_inputs_leaves_the_planted_defects_out(tmp_path, tiny):
    """The planted defects prove the rows' teeth on the embedded default; on a user's checkpoint they
    are not run and never decide the exit code (a compatible user's CI is green, its JSON has the code)."""
    report = tmp_path / "compat-report"
    proc = pytest_compat(
        tmp_path,
        "l2t_masking or upstream_defect_1 or partial_l2t_mask",
        f"--compat-checkpoint={tiny['checkpoint']}",
        f"--compat-report={report}",
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "planted-defect tests not run" in output and "test_mutant_is_caught" not in output
    matrix = json.loads((report / "compat-matrix.json").read_text())
    assert matrix["exit_code"] == 0 and not matrix["kills"]
    assert {r["id"]: r["verdict"] for r in matrix["rows"]}["l2t_masking"] == "OK"
