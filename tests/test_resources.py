"""Evidence that the resources row's numbers are right (`compat/resources.py`).

- Activations: what the FakeTensorMode trace counts as saved for backward equals what autograd
  saves in a real run of the same step (saved_tensors_hooks on real tensors), in total and alive when
  backward starts, for both trainers, in float32 and under bf16 autocast.
- Parameters, gradients and AdamW state equal their exact count (the 512-byte rounding of the CUDA
  allocator applied to each tensor); AdamW holds no state for a group the run never trains.
- FLOPs of one Linear and of one joint-attention block equal the hand count, and FlopCounterMode's.
- A deep model traced at depths 1 and 2 and extrapolated equals the direct trace, byte for byte.
- A full-size step is traced without allocating it; a small step is run for real and counts what
  its trace counts (FLOPs, passes, host reads, state bytes exactly; activations within
  `resources_saved_vs_real`); past the real limits it is traced instead, whatever the trainer does
  with the stop.
- On CUDA (marked gpu): the estimate against torch.cuda.max_memory_allocated of a real step.
"""

from __future__ import annotations

import math
import re
import resource
import weakref
from contextlib import nullcontext
from dataclasses import fields, replace

import pytest
import torch
from omegaconf import OmegaConf
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

import compat.resources as resources_module
from compat.oracle import TOLERANCES
from compat.resources import (
    ACTIVATIONS,
    BACKWARD,
    CATEGORIES,
    CUDA_BLOCK,
    CudaAutocastPolicy,
    GRADIENTS,
    OPTIMIZER,
    PARAMETERS,
    PHASES,
    STEP,
    StepSetup,
    StepTracer,
    batch_candidates,
    cycle_weights,
    full_weight_step,
    gpu_hours,
    measure_steps,
    parse_size,
    stable_modes,
    trace_step,
    without_state,
)
from compat.subjects import Subject
from compat.trainer_spec import TrainerSpec
from cycle_vae_impl.configs import config_path
from cycle_vae_impl.trainers.cycle_vae_trainer import CycleVAETrainer
from latentDLM_mmdit.config import load_config
from latentDLM_mmdit.factory import dtype_from_config
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.precision import autocast
from latentDLM_mmdit.tokenizer import SyntheticVocab
from tests.builders import TINY_OVERRIDES, draw_shapes, tiny_batch, tiny_model

VOCAB = SyntheticVocab(24, mask_token_id=23, pad_token_id=0)
SIZES = {"vocab_size": 24, "latent_dim": 8, "cluster_size": 0}
B, S = 3, 12
CYCLE = Subject(TrainerSpec.of(CycleVAETrainer), "cycle")
STABLE = Subject(TrainerSpec.of(MultimodalDiffusionTrainer), "stable")
# Every cycle term on from step 0 (no warmup or ramp): the four passes.
ALL_TERMS = [
    "loss.cycle_text_weight=0.3",
    "loss.cycle_latent_weight=0.2",
    "loss.cycle_text_warmup_steps=0",
    "loss.cycle_text_ramp_steps=0",
    "loss.cycle_latent_warmup_steps=0",
    "loss.cycle_latent_ramp_steps=0",
]
AUTOCAST = ["training.mixed_precision=bf16", "training.dtype=bf16"]


def config(kind: str, *overrides: str):
    """A packaged config (tiny sizes, this file's latent width) with `overrides`."""
    return load_config(config_path(kind), [*TINY_OVERRIDES, f"model.latent_dim={SIZES['latent_dim']}", *overrides])


def setup_of(
    subject, cfg, n_blocks: int = 1, step: int | None = 0, round_to: int = 1, execution: str = "fake"
) -> StepSetup:
    """A step at this file's sizes; traced under FakeTensorMode unless `execution` says otherwise (the
    evidence below is about the trace a full-size config gets)."""
    model = OmegaConf.merge(cfg.model, {"n_blocks": n_blocks})
    return StepSetup(subject, cfg, model, SIZES, VOCAB, B, S, step, round_to=round_to, execution=execution)


def round_up(n: int, to: int = CUDA_BLOCK) -> int:
    return -(-n // to) * to


def real_saved_bytes(setup: StepSetup) -> tuple[int, int]:
    """(bytes autograd saved for backward in all, bytes of them alive when the forward returns) in a
    real run of `setup`'s step: unique storages, parameters and buffers excepted."""
    cfg = setup.config
    model = tiny_model(0, vocab_size=SIZES["vocab_size"], latent_dim=SIZES["latent_dim"], base=setup.model_config)
    model.train()
    trainer = setup.subject.build(model, VOCAB, dtype_from_config(cfg), cfg)
    batch = tiny_batch(B, S, SIZES["latent_dim"], seed=1, vocab=VOCAB)
    gen = torch.Generator().manual_seed(2)
    draws = {
        name: (torch.randn if name.endswith("noise") else torch.rand)(shape, generator=gen)
        for name, shape in draw_shapes(B, S, SIZES["latent_dim"]).items()
        if name in setup.subject.spec.draw_names
    }
    model_state = WeakIdKeyDictionary()
    for t in list(model.parameters()) + list(trainer.buffers()):
        model_state[t.untyped_storage()] = True
    saved = WeakIdKeyDictionary()  # storage -> bytes
    refs = []

    def pack(t):
        storage = t.untyped_storage()
        if storage not in model_state and storage not in saved:
            saved[storage] = storage.nbytes()
            refs.append((weakref.ref(storage), storage.nbytes()))
        return t.detach()

    mixed_precision = str(cfg.training.mixed_precision)
    policy = CudaAutocastPolicy() if setup.cuda_policy and mixed_precision != "no" else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(mixed_precision, "cpu"), policy:
            loss, metrics, _, _ = setup.subject.call(trainer, batch, step=setup.step, draws=draws)
        alive = sum(n for ref, n in refs if ref() is not None)
    assert loss.requires_grad
    return sum(n for _, n in refs), alive


STEPS = {
    "cycle": (CYCLE, "cycle", ALL_TERMS),
    "stable_l2t": (STABLE, "stable", ["loss.loss_type=l2t"]),
    "stable_t2l": (STABLE, "stable", ["loss.loss_type=t2l"]),
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("step", list(STEPS))
def test_traced_activations_equal_what_a_real_run_saves(step, precision):
    subject, kind, overrides = STEPS[step]
    cfg = config(kind, *overrides, *(AUTOCAST if precision == "bf16" else []))
    setup = setup_of(subject, cfg)
    trace = trace_step(setup)
    total, alive = real_saved_bytes(setup)
    assert total > 0 and alive > 0
    rtol, atol = TOLERANCES["resources_saved_vs_real"]
    assert abs(sum(trace.saved.values()) - total) <= atol + rtol * total, (trace.saved, total)
    traced_alive = trace.at_start[BACKWARD][ACTIVATIONS]
    assert abs(traced_alive - alive) <= atol + rtol * alive, (traced_alive, alive)
    assert trace.passes == (4 if kind == "cycle" else 1)
    assert trace.host_reads > 0  # the non-finite checks were answered, not skipped


def _trace_fields(trace) -> dict:
    return {f.name: getattr(trace, f.name) for f in fields(trace) if f.name not in ("seconds", "real")}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("step", list(STEPS))
def test_a_small_step_run_for_real_counts_what_its_trace_counts(step, precision):
    """A small step is run for real (8x faster than FakeTensorMode); both count the same: FLOPs, passes,
    host reads, parameters, gradients and AdamW state exactly; every byte total within
    `resources_saved_vs_real` (CPU's mse_loss keeps its [B, D] work buffer under its 0-dim mean, where
    the meta kernel allocates 4 bytes), and exactly at the CUDA allocator's 512-byte rounding the row
    uses, on these sizes."""
    subject, kind, overrides = STEPS[step]
    cfg = config(kind, *overrides, *(AUTOCAST if precision == "bf16" else []))
    setup = setup_of(subject, cfg, n_blocks=2)
    fake, real = trace_step(setup), trace_step(replace(setup, execution="real"))
    assert real.real and not fake.real
    exact = ("flops_forward", "flops_backward", "passes", "host_reads", "params_trained", "params_total")
    assert {k: getattr(real, k) for k in exact} == {k: getattr(fake, k) for k in exact}
    assert real.untrained_state == fake.untrained_state
    rtol, atol = TOLERANCES["resources_saved_vs_real"]
    for phase in PHASES:
        for kind_ in (PARAMETERS, GRADIENTS, OPTIMIZER):
            assert real.peaks[phase].split[kind_] == fake.peaks[phase].split[kind_], (phase, kind_)
        for kind_ in (ACTIVATIONS, "temporaries"):
            a, b = real.peaks[phase].split[kind_], fake.peaks[phase].split[kind_]
            assert abs(a - b) <= atol + rtol * max(b, 1), (phase, kind_, a, b)
        assert abs(real.peaks[phase].total - fake.peaks[phase].total) <= rtol * fake.peaks[phase].total
    for where in fake.saved:
        assert abs(real.saved[where] - fake.saved[where]) <= atol + rtol * sum(fake.saved.values()), where
    rounded = replace(setup, round_to=CUDA_BLOCK)
    assert _trace_fields(trace_step(replace(rounded, execution="real"))) == _trace_fields(trace_step(rounded))


@pytest.mark.parametrize("limit", ["bytes", "flops"])
def test_a_step_past_the_real_limits_is_traced_instead(monkeypatch, limit):
    """Past REAL_STEP_BYTES live or REAL_STEP_FLOPS the real run stops and the step is traced under
    FakeTensorMode: the same numbers as a trace from the start, the trainer's own error handling
    notwithstanding."""
    cfg = config("cycle", *ALL_TERMS)
    setup = setup_of(CYCLE, cfg, round_to=CUDA_BLOCK, execution="auto")
    small = trace_step(setup)
    assert small.real
    fake = trace_step(replace(setup, execution="fake"))
    assert _trace_fields(small) == _trace_fields(fake)  # at 512-byte rounding, these sizes
    if limit == "bytes":  # the parameters' share fits, the step's activations do not
        monkeypatch.setattr(resources_module, "REAL_STEP_BYTES", 5 * max(p.total for p in fake.peaks.values()) // 8)
    else:
        monkeypatch.setattr(resources_module, "REAL_STEP_FLOPS", fake.flops_forward // 2)
    stopped = trace_step(setup)
    assert not stopped.real
    assert _trace_fields(stopped) == _trace_fields(fake)
    with pytest.raises(resources_module.RealStepTooLarge):
        trace_step(replace(setup, execution="real"))


class SwallowingCycleTrainer(CycleVAETrainer):
    """Goes on after any error of its step with a loss of 0 (a trainer that 'degrades gracefully')."""

    def forward(self, batch, *, step=None, draws=None):
        try:
            return super().forward(batch, step=step, draws=draws)
        except Exception:
            return torch.zeros((), requires_grad=True), {}


def test_a_trainer_that_swallows_the_stop_is_still_traced_instead(monkeypatch):
    cfg = config("cycle", *ALL_TERMS)
    setup = setup_of(Subject(TrainerSpec.of(SwallowingCycleTrainer), "cycle"), cfg, round_to=CUDA_BLOCK)
    monkeypatch.setattr(resources_module, "REAL_STEP_FLOPS", 1)
    with pytest.raises(resources_module.RealStepTooLarge):
        trace_step(replace(setup, execution="real"))


def test_a_cpu_trace_follows_cuda_autocast_where_cpu_autocast_differs():
    x, layer = torch.randn(4, 8), torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).softmax(-1).dtype == torch.bfloat16  # CPU autocast alone
        with CudaAutocastPolicy():
            y = layer(x)
            assert y.dtype == torch.bfloat16  # matmuls in the low dtype, as on CUDA
            assert y.softmax(-1).dtype == torch.float32  # CUDA runs softmax in float32
            assert torch.nn.functional.layer_norm(y, (8,)).dtype == torch.float32
    with CudaAutocastPolicy():
        assert torch.randn(3, dtype=torch.bfloat16).softmax(-1).dtype == torch.bfloat16  # no autocast, no cast
    # What autograd saves follows: softmax saves its output, in float32 under the policy.
    saved = {}
    for name, policy in (("cpu", nullcontext()), ("cuda", CudaAutocastPolicy())):
        with FakeTensorMode():
            layer, x = torch.nn.Linear(64, 64), torch.randn(16, 64)
            tracer = StepTracer(round_to=1)
            with tracer, tracer.saving(), torch.autocast("cpu", dtype=torch.bfloat16), policy:
                layer(x).softmax(-1).float().sum().backward()
        saved[name] = sum(tracer.saved.values())
    assert saved["cuda"] - saved["cpu"] == 16 * 64 * (4 - 2)


def test_parameters_gradients_and_adamw_state_equal_the_exact_count():
    cfg = config("cycle", *ALL_TERMS)
    trace = trace_step(setup_of(CYCLE, cfg, round_to=CUDA_BLOCK))
    model = tiny_model(0, vocab_size=SIZES["vocab_size"], latent_dim=SIZES["latent_dim"], base=cfg.model)
    trainer = CYCLE.build(model, VOCAB, dtype_from_config(cfg), cfg)
    state = WeakIdKeyDictionary()
    for t in list(model.parameters()) + list(trainer.buffers()):
        state[t.untyped_storage()] = round_up(t.untyped_storage().nbytes())
    params = [round_up(4 * p.numel()) for p in model.parameters()]
    assert trace.params_trained == trace.params_total == sum(p.numel() for p in model.parameters())
    for phase in PHASES:
        assert trace.peaks[phase].split[PARAMETERS] == sum(state.values()), phase
        assert trace.peaks[phase].split[OPTIMIZER] == 2 * sum(params), phase  # exp_avg, exp_avg_sq
    assert trace.at_start[STEP][GRADIENTS] == sum(params)  # every parameter trained
    assert trace.peaks[STEP].total == sum(trace.peaks[STEP].split[c] for c in CATEGORIES)


def test_adamw_holds_no_state_for_what_the_schedule_never_trains():
    # l2t alone never trains the latent group (frozen) nor what feeds only the latent head.
    alone = measure_steps({"l2t": setup_of(STABLE, config("stable", "loss.loss_type=l2t"))})["l2t"]
    traced = alone.traces[1]
    assert 0 < traced.params_trained < traced.params_total
    assert alone.peaks[STEP].split[OPTIMIZER] == 2 * 4 * traced.params_trained  # float32 exp_avg, exp_avg_sq
    # A sequential l2t/t2l run trains every parameter in one mode or the other: AdamW keeps the state of all.
    both = measure_steps(
        {m: setup_of(STABLE, config("stable", f"loss.loss_type={m}")) for m in ("l2t", "t2l")}, shared_state=True
    )
    for cost in both.values():
        assert cost.peaks[STEP].split[OPTIMIZER] == 2 * 4 * traced.params_total


def test_flops_of_a_linear_layer_equal_the_hand_count():
    batch, fan_in, fan_out = 5, 24, 40
    with FakeTensorMode():
        layer = torch.nn.Linear(fan_in, fan_out)
        x = torch.randn(batch, fan_in, requires_grad=True)
        tracer = StepTracer()
        with tracer:
            layer(x).sum().backward()
        counter = FlopCounterMode(display=False)
        with counter:
            layer(x).sum().backward()
    # forward x @ W^T; backward dL/dx = g @ W and dL/dW = g^T @ x: three [5 x 24 x 40] matmuls
    assert tracer.flops == 3 * 2 * batch * fan_in * fan_out
    assert tracer.flops == counter.get_total_flops()


def test_flops_of_a_joint_attention_block_equal_the_hand_count():
    from mmdit.mmdit_pytorch import JointAttention

    dims, tokens, heads, dim_head, batch = (32, 16), (7, 1), 2, 8, 3
    with FakeTensorMode():
        attention = JointAttention(dim_inputs=dims, dim_head=dim_head, heads=heads)
        inputs = tuple(torch.randn(batch, n, d, requires_grad=True) for n, d in zip(tokens, dims))
        tracer = StepTracer()
        with tracer:
            sum(out.sum() for out in attention(inputs)).backward()
        counter = FlopCounterMode(display=False)
        with counter:
            sum(out.sum() for out in attention(inputs)).backward()
    inner, n = heads * dim_head, sum(tokens)
    projections = sum(2 * batch * t * d * 3 * inner + 2 * batch * t * inner * d for t, d in zip(tokens, dims))
    scores_and_mix = 2 * (2 * batch * heads * n * n * dim_head)  # q k^T and attn v over the joint sequence
    forward = projections + scores_and_mix
    assert tracer.flops == 3 * forward  # backward: two matmuls per forward matmul, every operand needs a gradient
    assert tracer.flops == counter.get_total_flops()


@pytest.mark.parametrize("execution", ["fake", "real"])
@pytest.mark.parametrize("step", ["cycle", "stable_t2l"])
def test_a_deeper_model_extrapolated_from_two_depths_equals_its_direct_trace(step, execution):
    subject, kind, overrides = STEPS[step]
    setup = setup_of(subject, config(kind, *overrides, *AUTOCAST), n_blocks=3, round_to=CUDA_BLOCK, execution=execution)
    extrapolated = measure_steps({"x": setup})["x"]
    traced = trace_step(setup, 3)
    direct = without_state(traced, traced.untrained_state)  # as measure_steps does for one run
    assert extrapolated.extrapolated and sorted(extrapolated.traces) == [1, 2]
    for phase in PHASES:
        assert extrapolated.peaks[phase].total == direct.peaks[phase].total, phase
        assert extrapolated.peaks[phase].split == direct.peaks[phase].split, phase
    assert (extrapolated.flops_forward, extrapolated.flops_backward) == (direct.flops_forward, direct.flops_backward)
    assert extrapolated.saved == direct.saved


def test_a_full_size_step_is_traced_without_allocating_it():
    cfg = load_config(config_path("cycle_cluster"), ["loss.loss_type=t2l"])
    sizes = {"vocab_size": 30522, "latent_dim": int(cfg.model.latent_dim), "cluster_size": 0}
    setup = StepSetup(STABLE, cfg, OmegaConf.merge(cfg.model, {"n_blocks": 1}), sizes, VOCAB, 4, 1024, 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trace = trace_step(setup)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    peak = max(p.total for p in trace.peaks.values())
    assert not trace.real  # its parameters alone pass REAL_STEP_BYTES: traced, not run
    assert peak > 2 * 2**30, peak  # [4, 1024, 30522] float32 logits and their gradients alone are 0.47 GiB each
    assert grown < peak / 8, (grown, peak)


def test_sizes_parse_with_their_unit_and_refuse_without():
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("81920MiB") == 80 * 2**30
    assert parse_size(" 1.5 TiB") == int(1.5 * 2**40)
    for bad, why in (
        ("80", "no unit"),
        ("80 GiBs", "unknown unit"),
        ("-1GiB", "not a positive"),
        ("eighty GiB", "not a number"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_size(bad)


def test_batch_candidates_keep_the_global_batch():
    assert batch_candidates(4, 1) == [2, 1]
    assert batch_candidates(6, 2) == [4, 3, 2, 1]  # global 12
    assert batch_candidates(1, 3) == []
    assert math.isclose(gpu_hours(1e15, 3600, 1000.0, mfu=0.5), 2.0)  # 1 PFLOP a step at 500 TFLOP/s: 2 s


def test_the_stable_schedule_gives_the_modes_measured():
    sequential = config("stable")  # l2t 1 step, t2l 1 step
    assert stable_modes(sequential)[0] == {"l2t": 0.5, "t2l": 0.5}
    assert stable_modes(config("stable", "loss.loss_type=t2l"))[0] == {"t2l": 1.0}
    modes, _ = stable_modes(config("stable", "loss.loss_type=random", "training.mode_weights=[0.0,3.0,1.0]"))
    assert modes == {"l2t": 0.75, "t2l": 0.25}
    modes, why = stable_modes(config("cycle"))
    assert modes == {"l2t": 0.5, "t2l": 0.5} and "not a stable mode" in why


def test_the_cycle_step_is_measured_past_every_warmup_and_ramp():
    cfg = config("cycle")  # text: warmup 2 + ramp 20; latent: warmup 4 + ramp 12
    step = full_weight_step(cfg)
    assert step == 22
    weights = cycle_weights(cfg, step)
    assert weights == {
        "cycle_text": float(cfg.loss.cycle_text_weight),
        "cycle_latent": float(cfg.loss.cycle_latent_weight),
    }
    assert cycle_weights(cfg, 0) == {"cycle_text": 0.0, "cycle_latent": 0.0}


@pytest.mark.gpu
@pytest.mark.parametrize("step", list(STEPS))
def test_the_estimate_matches_cuda_max_memory_allocated(step):
    """A real step on CUDA (bf16 autocast, AdamW foreach in its steady state) against the trace of the
    same step on fake CUDA tensors: within TOLERANCES["resources_cuda_peak"]."""
    subject, kind, overrides = STEPS[step]
    cfg = config(kind, *overrides, *AUTOCAST, "model.hidden_size=256", "model.cond_dim=256", "model.max_seq_len=128")
    sizes = dict(SIZES, vocab_size=1000)
    vocab = SyntheticVocab(1000, mask_token_id=999, pad_token_id=0)
    setup = StepSetup(
        subject, cfg, OmegaConf.merge(cfg.model, {"n_blocks": 2}), sizes, vocab, 4, 128, 0, "cuda", execution="fake"
    )
    trace = trace_step(setup)
    estimate = max(p.total for p in trace.peaks.values())

    device = torch.device("cuda")
    model = tiny_model(0, vocab_size=1000, latent_dim=sizes["latent_dim"], base=setup.model_config, device=device)
    model.train()
    trainer = subject.build(model, vocab, dtype_from_config(cfg), cfg)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    batch = {k: v.to(device) for k, v in tiny_batch(4, 128, sizes["latent_dim"], seed=1, vocab=vocab).items()}

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast("bf16", device):
            loss, _, _, _ = subject.call(trainer, batch, step=0, draws={})
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one_step()  # AdamW's state exists from here on, as in the steady state the trace models
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    one_step()
    measured = torch.cuda.max_memory_allocated()
    rtol = TOLERANCES["resources_cuda_peak"][0]
    assert abs(estimate - measured) <= rtol * measured, (
        f"{step}: estimate {estimate / 2**20:.1f} MiB vs max_memory_allocated {measured / 2**20:.1f} MiB on "
        f"{torch.cuda.get_device_name()}"
    )


@pytest.fixture(scope="module")
def tiny_context(tmp_path_factory):
    """The gate's context on a checkpoint of the packaged tiny model, its weights not loaded."""
    from compat.harness import CompatContext
    from compat.options import CompatOptions
    from latentDLM_mmdit.checkpoints import save_checkpoint
    from latentDLM_mmdit.factory import build_model

    folder = tmp_path_factory.mktemp("resources")
    cfg = load_config(config_path("cycle"))
    checkpoint = save_checkpoint(
        folder / "tiny.safetensors", build_model(cfg, seed=0), config=cfg, trainer_kind="stable", step=1
    )
    return CompatContext.create(CompatOptions(checkpoint=str(checkpoint)), folder, load_model=False)


def run_check(ctx, name: str, **options) -> tuple[str, dict]:
    """(outcome, measured) of the resources row's check `name` with the gate's `options`."""
    from dataclasses import replace as with_options

    from compat.test_row_resources import CHECKS

    measured, saved = {}, ctx.options
    ctx.options = with_options(saved, **options)
    try:
        CHECKS[name](ctx, lambda key, value, review=False: measured.update({key: (value, review)}))
    except pytest.skip.Exception as exc:
        return f"skipped: {exc}", measured
    except AssertionError as exc:
        return f"failed: {exc}", measured
    finally:
        ctx.options = saved
    return "passed", measured


@pytest.mark.slow
def test_the_fit_check_names_the_batch_that_fits_or_the_headroom(tiny_context):
    ctx = tiny_context
    outcome, _ = run_check(ctx, "fit")
    assert outcome.startswith("skipped: not applicable") and "--gpu-memory" in outcome
    # The tiny cycle step needs 36.5 MiB per rank (DDP's buckets included), the stable step 19.7 MiB.
    outcome, measured = run_check(ctx, "fit", gpu_memory="24MiB")
    assert re.match(
        r"failed: the cycle step needs 3\d\.\d MiB per rank and does not fit 24\.0 MiB where the stable step "
        r"\(19\.\d MiB\) did: set training\.train_batch_size 1 and training\.gradient_accumulation_steps 4 "
        r"\(same global batch",
        outcome,
    ), outcome
    outcome, measured = run_check(ctx, "fit", gpu_memory="40MiB")
    assert outcome == "passed" and measured["fit_headroom"][1], measured  # 9% free: REVIEW
    outcome, measured = run_check(ctx, "fit", gpu_memory="1GiB")
    assert outcome == "passed" and not measured["fit"][1] and "fits 1 GiB, 96% free" in measured["fit"][0], measured
    outcome, measured = run_check(ctx, "cost", gpu_tflops=100.0)
    assert outcome == "passed" and "GPU-hours per rank (x4.00)" in measured["gpu_hours"][0], measured


class NumpyMetricsCycleTrainer(CycleVAETrainer):
    """The built-in cycle trainer, its metrics read through `.numpy()` (fine on real tensors)."""

    def forward(self, batch, *, step=None, draws=None):
        loss, metrics = super().forward(batch, step=step, draws=draws)
        metrics["loss_np"] = float(loss.detach().cpu().numpy())
        return loss, metrics


class BrokenCycleTrainer(CycleVAETrainer):
    def forward(self, batch, *, step=None, draws=None):
        raise AttributeError("no attribute current_step")


@pytest.mark.slow
def test_a_step_that_cannot_be_traced_is_not_run_and_a_raising_one_is_incompatible(tiny_context, monkeypatch):
    ctx, saved = tiny_context, tiny_context.cycle_subject
    try:
        ctx.cycle_subject, ctx.resources = Subject(TrainerSpec.of(NumpyMetricsCycleTrainer), "cycle"), {}
        outcome, _ = run_check(ctx, "memory")  # the tiny default's step is small: run for real, it reads values
        assert outcome == "passed", outcome
        with monkeypatch.context() as patched:  # as a full-size step: traced, no values to read
            patched.setattr(resources_module, "REAL_STEP_BYTES", 0)
            ctx.resources = {}
            outcome, _ = run_check(ctx, "memory")
        assert outcome.startswith("skipped: could not check: the step cannot be traced without data"), outcome
        assert ".numpy()" in outcome
        ctx.cycle_subject, ctx.resources = Subject(TrainerSpec.of(BrokenCycleTrainer), "cycle"), {}
        outcome, _ = run_check(ctx, "memory")
        assert outcome.startswith("failed: the cycle trainer BrokenCycleTrainer raised AttributeError"), outcome
    finally:
        ctx.cycle_subject, ctx.resources = saved, {}


def test_a_cycle_only_defect_keeps_the_stable_traces_and_a_module_defect_keeps_none():
    """Under a planted defect the resources row re-traces what the defect can change: the stable
    trainer's traces are kept only when every patch replaces an attribute of a class the stable
    trainer is not made of."""
    from types import SimpleNamespace
    from unittest import mock

    import latentDLM_mmdit.losses as losses
    from compat.mutants import MUTANTS
    from compat.mutants import fresh_runs
    from compat.trainer_spec import TrainerSpec
    from cycle_vae_impl.trainers.cycle_vae_trainer import CycleVAETrainer
    from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer

    cached = {("stable",): "s", ("counterparts", ("l2t",)): "c", ("cycle", 4): "x", ("cycle@0",): "z"}

    def kept_under(patches):
        ctx = SimpleNamespace(
            trajectories={"run": 1},
            resources=dict(cached),
            stable_subject=SimpleNamespace(spec=TrainerSpec.of(MultimodalDiffusionTrainer)),
        )
        with fresh_runs(ctx, SimpleNamespace(patches=lambda: patches)):
            inside = dict(ctx.resources), dict(ctx.trajectories)
        assert ctx.resources == cached and ctx.trajectories == {"run": 1}  # restored after
        return inside

    resources, trajectories = kept_under([mock.patch.object(CycleVAETrainer, "cycle_step", None)])
    assert set(resources) == {("stable",), ("counterparts", ("l2t",))} and trajectories == {}
    assert kept_under([mock.patch.object(losses, "masked_text_ce", None)])[0] == {}
    shared = MultimodalDiffusionTrainer.__mro__[1]  # a base class both trainers may share
    assert kept_under([mock.patch.object(shared, "__doc__", None)])[0] == {}
    graph_kept = next(m for m in MUTANTS if m.name == "cycle_latent_graph_kept")
    assert set(kept_under(graph_kept.patches())[0]) == {("stable",), ("counterparts", ("l2t",))}
