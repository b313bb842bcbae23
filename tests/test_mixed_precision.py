"""training.mixed_precision in the shared loop: the forward really runs under autocast (the model's
outputs are in the autocast dtype, the weights stay float32), bf16 losses stay near float32, fp16
carries its GradScaler through the train state (bit-exact resume), and bad values are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from compat.oracle import tol
from cycle_vae_impl.configs import config_path
from cycle_vae_impl.entrypoints.train_cycle_vae import CYCLE
from latentDLM_mmdit.checkpoints import load_train_state
from latentDLM_mmdit.config import ConfigError, load_config
from latentDLM_mmdit.precision import LossScaler, autocast, autocast_dtype
from latentDLM_mmdit.train_stable import STABLE
from latentDLM_mmdit.training import TrainingError, run_training

TINY = [
    "model.n_blocks=1",
    "model.hidden_size=32",
    "model.cond_dim=32",
    "training.train_batch_size=2",
    "data.synthetic_num_samples=16",
    "data.synthetic_seq_len=8",
    "logging.log_every=100",
]


def config(kind: str, *overrides: str):
    return load_config(config_path(kind), [*TINY, *overrides])


def train(tmp_path, name, kind="stable", *overrides, **kwargs):
    entry = STABLE if kind == "stable" else CYCLE
    return run_training(
        config(kind, *overrides),
        trainer=entry,
        output_dir=tmp_path / name,
        synthetic=True,
        progress=False,
        device="cpu",
        **kwargs,
    )


class OutputDtypes:
    """Records the dtype of the model's first output on every forward."""

    def __init__(self):
        self.seen: set[torch.dtype] = set()

    def __call__(self, module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        self.seen.add(first.dtype)


@pytest.fixture
def output_dtypes(monkeypatch):
    from latentDLM_mmdit.models import multimodal_mmdit

    recorder = OutputDtypes()
    original = multimodal_mmdit.MultimodalMMDiT.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.register_forward_hook(recorder)

    monkeypatch.setattr(multimodal_mmdit.MultimodalMMDiT, "__init__", init)
    return recorder


@pytest.mark.parametrize("kind", ["stable", "cycle"])
def test_bf16_forward_runs_under_autocast_and_stays_near_float32(tmp_path, output_dtypes, kind):
    fp32 = train(tmp_path, "fp32", kind, "training.num_train_steps=2")
    assert output_dtypes.seen == {torch.float32}
    output_dtypes.seen.clear()
    bf16 = train(tmp_path, "bf16", kind, "training.num_train_steps=2", "training.mixed_precision=bf16")
    assert output_dtypes.seen == {torch.bfloat16}, f"the {kind} forward did not run under bf16 autocast"
    weights = load_file(bf16.checkpoints[-1])
    assert {t.dtype for t in weights.values()} == {torch.float32}, "autocast must not change the weights"
    got = torch.tensor([r["loss"] for r in bf16.metrics])
    want = torch.tensor([r["loss"] for r in fp32.metrics])
    assert not torch.equal(got, want), "bf16 gave exactly the float32 losses: autocast was not exercised"
    torch.testing.assert_close(got, want, **tol("bfloat16"))


def test_fp16_scaler_state_is_saved_and_resume_is_bit_exact(tmp_path):
    steps = ["training.num_train_steps=4", "logging.save_every=2", "training.mixed_precision=fp16"]
    full = train(tmp_path, "full", "stable", *steps)
    assert all("amp_skipped" in r for r in full.metrics)
    state = load_train_state(full.checkpoints[0])
    assert state["grad_scaler"]["scale"] > 0, "the fp16 train state carries the GradScaler"
    first = train(tmp_path, "first", "stable", *steps, stop_at_step=2)
    resumed = train(tmp_path, "resumed", "stable", *steps, resume=first.checkpoints[-1])
    assert [r["loss"] for r in resumed.metrics] == [r["loss"] for r in full.metrics[2:]]
    want, got = load_file(full.checkpoints[-1]), load_file(resumed.checkpoints[-1])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_fp16_resume_from_a_run_without_a_scaler_is_refused(tmp_path):
    first = train(tmp_path, "first", "stable", "training.num_train_steps=2")
    with pytest.raises(TrainingError, match="no fp16 loss-scaler state"):
        train(
            tmp_path,
            "resumed",
            "stable",
            "training.num_train_steps=4",
            "training.mixed_precision=fp16",
            resume=first.checkpoints[-1],
        )


def test_bad_mixed_precision_is_refused_by_the_schema(tmp_path):
    with pytest.raises(ConfigError, match="valid: no, bf16, fp16"):
        config("stable", "training.mixed_precision=fp8")
    assert config("stable", "training.mixed_precision=no").training.mixed_precision == "no"
    # YAML 1.1 reads an unquoted `no` as false: refused with the fix, never taken as a default.
    text = config_path("stable").read_text().replace('mixed_precision: "no"', "mixed_precision: no")
    (tmp_path / "unquoted.yaml").write_text(text)
    with pytest.raises(ConfigError, match="quote it"):
        load_config(tmp_path / "unquoted.yaml", TINY)


def test_precision_helpers():
    assert autocast_dtype("no") is None and autocast_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="valid: no, bf16, fp16"):
        autocast_dtype("float16")
    with autocast("bf16", "cpu"):
        assert torch.get_autocast_dtype("cpu") is torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with autocast("no", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    assert not LossScaler("bf16", "cpu").enabled and LossScaler("fp16", "cpu").enabled


def test_losses_of_low_precision_outputs_are_reduced_in_float32():
    """Under autocast the model's outputs are bfloat16; the shared loss helpers reduce them in
    float32 (a bfloat16 mean drifts ~1e-3), and return float32."""
    from latentDLM_mmdit.losses import masked_text_ce, normalized_latent_mse

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 16, 50, generator=gen).bfloat16()
    ids = torch.randint(0, 50, (4, 16), generator=gen)
    mask = torch.ones(4, 16, dtype=torch.bool)
    pred, target = torch.randn(4, 1, 64, generator=gen).bfloat16(), torch.randn(4, 64, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, mse = masked_text_ce(logits, ids, mask), normalized_latent_mse(pred, target)
    assert ce.dtype == mse.dtype == torch.float32
    want_ce = torch.nn.functional.cross_entropy(logits.double().reshape(-1, 50), ids.reshape(-1))
    p64 = torch.nn.functional.normalize(pred.double().reshape(4, 64), dim=-1)
    t64 = torch.nn.functional.normalize(target.double(), dim=-1)
    torch.testing.assert_close(ce.double(), want_ce, **tol("float32_arithmetic"))
    torch.testing.assert_close(mse.double(), ((p64 - t64) ** 2).mean(), **tol("float32_arithmetic"))
