"""Foreign cycle trainers for the gate to judge (`tests/foreign_trainers/`).

Each is written as another user might write one (its own layout, names and random numbers) and
none imports `cycle_vae_impl`. They are loaded here as the gate loads `--cycle-trainer
path/file.py:Class`, and each runs one step on the packaged tiny cycle config. The correct one
(`functional_cycle`) must give this repo's CycleVAETrainer's loss for the same random numbers;
each defective one must show its defect, and every defect check is also run on the correct
trainer, where it must not fire (the negative control).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from compat.oracle import tol
from cycle_vae_impl.configs import config_path
from cycle_vae_impl.trainers.cycle_vae_trainer import CycleVAETrainer
from latentDLM_mmdit.config import load_config
from latentDLM_mmdit.factory import build_model, build_text_side
from tests.builders import tiny_batch

FOREIGN = Path(__file__).resolve().parent / "foreign_trainers"
FUNCTIONAL = "functional_cycle/trainer.py:FunctionalCycleTrainer"
BROADCAST = "broadcast_cycle/trainers/cycle_vae_trainer.py:CycleVAETrainer"
RAISES = "raises_cycle/train_cycle.py:CycleTrainer"
UNIFORM_T = "uniform_t_cycle/uniform_t_trainer.py:UniformTimeCycleTrainer"
NO_STOPGRAD = "no_stopgrad_cycle/cycle.py:NoStopGradCycleTrainer"
ALL_TRAINERS = (FUNCTIONAL, BROADCAST, RAISES, UNIFORM_T, NO_STOPGRAD)
PROTOCOL = ["model", "tokenizer", "text_noise_schedule", "dtype", "config"]

EXACT = {"rtol": 0.0, "atol": 0.0}
# Losses of two implementations of the same objective: the text CE reduces in another order
# (F.cross_entropy's mean vs a masked sum / count): the last float32 bit differs about half the time.
FLOAT32_LOSS = tol("float32_arithmetic")
# The same model on a batch vs on its samples one by one (batched matmuls differ in the last bits).
BATCHING = tol("float32_batching")
# Their gradients: that last-bit difference of the loss propagates through the backward pass.
GRADIENT = tol("float32_amplified")
BATCH, SEQ = 3, 12


# -- loading as the gate does --------------------------------------------------------------------
def load_trainer_class(spec: str) -> type:
    """`path/file.py:Class` (relative to tests/foreign_trainers) -> the class.

    A file inside a package (its folder has `__init__.py`) is imported by its dotted name with
    the outermost package's parent on sys.path, so relative and absolute imports of its own
    package work. A file in a plain folder is loaded from its path with that folder on sys.path,
    so `import helpers` finds its sibling; the sibling modules are then dropped from
    sys.modules, so that another trainer's `import helpers` finds its own. sys.path is restored.
    """
    file_part, _, class_name = spec.rpartition(":")
    path = (FOREIGN / file_part).resolve()
    root, dotted = path.parent, [] if path.stem == "__init__" else [path.stem]
    while (root / "__init__.py").is_file():
        dotted.insert(0, root.name)
        root = root.parent
    in_package = root != path.parent
    saved_path, known = list(sys.path), set(sys.modules)
    sys.path.insert(0, str(root))
    try:
        if in_package:
            module = importlib.import_module(".".join(dotted))
        else:
            name = f"foreign_trainer_{path.parent.name}_{path.stem}"
            spec_obj = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[name] = module
            spec_obj.loader.exec_module(module)
    finally:
        sys.path[:] = saved_path
        if not in_package:
            for name in set(sys.modules) - known:
                file = getattr(sys.modules[name], "__file__", None)
                if file and Path(file).resolve().parent == path.parent and not name.startswith("foreign_trainer_"):
                    del sys.modules[name]
    return getattr(module, class_name)


# -- the tiny setting ----------------------------------------------------------------------------
def tiny(*overrides: str):
    """(config, vocab, text schedule, model, batch [B=3, S=12, D=16]) from the packaged tiny cycle config."""
    config = load_config(config_path("cycle"), list(overrides))
    vocab, schedule = build_text_side(config)
    model = build_model(config, seed=0)
    batch = tiny_batch(BATCH, SEQ, int(config.model.latent_dim), 1, vocab, min_len=3)
    return config, vocab, schedule, model, batch


def build(spec: str, config, vocab, schedule, model):
    return load_trainer_class(spec)(model, vocab, schedule, torch.float32, config)


@contextmanager
def recorded_passes(model: torch.nn.Module):
    """Records the keyword arguments and outputs of every model pass (the gate observes them)."""
    passes: list[dict] = []

    def before(_module, _args, kwargs):
        passes.append({"kwargs": dict(kwargs)})

    def after(_module, _args, _kwargs, output):
        passes[-1]["output"] = output

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield passes
    finally:
        for handle in handles:
            handle.remove()


def functional_draws(config, seed: int, cycle_latent: bool = True, batch_size: int = BATCH) -> dict:
    """The draws functional_cycle takes from the global RNG after `torch.manual_seed(seed)`, in its
    order and under this repo's trainer's draw names; `cycle_latent`: whether its weight is > 0."""
    random_t = config.loss.latent_t_mode == "random"
    dim = int(config.model.latent_dim)
    torch.manual_seed(seed)
    draws = {}
    if random_t:
        draws["latent_t"] = torch.rand(batch_size)
    draws["latent_noise"] = torch.randn(batch_size, dim)
    if not cycle_latent:
        return draws
    if config.loss.cycle_latent_sampling == "categorical":
        draws["pseudo_token_uniform"] = torch.rand(batch_size, SEQ)
    if random_t:
        draws["cycle_latent_t"] = torch.rand(batch_size)
    draws["cycle_latent_noise"] = torch.randn(batch_size, dim)
    return draws


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# -- every trainer -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ALL_TRAINERS)
def test_foreign_trainer_is_self_contained_and_follows_the_protocol(spec):
    folder = (FOREIGN / spec.split(":")[0]).parents[0]
    while (folder.parent / "__init__.py").is_file():
        folder = folder.parent
    imported, docstrings = set(), []
    for source in folder.rglob("*.py"):
        tree = ast.parse(source.read_text(), filename=str(source))
        docstrings.append(ast.get_docstring(tree) or "")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    assert not imported & {"cycle_vae_impl", "compat"}, (
        f"{folder.name} imports {imported & {'cycle_vae_impl', 'compat'}}"
    )
    cls = load_trainer_class(spec)
    assert list(inspect.signature(cls.__init__).parameters)[1:] == PROTOCOL
    assert any("Gate verdict expected:" in doc for doc in docstrings), f"{folder.name}: no verdict in its docstrings"


@pytest.mark.parametrize("spec", [FUNCTIONAL, BROADCAST, UNIFORM_T, NO_STOPGRAD])
def test_foreign_trainer_runs_one_step_on_the_tiny_model(spec):
    config, vocab, schedule, model, batch = tiny()
    trainer = build(spec, config, vocab, schedule, model)
    torch.manual_seed(0)
    with recorded_passes(model) as passes:
        loss, metrics = trainer(batch)
    assert loss.dim() == 0 and bool(torch.isfinite(loss)) and loss.requires_grad
    assert metrics["loss"] == pytest.approx(float(loss.detach()))
    assert len(passes) == 4, f"{spec}: {len(passes)} model passes, expected T2L, L2T, cycle_text, cycle_latent"
    loss.backward()
    assert any(bool(g.abs().sum() > 0) for g in grads(model).values())


def test_plain_folder_trainers_each_get_their_own_helpers():
    """raises_cycle and uniform_t_cycle both `import helpers` (different files): loaded one after
    the other in one process, each must see its own."""
    raises_cls = load_trainer_class(RAISES)
    uniform_cls = load_trainer_class(UNIFORM_T)
    raises_helpers = sys.modules[raises_cls.__module__].helpers
    uniform_helpers = sys.modules[uniform_cls.__module__].helpers
    assert Path(raises_helpers.__file__).parent.name == "raises_cycle"
    assert Path(uniform_helpers.__file__).parent.name == "uniform_t_cycle"
    assert hasattr(uniform_helpers, "Draws") and not hasattr(raises_helpers, "Draws")
    assert "helpers" not in sys.modules


# -- functional_cycle: correct, written differently ----------------------------------------------
@pytest.mark.parametrize(
    "mode, sampling, parameterization, step",
    [
        ("full", "argmax", "v_param", None),  # the packaged tiny config
        ("random", "categorical", "epsilon", 7),  # mid-ramp weights, every draw name used
        ("full", "categorical", "x0", 25),  # past the ramp
        ("random", "argmax", "v_param", 0),  # step 0: both cycle weights 0
    ],
)
def test_functional_trainer_equals_cycle_trainer_on_the_same_draws(mode, sampling, parameterization, step):
    """Global RNG seeded for the foreign trainer; the same numbers, reproduced from that seed,
    injected into CycleVAETrainer. The latent terms agree bit-exactly; the text terms, the total
    and the gradients within float32 tolerance (see FLOAT32_LOSS)."""
    config, vocab, schedule, model, batch = tiny(
        f"loss.latent_t_mode={mode}",
        f"loss.cycle_latent_sampling={sampling}",
        f"model.latent_parameterization={parameterization}",
    )
    foreign = build(FUNCTIONAL, config, vocab, schedule, model)
    foreign.iteration = step
    torch.manual_seed(123)
    loss_f, m_f = foreign(batch)
    loss_f.backward()
    grads_f = grads(model)
    model.zero_grad(set_to_none=True)

    ours = CycleVAETrainer(model, vocab, schedule, torch.float32, config)
    draws = functional_draws(config, seed=123, cycle_latent=m_f["w_cycle_latent"] > 0.0)
    loss_o, m_o = ours(batch, step=step, draws=draws)
    loss_o.backward()
    grads_o = grads(model)

    assert ours.unused_draws == []
    assert (m_f["w_cycle_text"], m_f["w_cycle_latent"]) == (m_o["cycle_text_weight"], m_o["cycle_latent_weight"])
    assert (m_f["w_cycle_latent"] > 0.0) == (step != 0)
    # A term whose weight is 0 is skipped by CycleVAETrainer (reported 0); functional_cycle
    # still computes cycle_text (times 0), as upstream did.
    text_terms = (("l2t", "base_l2t_text_loss"),) + ((("cycle_text", "cycle_text_loss"),) if step != 0 else ())
    for mine, theirs in (("t2l", "base_t2l_latent_loss"), ("cycle_latent", "cycle_latent_loss")):
        torch.testing.assert_close(torch.tensor(m_f[mine]), torch.tensor(m_o[theirs]), **EXACT)
    for mine, theirs in text_terms:
        torch.testing.assert_close(torch.tensor(m_f[mine]), torch.tensor(m_o[theirs]), **FLOAT32_LOSS)
    torch.testing.assert_close(loss_f.detach(), loss_o.detach(), **FLOAT32_LOSS)
    assert grads_f.keys() == grads_o.keys()
    for name in grads_f:
        torch.testing.assert_close(
            grads_f[name], grads_o[name], **GRADIENT, msg=lambda m, name=name: f"gradient of {name}\n{m}"
        )


def test_functional_trainer_differs_from_cycle_trainer_on_other_draws():
    """The equivalence above is not vacuous: other noise gives another loss."""
    config, vocab, schedule, model, batch = tiny()
    torch.manual_seed(123)
    loss_f, _ = build(FUNCTIONAL, config, vocab, schedule, model)(batch)
    draws = functional_draws(config, seed=124)
    loss_o, _ = CycleVAETrainer(model, vocab, schedule, torch.float32, config)(batch, draws=draws)
    assert abs(float(loss_f.detach()) - float(loss_o.detach())) > 1e-4


# -- broadcast_cycle: [B,1,D] against [B,D] ------------------------------------------------------
@contextmanager
def replayed_randn_like(monkeypatch, noises: list[torch.Tensor]):
    """`torch.randn_like` returns `noises` in order (shape-checked): the global-RNG draws a step
    makes, replayed so that the batch and each sample alone see the same noise rows."""
    queue = list(noises)

    def replay(like, **_kwargs):
        value = queue.pop(0)
        assert value.shape == like.shape, f"replayed noise {tuple(value.shape)} for a draw of {tuple(like.shape)}"
        return value.clone()

    with monkeypatch.context() as patch:
        patch.setattr(torch, "randn_like", replay)
        yield
    assert not queue, f"{len(queue)} replayed draws left unused"


def batch_and_per_sample_losses(spec: str, monkeypatch):
    """(loss on the batch, mean of the losses on each sample alone) with the same noise rows;
    T2L, L2T and cycle_text (cycle_latent off: one noise draw per step)."""
    config, vocab, schedule, model, batch = tiny("loss.cycle_latent_weight=0.0")
    trainer = build(spec, config, vocab, schedule, model)
    noise = torch.randn(BATCH, int(config.model.latent_dim), generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), replayed_randn_like(monkeypatch, [noise]):
        whole, metrics = trainer(batch)
    singles, t2l_singles = [], []
    for i in range(BATCH):
        one = {key: value[i : i + 1] for key, value in batch.items()}
        with torch.no_grad(), replayed_randn_like(monkeypatch, [noise[i : i + 1]]):
            loss_i, metrics_i = trainer(one)
        singles.append(loss_i)
        t2l_singles.append(metrics_i.get("base_t2l_latent_loss", metrics_i.get("t2l")))
    t2l_whole = metrics.get("base_t2l_latent_loss", metrics.get("t2l"))
    return whole, torch.stack(singles).mean(), torch.tensor(t2l_whole), torch.tensor(t2l_singles).mean()


def test_broadcast_trainer_batch_loss_is_not_the_mean_of_its_per_sample_losses(monkeypatch):
    whole, per_sample, t2l_whole, t2l_per_sample = batch_and_per_sample_losses(BROADCAST, monkeypatch)
    assert float((t2l_whole - t2l_per_sample).abs()) > 100 * BATCHING["atol"], (
        f"broadcast T2L loss {float(t2l_whole)} equals its per-sample mean {float(t2l_per_sample)}"
    )
    assert not torch.allclose(whole, per_sample, **BATCHING), (
        f"broadcast loss {float(whole)} is within batching tolerance of its per-sample mean {float(per_sample)}"
    )


def test_correct_trainer_batch_loss_is_the_mean_of_its_per_sample_losses(monkeypatch):
    """Negative control of the check above."""
    whole, per_sample, t2l_whole, t2l_per_sample = batch_and_per_sample_losses(FUNCTIONAL, monkeypatch)
    torch.testing.assert_close(t2l_whole, t2l_per_sample, **BATCHING)
    torch.testing.assert_close(whole, per_sample, **BATCHING)


def test_broadcast_trainer_mixes_samples_in_x0_and_equals_a_correct_trainer_at_batch_1(monkeypatch):
    config, vocab, schedule, model, batch = tiny("loss.cycle_latent_weight=0.0")
    broadcast = build(BROADCAST, config, vocab, schedule, model)
    functional = build(FUNCTIONAL, config, vocab, schedule, model)
    noise = torch.randn(BATCH, int(config.model.latent_dim), generator=torch.Generator().manual_seed(3))

    def cycle_text_latents(trainer, the_batch, rows):
        with torch.no_grad(), recorded_passes(model) as passes, replayed_randn_like(monkeypatch, [noise[rows]]):
            loss, _ = trainer(the_batch)
        return loss, passes[2]["kwargs"]["latents"]  # [B, 1, D] fed to the cycle_text pass

    # Changing sample 1's latent moves sample 0's x0 in the broadcast trainer only.
    changed = dict(batch, latent=batch["latent"].clone())
    changed["latent"][1] += 1.0
    _, x0_broadcast = cycle_text_latents(broadcast, batch, slice(None))
    _, x0_broadcast_changed = cycle_text_latents(broadcast, changed, slice(None))
    _, x0_correct = cycle_text_latents(functional, batch, slice(None))
    _, x0_correct_changed = cycle_text_latents(functional, changed, slice(None))
    assert not torch.equal(x0_broadcast[0], x0_broadcast_changed[0])
    torch.testing.assert_close(x0_correct[0], x0_correct_changed[0], **EXACT)

    one = {key: value[:1] for key, value in batch.items()}
    loss_b, x0_b = cycle_text_latents(broadcast, one, slice(0, 1))
    loss_f, x0_f = cycle_text_latents(functional, one, slice(0, 1))
    torch.testing.assert_close(x0_b, x0_f, **EXACT)
    torch.testing.assert_close(loss_b, loss_f, **FLOAT32_LOSS)


def test_broadcast_trainer_loss_is_what_mse_loss_gives_on_the_broadcast(monkeypatch):
    """Its silent hand-written MSE equals `F.mse_loss` on the same [B,1,D] and [B,D] tensors,
    the call upstream made, which warns (an error in this suite, hence pytest.warns)."""
    config, vocab, schedule, model, batch = tiny()
    trainer = build(BROADCAST, config, vocab, schedule, model)
    gen = torch.Generator().manual_seed(5)
    noise, noise2 = (torch.randn(BATCH, int(config.model.latent_dim), generator=gen) for _ in range(2))
    with torch.no_grad(), recorded_passes(model) as passes, replayed_randn_like(monkeypatch, [noise, noise2]):
        _, metrics = trainer(batch)
    pred = passes[0]["output"][1]  # [B, 1, D]
    t = torch.ones(BATCH)
    _, target = trainer.latent_diffusion.add_noise(batch["latent"][:, 0], t, noise)  # [B, D]
    unit = torch.nn.functional.normalize
    with pytest.warns(UserWarning, match="Using a target size"):
        upstream = torch.nn.functional.mse_loss(unit(pred, dim=-1, eps=1e-8), unit(target, dim=-1, eps=1e-8))
    torch.testing.assert_close(torch.tensor(metrics["base_t2l_latent_loss"]), upstream, **FLOAT32_LOSS)


# -- raises_cycle: AttributeError in its own code ------------------------------------------------
def test_raises_trainer_raises_attribute_error_in_its_own_code_at_the_first_step():
    config, vocab, schedule, model, batch = tiny()
    trainer = build(RAISES, config, vocab, schedule, model)
    with recorded_passes(model) as passes, pytest.raises(AttributeError, match="current_step") as info:
        trainer(batch)
    assert len(passes) == 1, "it should raise after its first model pass"
    last_frame = traceback.extract_tb(info.value.__traceback__)
    own = [frame for frame in last_frame if Path(frame.filename).name == "train_cycle.py"]
    assert own and own[-1].line.strip().startswith("w_text ="), "the error must come from the trainer's own step"


# -- uniform_t_cycle: latent t uniform under latent_t_mode full ----------------------------------
def t2l_timesteps(spec: str, **call) -> torch.Tensor:
    config, vocab, schedule, model, batch = tiny("loss.latent_t_mode=full", "loss.cycle_latent_weight=0.0")
    trainer = build(spec, config, vocab, schedule, model)
    torch.manual_seed(0)
    with torch.no_grad(), recorded_passes(model) as passes:
        trainer(batch, **call)
    first = passes[0]["kwargs"]
    assert torch.equal(first["text_tokens"], batch["input_ids"]), "the first pass is not T2L (clean text)"
    return first["latent_timesteps"]


def test_uniform_t_trainer_t2l_timestep_is_not_one_under_full_mode():
    t = t2l_timesteps(UNIFORM_T)
    assert not bool((t == 1.0).all()), f"T2L latent t {t.tolist()} is all 1"
    assert bool(((t >= 0.0) & (t < 0.98)).all())


def test_correct_trainer_t2l_timestep_is_exactly_one_under_full_mode():
    """Negative control of the check above."""
    t = t2l_timesteps(FUNCTIONAL)
    torch.testing.assert_close(t, torch.ones(BATCH), **EXACT)


def test_uniform_t_trainer_takes_injected_draws():
    u = torch.tensor([0.0, 0.5, 0.25])
    t = t2l_timesteps(UNIFORM_T, draws={"latent_t": u}, step=3)
    torch.testing.assert_close(t, 0.1 + (0.9 - 0.1) * u, **EXACT)  # the packaged t range [0.1, 0.9]
    with pytest.raises(KeyError, match="unknown draw name"):
        t2l_timesteps(UNIFORM_T, draws={"pseudo_token_uniform": torch.zeros(BATCH, SEQ)})


# -- no_stopgrad_cycle: x0 not detached ----------------------------------------------------------
def step_with_grads(spec: str, *overrides: str):
    config, vocab, schedule, model, batch = tiny(*overrides)
    trainer = build(spec, config, vocab, schedule, model)
    torch.manual_seed(77)
    with recorded_passes(model) as passes:
        loss, _ = trainer(batch)
    x0_fed = passes[2]["kwargs"]["latents"]  # what the cycle_text pass got
    loss.backward()
    return loss.detach(), x0_fed, grads(model)


def test_no_stopgrad_trainer_sends_gradient_through_x0():
    loss_bad, x0_bad, grads_bad = step_with_grads(NO_STOPGRAD)
    loss_ok, x0_ok, grads_ok = step_with_grads(FUNCTIONAL)
    assert x0_bad.grad_fn is not None, "x0 fed to cycle_text carries no graph"
    assert x0_ok.grad_fn is None and not x0_ok.requires_grad
    torch.testing.assert_close(loss_bad, loss_ok, **EXACT)  # same forward numbers ...
    latent_head = [name for name in grads_ok if name.startswith("latent_head.")]
    assert latent_head
    differ = [name for name in latent_head if not torch.allclose(grads_bad[name], grads_ok[name], **GRADIENT)]
    assert differ, "cycle_text gradient did not reach latent_head"  # ... other gradients


def test_no_stopgrad_trainer_equals_a_correct_one_when_stop_grad_is_off():
    """With cycle_stop_grad_latent false neither detaches: the gradients then agree, so the
    difference above is the missing detach and nothing else."""
    loss_bad, x0_bad, grads_bad = step_with_grads(NO_STOPGRAD, "loss.cycle_stop_grad_latent=false")
    loss_ok, x0_ok, grads_ok = step_with_grads(FUNCTIONAL, "loss.cycle_stop_grad_latent=false")
    assert x0_ok.grad_fn is not None and x0_bad.grad_fn is not None
    torch.testing.assert_close(loss_bad, loss_ok, **EXACT)
    assert grads_bad.keys() == grads_ok.keys()
    for name in grads_ok:
        torch.testing.assert_close(grads_bad[name], grads_ok[name], **EXACT)
