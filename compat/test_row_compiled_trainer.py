"""Row: compiled trainer (torch.compile).

Upstream's training script wraps the trainer in `torch.compile` (here: `training.compile_model`,
`training.compile_backend`). A trainer that is right in eager mode can still be wrong, or slow,
compiled: a Python value that dynamo bakes into the graph (a per-step weight read as a Python
float) recompiles the step at every value, and past torch's recompile limit dynamo silently runs
the step eagerly; a side effect or a data-dependent branch can be traced differently. On the same
batch and injected draws, each trainer (the built-in ones or the user's `--stable-trainer` /
`--cycle-trainer`) compiled with the row's backend against the same trainer in eager mode:

- compiled_matches_eager: stable l2t, stable t2l and the cycle step with all four terms on: the
  loss and the gradient of every parameter within the table's tolerance for the backend;
- recompilations_bounded: the cycle trainer compiled once and stepped through a warmup + ramp
  schedule of `SCHEDULE_STEPS` steps (each term with its own weight, warmup and ramp): its loss at
  every step equals eager's, and the step recompiles at most `compile_max_recompiles` times (once
  per term whose warmup ends is the floor: a term that starts running changes the graph). The
  recompilations (step and dynamo's reason) and the graph breaks (count per reason) are measured.
  Recompilations and graph breaks are dynamo's decisions, the same for every backend: this check
  compiles with the `eager` backend (dynamo alone), which costs a third of aot_eager's compile time.

Backend: `--compile-backend`, else `aot_eager` on the CPU (dynamo and AOTAutograd trace as inductor
does, the kernels are eager: numerics, recompilations and graph breaks without code generation) and
`inductor` on CUDA. Scope: `--compile-scope full` compiles the trainer with the model's forward
inlined, as the cluster run does; `trainer` (the default on the CPU) compiles the trainer's own code
(draws, noising, weights, losses, the total) with each model pass kept eager, because dynamo needs
about 30 s of CPU to trace one forward of the mmdit backbone (hyper-connections and einops are
Python-heavy) and a cycle step makes four. The GPU job runs `full` with inductor. Where dynamo is
unavailable (a Python or platform torch.compile does not support) the row is NOT RUN by design, with
the reason.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch

from compat.harness import row_runner, row_settings, row_test
from compat.oracle import TOLERANCES
from compat.outcomes import expect, not_applicable
from compat.subjects import trainer_failure
from latentDLM_mmdit.factory import dtype_from_config

pytestmark = pytest.mark.compat_row("compiled_trainer")

SEED = 300
# Every term on, distinct weights (the step's total must weigh each term with its own).
CYCLE = row_settings(
    dict(
        latent_t_mode="full",
        cycle_text_weight=0.5,
        cycle_latent_weight=0.3,
        cycle_latent_sampling="argmax",
        cycle_text_warmup_steps=0,
        cycle_text_ramp_steps=0,
        cycle_latent_warmup_steps=0,
        cycle_latent_ramp_steps=0,
    )
)
# A warmup + ramp schedule: cycle_text 0 at steps 0-1, ramping until step 4; cycle_latent 0 at
# steps 0-2, ramping until step 4; both at full weight from step 4. A term turning on may recompile
# the frame that branches on it (at most two); every ramp value must reuse the graph.
SCHEDULE = row_settings(
    {
        **CYCLE,
        "cycle_text_warmup_steps": 1,
        "cycle_text_ramp_steps": 3,
        "cycle_latent_warmup_steps": 2,
        "cycle_latent_ramp_steps": 2,
    }
)
SCHEDULE_STEPS = 6
STABLE_MODES = ("l2t", "t2l")


def backend_of(ctx) -> str:
    """The backend the row compiles with: the option, else aot_eager on CPU and inductor on CUDA."""
    chosen = ctx.options.compile_backend
    if chosen:
        return chosen
    return "inductor" if ctx.device.type == "cuda" else "aot_eager"


def require_dynamo(ctx) -> str:
    backend = backend_of(ctx)
    if not torch._dynamo.is_dynamo_supported():
        not_applicable(f"torch.compile is not supported by this torch {torch.__version__} on this Python")
    return backend  # one of COMPILE_BACKENDS: --compile-backend is checked with the other options


def scope_of(ctx) -> str:
    """What the row compiles: the option, else `full` on CUDA and `trainer` on the CPU."""
    return ctx.options.compile_scope or ("full" if ctx.device.type == "cuda" else "trainer")


# The table's entry per backend (compiled against eager).
COMPILE_TOLERANCES = {"eager": "compiled_eager", "aot_eager": "compiled_aot_eager", "inductor": "compiled_inductor"}


class Compiled:
    """One trainer built twice over two identical models: `eager` and `compiled` (torch.compile of
    the trainer, as upstream's script did). `step` runs one of them with the row's draws."""

    def __init__(self, ctx, subject, config, backend: str, scope: str):
        self.subject = subject
        self.models = {"eager": ctx.fresh_semantic_model(), "compiled": ctx.fresh_semantic_model()}
        for model in self.models.values():
            for p in model.parameters():
                p.requires_grad_(True)
        if scope == "trainer":  # each model pass a graph break, run eagerly (this copy of the model only)
            self.models["compiled"].forward = torch.compiler.disable(self.models["compiled"].forward)
        dtype = dtype_from_config(config)
        self.trainers = {name: subject.build(m, ctx.vocab, dtype, config) for name, m in self.models.items()}
        self.run = {
            "eager": self.trainers["eager"],
            "compiled": torch.compile(self.trainers["compiled"], backend=backend),
        }

    def step(self, which: str, batch, draws, step: int | None, grad: bool) -> torch.Tensor:
        """The loss of one step of `which` ("eager" or "compiled"); with `grad`, its backward too. A
        trainer without `draws=` runs from the same global seed on both sides."""
        model = self.models[which]
        model.zero_grad(set_to_none=True)
        kwargs = {}
        if self.subject.spec.accepts_step and step is not None:
            kwargs["step"] = step
        if self.subject.spec.accepts_draws:
            kwargs["draws"] = {k: v for k, v in draws.items() if k in self.subject.spec.draw_names}
        with torch.random.fork_rng(devices=[]), torch.set_grad_enabled(grad):
            torch.manual_seed(SEED)
            try:
                loss, _ = self.run[which](batch, **kwargs)
            except Exception as exc:
                raise trainer_failure(self.subject.role, self.subject.spec, f"step ({which})", exc) from exc
            if grad:
                loss.backward()
        return loss.detach()

    def gradients(self, which: str) -> torch.Tensor:
        return torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().reshape(-1)
                for p in self.models[which].parameters()
            ]
        )


def inputs(ctx):
    batch = {k: v.to(ctx.device) for k, v in ctx.batch(ctx.options.batch_size, seed=SEED).items()}
    draws = {k: v.to(ctx.device) for k, v in ctx.draws(batch, seed=SEED).items()}
    return batch, draws


def subjects(ctx):
    """(name, subject, config) of each compared setting."""
    stable = [(f"stable_{m}", ctx.stable_subject, ctx.stable_config_for(m)) for m in STABLE_MODES]
    return [("cycle", ctx.cycle_subject, ctx.cycle_config_for(CYCLE)), *stable]


def graph_break_summary() -> dict[str, int]:
    """Graph breaks since the last reset, counted by the first line of dynamo's reason."""
    from torch._dynamo.utils import counters

    seen: Counter = Counter()
    for reason, count in counters["graph_break"].items():
        seen[reason.strip().splitlines()[0][:90]] += count
    return dict(seen)


def recompilations() -> list[tuple[str, str]]:
    """(frame, reason) of every recompilation since the last reset."""
    from torch._dynamo.utils import get_compilation_metrics

    return [(m.co_name or "?", str(m.recompile_reason)) for m in get_compilation_metrics() if m.recompile_reason]


def fresh_dynamo() -> None:
    from torch._dynamo.utils import clear_compilation_metrics, counters

    torch._dynamo.reset()
    clear_compilation_metrics()
    counters.clear()


def compare(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: str, what: str) -> float:
    rtol, atol = TOLERANCES[tolerance]
    got, want = got.double().cpu(), want.double().cpu()
    expect(
        bool(torch.isfinite(got).all() and torch.isfinite(want).all()),
        f"the {name} trainer's {what} is non-finite compiled or eager",
        "find the non-finite value in the step (it is not a compilation difference)",
    )
    rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    expect(
        torch.allclose(got, want, rtol=rtol, atol=atol),
        f"under torch.compile the {name} trainer's {what} differs from eager beyond tol('{tolerance}')",
        "keep the step's semantics inside the compiled region (no branch on torch.compiler.is_compiling(), "
        "the attention mask converted the same way)",
        f"rtol {rtol}, atol {atol}: max |diff| {float((got - want).abs().max()):.3g}, relative {rel:.3g}",
    )
    return rel


def check_compiled_matches_eager(ctx, measure):
    backend, scope = require_dynamo(ctx), scope_of(ctx)
    tolerance = COMPILE_TOLERANCES[backend]
    batch, draws = inputs(ctx)
    fresh_dynamo()
    started = time.perf_counter()
    worst = {}
    for name, subject, config in subjects(ctx):
        pair = Compiled(ctx, subject, config, backend, scope)
        want = pair.step("eager", batch, draws, step=0, grad=True)
        got = pair.step("compiled", batch, draws, step=0, grad=True)
        worst[name] = max(
            compare(name, got, want, tolerance, "loss"),
            compare(name, pair.gradients("compiled"), pair.gradients("eager"), tolerance, "gradients"),
        )
    measure("backend", f"{backend}, scope {scope}, on {ctx.device.type} (tol('{tolerance}'))")
    measure("compiled_vs_eager_max_rel", ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))
    measure("compile_and_run_s", round(time.perf_counter() - started, 1))
    del pair
    fresh_dynamo()  # the compiled graphs and dynamo's caches are not kept for the rest of the gate


def check_recompilations_bounded(ctx, measure):
    require_dynamo(ctx)
    backend, scope = "eager", scope_of(ctx)  # dynamo's guards and breaks do not depend on the backend
    tolerance = COMPILE_TOLERANCES[backend]
    limit = int(TOLERANCES["compile_max_recompiles"][0])
    if not ctx.cycle_subject.spec.accepts_step:
        not_applicable(
            f"the cycle trainer {ctx.cycle_subject.spec.cls.__qualname__} takes no step= argument: "
            "it has no schedule to recompile over"
        )
    batch, draws = inputs(ctx)
    pair = Compiled(ctx, ctx.cycle_subject, ctx.cycle_config_for(SCHEDULE), backend, scope)
    fresh_dynamo()
    at_step: dict[int, list[tuple[str, str]]] = {}
    for step in range(SCHEDULE_STEPS):
        before = len(recompilations())
        got = pair.step("compiled", batch, draws, step=step, grad=False)
        at_step[step] = recompilations()[before:]
        want = pair.step("eager", batch, draws, step=step, grad=False)
        compare(f"cycle step {step}", got, want, tolerance, "loss")
    breaks = graph_break_summary()
    # Step 0 compiles the step (helper frames called with several shapes compile a variant each);
    # a recompilation is a later step that compiled anything.
    steps = [s for s, found in at_step.items() if found and s > 0]
    measure("backend", f"{backend}, scope {scope}")
    measure("first_step_frame_variants", len(at_step[0]))
    measure("recompiled_at_steps", ", ".join(map(str, steps)) or "none")
    measure("graph_breaks", "; ".join(f"{n} x {r}" for r, n in sorted(breaks.items(), key=lambda x: -x[1])) or "none")
    reasons = [f"step {s}: {frame}: {reason.splitlines()[0][:160]}" for s in steps for frame, reason in at_step[s]]
    del pair
    fresh_dynamo()  # the compiled graphs and dynamo's caches are not kept for the rest of the gate
    expect(
        len(steps) <= limit,
        f"the compiled cycle step recompiles at {len(steps)} of {SCHEDULE_STEPS} steps of a warmup + ramp schedule "
        f"(at most {limit}: one per term turning on): a per-step Python value is a constant of the graph, and past "
        "torch's recompile limit the step silently runs eagerly",
        "pass the step's cycle weights into the compiled step as tensors, computed outside it",
        "; ".join(reasons),
    )


CHECKS = {
    "compiled_matches_eager": check_compiled_matches_eager,
    "recompilations_bounded": check_recompilations_bounded,
}


run_row = row_runner(CHECKS)
test_compiled_trainer = row_test(CHECKS)
