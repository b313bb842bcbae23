"""Parity with outputs recorded from the public upstream code (see ../shared/upstream_parity/README.md).

The fixtures are read in place, never copied. Each holds an upstream model's state dict
(`model.*`), a batch (`inputs.*`), the outputs of four forward calls (`forward.<case>.*`) and one
upstream stable-trainer step per mode (`stable.<mode>.*`: loss, the random draws it made, a few
gradients), with JSON metadata `config`, `stable` and `versions`.

Agreement expected in float32 on CPU: forward outputs and losses within 1e-5 absolute (and 1e-5
relative), gradients within 1e-5 relative to their norm.
"""

from __future__ import annotations

import json
from importlib import metadata as importlib_metadata
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from compat.oracle import tol
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
from latentDLM_mmdit.tokenizer import SyntheticVocab
from tests.builders import tiny_model

PARITY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "upstream_parity"
CASES = ("tiny_eps_cosine", "tiny_v_linear_cluster")
MODES = ("l2t", "t2l", "unconditional")
FORWARD_CASES = ("none_none", "zeros_zeros", "probe_ones", "ones_none_nomask")
# Upstream's draw names (torch function and call index) -> this trainer's draw names.
DRAW_NAMES = {
    "rand.0": "text_t",
    "rand.1": "latent_t",
    "rand_like.0": "mask_uniform",
    "randn_like.0": "latent_noise",
}
LATENT_KEYS = ("latent_timesteps", "latent_beta_schedule", "latent_parameterization")
TOL = tol("upstream_parity")
GRAD_REL_TOL = 1e-5

if not PARITY_DIR.is_dir():
    pytest.skip(
        f"upstream parity fixtures not found at {PARITY_DIR} (they live in ../shared/upstream_parity "
        "beside the repository and are not part of it)",
        allow_module_level=True,
    )


class Fixture:
    """One parity file: tensors, decoded metadata, and helpers to build the model from it."""

    def __init__(self, name: str):
        self.name = name
        self.path = PARITY_DIR / f"{name}.safetensors"
        with safe_open(str(self.path), framework="pt", device="cpu") as handle:
            raw_meta = handle.metadata()
            self.tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        self.config = json.loads(raw_meta["config"])
        self.stable = json.loads(raw_meta["stable"])
        self.versions = json.loads(raw_meta["versions"])
        self.model_state = {k[len("model.") :]: v for k, v in self.tensors.items() if k.startswith("model.")}

    @property
    def model_config(self) -> dict:
        """The fixture's config is flat; the model validates a model section, so it gets the model keys."""
        return {k: v for k, v in self.config.items() if k not in ("vocab_size", "mask_token_id", "latent_loss_weight")}

    def build_model(self) -> MultimodalMMDiT:
        cfg = self.config
        model = tiny_model(
            None,
            vocab_size=cfg["vocab_size"],
            latent_dim=cfg["latent_dim"],
            cluster_size=cfg["cluster_size"],
            base=self.model_config,
        )  # the fixture's sizes, weights loaded
        model.load_state_dict(self.model_state, strict=True)
        return model

    def vocab(self) -> SyntheticVocab:
        mask_id = int(self.config["mask_token_id"])
        pad_id = 0 if mask_id != 0 else 1  # the stable trainer never reads the pad id
        return SyntheticVocab(int(self.config["vocab_size"]), mask_id, pad_id)

    def inputs(self, name: str) -> torch.Tensor:
        return self.tensors[f"inputs.{name}"]

    def draws(self, mode: str) -> dict[str, torch.Tensor]:
        prefix = f"stable.{mode}.draw."
        return {DRAW_NAMES[k[len(prefix) :]]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def grads(self, mode: str) -> dict[str, torch.Tensor]:
        prefix = f"stable.{mode}.grad."
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}


_FIXTURES: dict[str, Fixture] = {}


@pytest.fixture(scope="module", params=CASES)
def fx(request) -> Fixture:
    name = request.param
    path = PARITY_DIR / f"{name}.safetensors"
    if not path.is_file():
        pytest.fail(f"parity fixture {path} is missing although {PARITY_DIR} exists")
    if name not in _FIXTURES:
        _FIXTURES[name] = Fixture(name)
    return _FIXTURES[name]


class StepResult:
    def __init__(self, loss, metrics, trainable, with_grad, nonzero_grad, grads, trainer):
        self.loss = loss
        self.metrics = metrics
        self.trainable = trainable
        self.with_grad = with_grad
        self.nonzero_grad = nonzero_grad
        self.grads = grads
        self.trainer = trainer


_STEPS: dict[tuple[str, str], StepResult] = {}


def stable_step(fx: Fixture, mode: str) -> StepResult:
    """One stable step on a fresh copy of the fixture's model, with the recorded draws injected."""
    key = (fx.name, mode)
    if key not in _STEPS:
        model = fx.build_model()
        config = {
            "model": {k: fx.config[k] for k in LATENT_KEYS},
            "loss": {"loss_type": mode, "latent_loss_weight": fx.config["latent_loss_weight"]},
        }
        vocab = fx.vocab()
        trainer = MultimodalDiffusionTrainer(model, vocab, MaskedDiffusion(vocab), torch.float32, config)
        batch = {
            "input_ids": fx.inputs("input_ids"),
            "attention_mask": fx.inputs("attention_mask").float(),
            "latent": fx.inputs("latent"),
        }
        loss, metrics = trainer(batch, draws=fx.draws(mode))
        loss.backward()
        params = dict(model.named_parameters())
        _STEPS[key] = StepResult(
            loss=loss.detach(),
            metrics=metrics,
            trainable=sorted(n for n, p in params.items() if p.requires_grad),
            with_grad=sorted(n for n, p in params.items() if p.grad is not None),
            nonzero_grad=sorted(n for n, p in params.items() if p.grad is not None and bool(p.grad.ne(0).any())),
            grads={n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None},
            trainer=trainer,
        )
    return _STEPS[key]


# -- versions and layout ---------------------------------------------------------------------------
def test_recorded_versions_equal_installed(fx):
    """The parity numbers only mean something with the mmdit / hyper-connections they came from."""
    for package in ("mmdit", "hyper-connections"):
        recorded = fx.versions.get(package)
        installed = importlib_metadata.version(package)
        assert recorded == installed, (
            f"{fx.name} was recorded with {package} {recorded}, but {package} {installed} is installed: "
            "the parity comparisons below are meaningless until the pinned version is installed"
        )


def test_state_dict_keys_and_shapes_equal_fixture(fx):
    cfg = fx.config
    model = MultimodalMMDiT(
        fx.model_config, vocab_size=cfg["vocab_size"], latent_dim=cfg["latent_dim"], cluster_size=cfg["cluster_size"]
    )
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fx.model_state.items()}
    assert sorted(set(theirs) - set(ours)) == [], "keys upstream has and the model lacks"
    assert sorted(set(ours) - set(theirs)) == [], "keys the model has and upstream lacks"
    assert ours == theirs


def test_model_loads_fixture_strictly(fx):
    model = fx.build_model()  # load_state_dict(strict=True) raises on any difference
    state = model.state_dict()
    assert set(state) == set(fx.model_state)
    for name, value in fx.model_state.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


# -- forward ---------------------------------------------------------------------------------------
def _forward(model: MultimodalMMDiT, fx: Fixture, case: str):
    ids, mask = fx.inputs("input_ids"), fx.inputs("attention_mask")
    latent, t_probe = fx.inputs("latent"), fx.inputs("t_probe")
    batch = ids.shape[0]
    with torch.no_grad():
        if case == "none_none":
            return model(ids, latent, None, None, mask)
        if case == "zeros_zeros":
            return model(ids, latent, torch.zeros(batch), torch.zeros(batch), mask)
        if case == "probe_ones":
            return model(ids, latent, t_probe, torch.ones(batch), mask)
        if case == "ones_none_nomask":
            return model(ids, latent[:, 0], torch.ones(batch), None, None)
    raise AssertionError(f"unknown forward case {case}")


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_outputs_match_upstream(fx, case):
    model = fx.build_model().eval()
    outputs = _forward(model, fx, case)
    names = ["text_logits", "latent_pred"] + (["text_cluster_logits"] if fx.config["cluster_size"] > 0 else [])
    recorded = sorted(k.rsplit(".", 1)[1] for k in fx.tensors if k.startswith(f"forward.{case}."))
    assert recorded == sorted(names), "the fixture records exactly the outputs the model returns"
    assert len(outputs) == len(names)
    for name, ours in zip(names, outputs):
        theirs = fx.tensors[f"forward.{case}.{name}"]
        assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} vs upstream {tuple(theirs.shape)}"
        torch.testing.assert_close(ours, theirs, **TOL, msg=lambda m, n=name: f"{fx.name}/{case}/{n}: {m}")


# -- stable trainer --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_stable_loss_matches_upstream(fx, mode):
    step = stable_step(fx, mode)
    expected = fx.tensors[f"stable.{mode}.loss"]
    torch.testing.assert_close(step.loss, expected.reshape(step.loss.shape).to(step.loss.dtype), **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_stable_metrics_match_upstream(fx, mode):
    step = stable_step(fx, mode)
    expected = fx.stable[mode]["metrics"]
    assert set(step.metrics) == set(expected)
    assert step.metrics["training_mode"] == expected["training_mode"] == mode
    for name, value in expected.items():
        if name == "training_mode":
            continue
        torch.testing.assert_close(
            torch.tensor(step.metrics[name], dtype=torch.float64),
            torch.tensor(value, dtype=torch.float64),
            **TOL,
            msg=lambda m, n=name: f"metric {n}: {m}",
        )


@pytest.mark.parametrize("mode", MODES)
def test_stable_draws_are_the_recorded_ones(fx, mode):
    """The step consumed exactly the recorded draws (l2t draws nothing)."""
    step = stable_step(fx, mode)
    injected = fx.draws(mode)
    assert sorted(step.trainer.last_draws) == sorted(injected)
    if mode == "l2t":
        assert injected == {}
    for name, value in injected.items():
        torch.testing.assert_close(step.trainer.last_draws[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_stable_trainable_parameters_match_upstream(fx, mode):
    step = stable_step(fx, mode)
    expected = sorted(fx.stable[mode]["trainable"])
    assert step.trainable == expected
    assert step.trainer.trainable_parameter_names(mode) == expected
    assert set(step.with_grad) <= set(expected), "a frozen parameter received a gradient"


@pytest.mark.parametrize("mode", MODES)
def test_stable_nonzero_grad_parameters_match_upstream(fx, mode):
    step = stable_step(fx, mode)
    upstream = sorted(fx.stable[mode]["params_with_nonzero_grad"])
    if step.nonzero_grad == upstream:
        return
    # Another torch build or another CPU's kernels: a gradient that upstream's run got as a few ulps
    # may come out exactly 0 (seen: torch 2.11, and torch 2.13 on a CPU other than the recording
    # one, for hyper-connections' residual_scale in l2t). Every parameter must still receive a
    # gradient (frozen ones none), and only negligible gradients may differ in being 0.
    assert sorted(step.grads) == sorted(set(step.grads) | set(upstream)), "a parameter upstream updated got no gradient"
    total = torch.sqrt(sum(g.double().pow(2).sum() for g in step.grads.values()))
    for name in set(upstream) ^ set(step.nonzero_grad):
        size = float(step.grads[name].double().norm() / total) if name in step.grads else float("inf")
        assert size < 1e-6, (
            f"{name}: non-zero here xor upstream with relative size {size:.3g} (torch {torch.__version__}, "
            f"recorded with {fx.versions['torch']})"
        )


@pytest.mark.parametrize("mode", MODES)
def test_stable_gradients_match_upstream(fx, mode):
    step = stable_step(fx, mode)
    recorded = fx.grads(mode)
    assert recorded, f"the fixture records no gradient for {mode}"
    for name, theirs in recorded.items():
        assert name in step.grads, f"{name} got no gradient here but did upstream"
        ours = step.grads[name]
        assert ours.shape == theirs.shape
        rel = float((ours - theirs).norm() / theirs.norm())
        assert rel <= GRAD_REL_TOL, f"{fx.name}/{mode}: grad of {name} differs by {rel:.3g} relative to its norm"
