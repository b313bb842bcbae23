"""Non-finite steps in the shared training loop (loss.on_nonfinite): a step whose every loss term is
non-finite, or whose gradient norm is, is skipped under `upstream` (optimizer untouched, counted in
the metrics) and stops the run with an error naming the step and the term under `raise`;
metrics.jsonl stays strict JSON (null plus `nonfinite_values`)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from cycle_vae_impl.configs import config_path
from latentDLM_mmdit.checkpoints import load_train_state
from latentDLM_mmdit.config import load_config
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.train_stable import STABLE
from latentDLM_mmdit.training import TrainingError, cli_main, metrics_line, run_training

TINY = ["model.n_blocks=1", "model.hidden_size=32", "model.cond_dim=32"]
STEPS = 3
POISONED = 1  # 0-based: the second optimizer step, global step 2


class _NanGradient(torch.autograd.Function):
    """0 in the forward pass, NaN gradients in the backward pass: a finite loss, non-finite grads."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("nan"), dtype=grad.dtype)


class NanLatents(MultimodalDiffusionTrainer):
    """The stable trainer with NaN latents at step POISONED: every loss term is non-finite, so the
    trainer returns a constant without a graph."""

    def forward(self, batch, step=None, draws=None):
        if step == POISONED:
            batch = {**batch, "latent": torch.full_like(batch["latent"], float("nan"))}
        return super().forward(batch, step=step, draws=draws)


class NanGradients(MultimodalDiffusionTrainer):
    """The stable trainer whose loss at step POISONED is finite but has NaN gradients."""

    def forward(self, batch, step=None, draws=None):
        loss, metrics = super().forward(batch, step=step, draws=draws)
        if step == POISONED:
            shared = self.model.get_submodule("conditioning.combine.0").bias  # trained in every mode
            loss = loss + _NanGradient.apply(shared)
        return loss, metrics


def _config(*overrides):
    return load_config(
        config_path("stable"),
        TINY + [f"training.num_train_steps={STEPS}", "logging.save_every=1", "training.warmup_steps=0", *overrides],
    )


def _run(tmp_path, trainer_cls, *overrides):
    entry = dataclasses.replace(STABLE, trainer_cls=trainer_cls)
    return run_training(
        _config(*overrides), trainer=entry, output_dir=tmp_path / "run", synthetic=True, progress=False, device="cpu"
    )


def _strict_lines(path):
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _weights(run, step):
    return load_file(str(run.output_dir / "checkpoints" / f"step_{step:08d}.safetensors"))


@pytest.mark.parametrize(
    "trainer_cls, reason", [(NanLatents, "every loss term non-finite"), (NanGradients, "non-finite gradient norm")]
)
def test_upstream_skips_the_step(tmp_path, trainer_cls, reason):
    run = _run(tmp_path, trainer_cls)
    records = _strict_lines(run.metrics_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["skipped_nonfinite_steps"] for r in records] == [0, 1, 1]
    assert "skipped" not in records[0] and "skipped" not in records[2]
    assert reason in records[1]["skipped"]
    # The optimizer did not step: the weights and the AdamW state of step 2 are those of step 1 ...
    before, after, later = (_weights(run, s) for s in (1, 2, 3))
    for key in before:
        assert torch.equal(before[key], after[key]), key
    state_1 = load_train_state(run.checkpoints[0])["optimizer"]["state"]
    state_2 = load_train_state(run.checkpoints[1])["optimizer"]["state"]
    assert state_1.keys() == state_2.keys()
    for index in state_1:
        for name, value in state_1[index].items():
            assert torch.equal(value, state_2[index][name]), (index, name)
    # ... and step 3 trained again (finite weights that moved).
    assert any(not torch.equal(after[k], later[k]) for k in after)
    assert all(torch.isfinite(v).all() for v in later.values())
    assert load_train_state(run.checkpoints[-1])["skipped_nonfinite_steps"] == 1


def test_nonfinite_grad_norm_is_null_and_flagged(tmp_path):
    run = _run(tmp_path, NanGradients)
    records = _strict_lines(run.metrics_path)
    assert records[1]["grad_norm"] is None and records[1]["nonfinite_values"] == {"grad_norm": "nan"}
    assert math.isfinite(records[0]["grad_norm"]) and "nonfinite_values" not in records[0]
    assert math.isnan(run.metrics[1]["grad_norm"])  # the returned history keeps the value


@pytest.mark.parametrize(
    "trainer_cls, term", [(NanLatents, "non-finite text_loss"), (NanGradients, "non-finite gradient norm")]
)
def test_raise_names_the_step_and_the_term(tmp_path, trainer_cls, term):
    with pytest.raises(TrainingError, match=f"step 2: .*{term}") as caught:
        _run(tmp_path, trainer_cls, "loss.on_nonfinite=raise", "loss.loss_type=l2t")
    assert "loss.on_nonfinite=raise" in str(caught.value)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # step 1 was recorded, step 2 was not


def test_raise_is_a_one_line_cli_error(tmp_path, capsys):
    entry = dataclasses.replace(STABLE, trainer_cls=NanLatents)
    code = cli_main(
        entry,
        [
            "--synthetic",
            "--no-progress",
            "--device",
            "cpu",
            "--output-dir",
            str(tmp_path / "o"),
            *TINY,
            "training.num_train_steps=3",
            "loss.on_nonfinite=raise",
        ],
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: step 2: ") and "non-finite" in err[0], err


def test_metrics_line_is_strict_json():
    record = {
        "step": 3,
        "loss": float("nan"),
        "lr": 1e-3,
        "parts": {"a": float("-inf"), "b": 1.5},
        "terms": [float("inf"), 2.0],
        "mode": "l2t",
    }
    line = metrics_line(record)
    parsed = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))
    assert parsed == {
        "step": 3,
        "loss": None,
        "lr": 1e-3,
        "parts": {"a": None, "b": 1.5},
        "terms": [None, 2.0],
        "mode": "l2t",
        "nonfinite_values": {"loss": "nan", "parts.a": "-inf", "terms[0]": "inf"},
    }
    finite = {"step": 1, "loss": 0.25, "nonfinite": ["text_loss"]}
    assert metrics_line(finite) == json.dumps(finite)


def test_without_clipping_the_gradient_norm_is_still_checked(tmp_path):
    run = _run(tmp_path, NanGradients, "optimizer.grad_clip_norm=0.0")
    assert "non-finite gradient norm" in run.metrics[1]["skipped"]
    assert math.isfinite(run.metrics[0]["grad_norm"]) and run.metrics[0]["grad_norm"] > 0
