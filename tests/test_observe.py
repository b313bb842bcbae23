"""The observation layer of the suite: model passes named by what they are given, random draws
captured from torch / Python / NumPy and replayed, trainer classes loaded from a SPEC."""

from __future__ import annotations

import random
import textwrap

import numpy as np
import pytest
import torch

from compat.draw_capture import DrawCapture, DrawReplayError
from compat.observe import CYCLE_LATENT, CYCLE_TEXT, L2T, MASKED, T2L, PassRecorder, classify_passes
from compat.outcomes import GateInputError
from compat.trainer_spec import TrainerSpec
from cycle_vae_impl.configs import config_path
from cycle_vae_impl.trainers.cycle_vae_trainer import CycleVAETrainer
from latentDLM_mmdit.config import load_config
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.factory import build_model, dtype_from_config
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.tokenizer import vocab_from_config
from tests.builders import TINY_OVERRIDES as TINY
from tests.builders import tiny_batch


@pytest.fixture(scope="module")
def setup():
    config = load_config(
        config_path("cycle"), TINY + ["loss.cycle_text_ramp_steps=0", "loss.cycle_latent_ramp_steps=0"]
    )
    model = build_model(config, seed=0).eval()
    vocab = vocab_from_config(config)
    batch = tiny_batch(3, 12, int(config.model.latent_dim), 0, vocab)
    return config, model, vocab, batch


def test_cycle_passes_are_named_by_what_they_are_given(setup):
    config, model, vocab, batch = setup
    spy = PassRecorder(model)
    trainer = CycleVAETrainer(spy, vocab, MaskedDiffusion(vocab), dtype_from_config(config), config)
    trainer(batch, step=None)
    kinds = [p.kind for p in classify_passes(spy.passes, batch, vocab.mask_token_id)]
    assert kinds == [T2L, L2T, CYCLE_TEXT, CYCLE_LATENT]
    assert all(p.positional == 0 and len(p.outputs) == 2 for p in spy.passes)
    assert not spy.passes[2].latents_require_grad  # stop-grad on: x0 fed to cycle_text is detached


def test_positional_calls_bind_like_keywords(setup):
    config, model, vocab, batch = setup
    spy = PassRecorder(model)
    masked = torch.full_like(batch["input_ids"], vocab.mask_token_id)
    spy(masked, batch["latent"], torch.ones(3), torch.zeros(3))
    spy(text_tokens=batch["input_ids"], latents=batch["latent"], text_timesteps=None, latent_timesteps=torch.ones(3))
    partly = batch["input_ids"].clone()
    partly[:, ::2] = vocab.mask_token_id
    spy(partly, batch["latent"], torch.full((3,), 0.5), torch.zeros(3))
    passes = classify_passes(spy.passes, batch, vocab.mask_token_id)
    assert [p.kind for p in passes] == [L2T, T2L, MASKED]
    assert passes[0].positional == 4 and passes[1].keywords == (
        "latent_timesteps",
        "latents",
        "text_timesteps",
        "text_tokens",
    )
    assert torch.equal(passes[1].timestep("text"), torch.zeros(3))  # None means zeros


def _global_rng_step(x: torch.Tensor) -> torch.Tensor:
    noise = torch.randn_like(x)
    t = torch.rand(x.shape[0])
    u = torch.empty(x.shape[0]).uniform_()
    return noise * t[:, None] + u[:, None] + random.random() + float(np.random.rand())


def test_capture_serves_seeded_draws_and_records_them():
    x = torch.zeros(4, 3)
    torch.manual_seed(0)
    with DrawCapture(seed=7) as first:
        a = _global_rng_step(x)
    torch.manual_seed(123)  # the global state does not matter inside a capture
    with DrawCapture(seed=7):
        b = _global_rng_step(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [d.function for d in first.draws] == ["randn_like", "rand", "Tensor.uniform_"]
    assert [d.shape for d in first.draws] == [(4, 3), (4,), (4,)]
    assert first.python_calls == ["random"] and first.numpy_calls == ["rand"]
    with DrawCapture(seed=8):
        c = _global_rng_step(x)
    assert not torch.equal(a, c), "another seed must give other draws"


def test_replay_serves_the_recorded_draws_and_one_sample_slices_them():
    x = torch.zeros(4, 3)
    with DrawCapture(seed=1) as recorded:
        noise = torch.randn_like(x)
    with DrawCapture(seed=99, replay=recorded.draws):
        again = torch.randn_like(x)
    torch.testing.assert_close(again, noise, rtol=0, atol=0)
    with DrawCapture(seed=99, replay=recorded.draws, sample=2):
        one = torch.randn_like(x[2:3])
    torch.testing.assert_close(one, noise[2:3], rtol=0, atol=0)
    with pytest.raises(DrawReplayError, match="rand"):
        with DrawCapture(seed=99, replay=recorded.draws):
            torch.rand(4)


def test_served_draws_go_to_standard_draws_of_their_size_in_order():
    noise, noise2, u = torch.randn(3, 4), torch.randn(3, 4), torch.rand(3)
    served = {("normal", 12): [noise, noise2], ("uniform", 3): [u]}
    with DrawCapture(seed=0, served=served) as capture:
        t = torch.rand(3)  # the uniform of size 3
        other = torch.randn(5)  # no prepared value: from the generator
        first = torch.randn_like(torch.zeros(3, 1, 4))  # 12 values, another shape
        second = torch.empty(3, 4).normal_(2.0, 0.5)  # in place, scaled
    torch.testing.assert_close(t, u, rtol=0, atol=0)
    torch.testing.assert_close(first, noise.reshape(3, 1, 4), rtol=0, atol=0)
    torch.testing.assert_close(second, 2.0 + 0.5 * noise2, rtol=0, atol=0)
    assert other.shape == (5,) and len(capture.draws) == 4


def test_captured_global_rng_trainer_sees_the_injected_trainers_numbers(setup):
    """The built-in stable t2l draws its latent noise from its generator unless injected; under a
    capture, a global-RNG draw of the same shape gets the harness's stream: both are the same
    numbers when the harness injects what it served."""
    config, model, vocab, batch = setup
    with DrawCapture(seed=5) as capture:
        served = torch.randn(3, int(config.model.latent_dim))
    stable_config = load_config(config_path("stable"), TINY + ["loss.loss_type=t2l"])
    trainer = MultimodalDiffusionTrainer(model, vocab, MaskedDiffusion(vocab), torch.float32, stable_config)
    trainer(batch, draws={"latent_noise": capture.draws[0].value})
    torch.testing.assert_close(trainer.last_draws["latent_noise"], served, rtol=0, atol=0)


def test_trainer_spec_inspects_instead_of_asking():
    spec = TrainerSpec.of(CycleVAETrainer)
    assert spec.accepts_step and spec.accepts_draws and "latent_noise" in spec.draw_names
    assert spec.source_file is not None and spec.source_file.name == "cycle_vae_trainer.py"


def test_trainer_spec_loads_a_file_outside_any_package(tmp_path):
    repo = tmp_path / "their_repo"
    (repo / "trainers").mkdir(parents=True)
    (repo / "trainers" / "helpers.py").write_text("SCALE = 2.0\n")
    (repo / "trainers" / "my_trainer.py").write_text(
        textwrap.dedent("""
        import helpers

        class MyTrainer:
            def __init__(self, model, tokenizer, text_noise_schedule, dtype, config):
                self.scale = helpers.SCALE

            def forward(self, batch):
                return batch, {}
    """)
    )
    spec = TrainerSpec.load(f"{repo / 'trainers' / 'my_trainer.py'}:MyTrainer")
    assert spec.cls.__name__ == "MyTrainer" and not spec.accepts_step and not spec.accepts_draws
    assert spec.cls(None, None, None, None, None).scale == 2.0


def test_two_trainer_folders_each_import_their_own_sibling_module(tmp_path):
    """Two repositories with a helpers.py each (and a third `helpers` already imported by someone
    else): each trainer binds the helpers beside it, and the cached one is put back afterwards."""
    import sys
    import types

    sys.modules["helpers"] = foreign = types.ModuleType("helpers")
    try:
        scales = []
        for i, scale in enumerate((2.0, 3.0)):
            folder = tmp_path / f"repo{i}" / "trainers"
            folder.mkdir(parents=True)
            (folder / "helpers.py").write_text(f"SCALE = {scale}\n")
            (folder / "my_trainer.py").write_text(
                textwrap.dedent("""
                import helpers

                class MyTrainer:
                    def __init__(self, *args):
                        self.scale = helpers.SCALE

                    def forward(self, batch):
                        return batch, {}
            """)
            )
            spec = TrainerSpec.load(f"{folder / 'my_trainer.py'}:MyTrainer")
            scales.append(spec.cls().scale)
        assert scales == [2.0, 3.0]
        assert sys.modules["helpers"] is foreign
    finally:
        sys.modules.pop("helpers", None)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("no_colon_here", "not a SPEC"),
        ("{missing}:Trainer", "does not exist"),
        ("{broken}:Trainer", "ZeroDivisionError"),
        ("{ok}:Nope", "no class 'Nope'"),
        ("not_a_module_anywhere_xyz:Trainer", "ModuleNotFoundError"),
    ],
    ids=["malformed", "missing-file", "import-raises", "missing-class", "missing-module"],
)
def test_trainer_spec_errors_name_the_problem(tmp_path, spec, needle):
    (tmp_path / "broken.py").write_text("1 / 0\n")
    (tmp_path / "ok.py").write_text("class Trainer:\n    def forward(self, batch):\n        return 0, {}\n")
    spec = spec.format(missing=tmp_path / "missing.py", broken=tmp_path / "broken.py", ok=tmp_path / "ok.py")
    with pytest.raises(GateInputError, match=needle):
        TrainerSpec.load(spec)
