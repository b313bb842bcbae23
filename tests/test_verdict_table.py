"""The verdict table over real configurations (`tests/verdict_table.yaml`): the gate, run on each case
as a user runs it, must print exactly the table's verdicts, row by row, and its exit code.

The table is also checked for what it must cover: upstream's stable config folder with each of
upstream's two cycle configs, the packaged tiny and cluster configs, every parameterization x
schedule in full and random mode, float32 and bf16, a model of at least 50M parameters through the
proxy, and every setting the training loop reads at a non-default value in some case of the loop rows.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from compat.rows import NOT_RUN, ROWS, VERDICTS
from latentDLM_mmdit.settings import RunSettings
from latentDLM_mmdit.training import LOOP_KEYS, LoopSettings
from tests import upstream_files
from tests.verdict_table import load_table, run_case

TABLE = load_table()
ROW_IDS = [row.id for row in ROWS]
LOOP_ROWS = {"trajectories", "mixed_precision"}
# The loop's data folders come from the gate's --data-tokens / --data-latents (the upstream cases).
GIVEN_BY_THE_GATE = {"data.token_dir", "data.latent_dir"}


@pytest.fixture(scope="module")
def upstream_inputs(tmp_path_factory):
    """The tokenizer folder, data and .pt checkpoint a user of upstream holds (written once)."""
    return upstream_files.write_all(tmp_path_factory.mktemp("upstream"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TABLE))
def test_the_gate_prints_the_table(name, tmp_path, request):
    case = TABLE[name]
    upstream = request.getfixturevalue("upstream_inputs") if case.get("checkpoint") == "upstream" else None
    code, matrix, output = run_case(case, tmp_path, upstream)
    assert "Traceback" not in output, output[-3000:]
    got = {
        r["id"]: r["verdict"]
        for r in matrix["rows"]
        if not (r["verdict"] == NOT_RUN and r["not_run_kind"] == "not selected")
    }
    want = {row: verdict for row, (verdict, _reason) in case["verdicts"].items()}
    wrong = {
        row: f"got {got.get(row, 'not run')}, table {want.get(row, 'not listed')}: "
        + next((r["measured"][:400] for r in matrix["rows"] if r["id"] == row), "")
        for row in sorted(set(got) | set(want))
        if got.get(row) != want.get(row)
    }
    assert not wrong, f"{name}: the gate's verdicts differ from the table: {wrong}"
    assert code == case["exit"], f"{name}: exit {code}, the table says {case['exit']}\n{output[-2000:]}"


def test_every_case_lists_its_rows_with_a_verdict_and_a_reason():
    for name, case in TABLE.items():
        rows = ROW_IDS if case.get("rows", "all") == "all" else case["rows"]
        assert set(case["verdicts"]) == set(rows), f"{name}: verdicts for {sorted(case['verdicts'])}, rows {rows}"
        for row, entry in case["verdicts"].items():
            verdict, reason = entry
            assert verdict in VERDICTS and len(reason.split()) >= 3, f"{name}/{row}: {entry!r}"
        assert case["exit"] in (0, 1, 2), f"{name}: exit {case['exit']!r}"
        incompatible = any(v == "INCOMPATIBLE" for v, _ in case["verdicts"].values())
        assert (case["exit"] == 1) == incompatible, f"{name}: exit {case['exit']} with verdicts {case['verdicts']}"


def test_the_table_covers_the_configurations_users_gate():
    inputs = {(c["stable_config"], c["cycle_config"], str(c.get("checkpoint", "embedded"))) for c in TABLE.values()}
    for cycle in ("upstream:cluster", "upstream:default"):
        assert ("upstream:stable", cycle, "upstream") in inputs, f"no case of upstream's stable folder with {cycle}"
    assert any(c == "packaged:cycle" for _, c, _ in inputs) and any(c == "packaged:cycle_cluster" for _, c, _ in inputs)
    seen = set()
    for case in TABLE.values():
        overrides = case.get("cycle_overrides") or {}
        p, s = overrides.get("model.latent_parameterization"), overrides.get("model.latent_beta_schedule")
        seen.add((p, s, overrides.get("loss.latent_t_mode")))
    for p, s, mode in itertools.product(
        ("epsilon", "v_param", "x0"), ("cosine", "linear", "sigmoid"), ("full", "random")
    ):
        assert (p, s, mode) in seen, f"no case for {p} / {s} / latent_t_mode {mode}"
    dtypes = {str(dtype_of(case)) for case in TABLE.values()}
    assert {"fp32", "bf16"} <= dtypes, dtypes
    assert any(
        str(c.get("checkpoint", "")).startswith("random:") and int(c["checkpoint"][7:]) >= 50 for c in TABLE.values()
    )


def dtype_of(case) -> str:
    given = (case.get("cycle_overrides") or {}).get("training.dtype")
    if given is not None:
        return given
    from tests.verdict_table import CONFIGS

    return str(OmegaConf.load(CONFIGS[case["cycle_config"]]()).training.get("dtype", "fp32"))


def test_every_loop_setting_is_at_a_non_default_value_in_a_loop_case():
    defaults = OmegaConf.structured(RunSettings)
    changed = set()
    for case in TABLE.values():
        rows = ROW_IDS if case.get("rows", "all") == "all" else case["rows"]
        if not LOOP_ROWS & set(rows):
            continue
        for overrides in (case.get("stable_overrides") or {}, case.get("cycle_overrides") or {}):
            changed |= {k for k, v in overrides.items() if k in LOOP_KEYS and v != OmegaConf.select(defaults, k)}
    missing = sorted(set(LOOP_KEYS) - changed - GIVEN_BY_THE_GATE)
    assert not missing, f"loop settings no case of the loop rows changes from its default: {missing}"
    assert any(c.get("checkpoint") == "upstream" for c in TABLE.values()), "no case gives the loop data folders"


def test_loop_keys_are_what_the_loop_reads():
    """Each key of LOOP_KEYS changes LoopSettings when it changes (a key listed but unread fails)."""
    base = {
        "training": {"train_batch_size": 2, "num_train_steps": 10},
        "optimizer": {"lr": 1e-3},
        "tokenizer": {"vocab_size": 16, "mask_token_id": 15, "pad_token_id": 0},
        "model": {"latent_dim": 4},
    }
    other = {
        "training.seed": 3, "training.train_batch_size": 5, "training.num_train_steps": 20,
        "training.gradient_accumulation_steps": 3, "training.lr_schedule": "constant", "training.warmup_steps": 7,
        "training.ddp_timeout_minutes": 5.0, "training.mixed_precision": "bf16", "training.compile_model": True,
        "training.compile_backend": "eager", "optimizer.lr": 2e-3, "optimizer.weight_decay": 0.3,
        "optimizer.beta1": 0.5, "optimizer.beta2": 0.7, "optimizer.eps": 1e-3, "optimizer.grad_clip_norm": 0.3,
        "data.token_dir": "t", "data.latent_dir": "l", "data.num_workers": 3, "data.synthetic_seq_len": 9,
        "data.synthetic_num_samples": 33, "logging.run_name": "x", "logging.log_dir": "y", "logging.log_every": 4,
        "logging.save_every": 6, "loss.on_nonfinite": "raise",
    }  # fmt: skip
    assert set(other) == set(LOOP_KEYS)
    reference = LoopSettings.from_config(base)
    for key, value in other.items():
        config = OmegaConf.create(base)
        OmegaConf.update(config, key, value, force_add=True)
        if key == "training.compile_backend":
            OmegaConf.update(config, "training.compile_model", True, force_add=True)
            reference_for = LoopSettings.from_config(OmegaConf.merge(base, {"training": {"compile_model": True}}))
        else:
            reference_for = reference
        assert LoopSettings.from_config(config) != reference_for, f"LoopSettings ignores {key}"


def test_the_upstream_files_are_upstreams_with_the_model_shrunk():
    """Only model sizes differ from upstream's values the README states (hidden 1024, 24 blocks, ...)."""
    stable = OmegaConf.load(upstream_files.STABLE_CONFIG)
    cluster = OmegaConf.load(upstream_files.CYCLE_CONFIGS["cluster"])
    default = OmegaConf.load(upstream_files.CYCLE_CONFIGS["default"])
    assert (stable.training.dtype, stable.training.warmup_steps, stable.optimizer.lr) == ("bf16", 2000, 5e-5)
    assert (cluster.training.dtype, cluster.training.warmup_steps, cluster.loss.latent_t_mode) == ("bf16", 2000, "full")
    assert (cluster.loss.cycle_text_weight, cluster.loss.cycle_latent_weight, cluster.loss.cycle_text_ramp_steps) == (
        1.0,
        1.0,
        0,
    )
    assert (default.loss.latent_t_mode, default.training.dtype, default.loss.cycle_text_weight) == (
        "random",
        "fp32",
        1.0,
    )
    for config in (stable, cluster, default):
        assert (config.model.hidden_size, config.model.n_blocks, config.model.max_seq_len) == (64, 2, 128)
    assert Path(upstream_files.STABLE_CONFIG.parent / "optimizer" / "adam.yaml").is_file()
