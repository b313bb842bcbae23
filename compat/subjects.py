"""Running one step of a trainer under test, as every row sees it.

A `Subject` is a trainer class (the built-in one, or the user's given by SPEC) in a role ("stable"
reference or "cycle" candidate). `Subject.step` builds it the way upstream does (`cls(model,
tokenizer, MaskedDiffusion(tokenizer), dtype, config)`), runs `forward(batch)` on a model wrapped
in a `PassRecorder`, and returns a `StepRecord`: the loss and metrics it returned, every model pass
named by what it was given, and the random numbers it used.

Identical draws for both trainers: the rows hold named draws (`latent_noise`, `cycle_latent_noise`,
`latent_t`, ...). A trainer with a `draws=` keyword gets those it names in `DRAW_NAMES`; any other
trainer runs inside a `DrawCapture` that serves the same tensors to its standard normal / uniform
draws of the same sizes, in order (`served_from`). Which noise a noised pass really used is then
attributed by observation: its latents must equal sqrt(ab) x0 + sqrt(1 - ab) n for one of the
draws (`StepRecord.noise_of`).

A trainer that raises (constructor or step) or returns something else than `(loss, metrics)` gives
a `CandidateError`: an AssertionError, so the row that needed the step is INCOMPATIBLE, its message
naming the exception and the last frame in the trainer's own file.
"""

from __future__ import annotations

import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from compat import oracle
from compat.config_reads import trainer_running
from compat.draw_capture import DrawCapture
from compat.observe import (
    PASS_INPUTS,
    ModelPass,
    PassRecorder,
    classify_passes,
    passes_of,
)
from compat.outcomes import expect, incompatible
from compat.trainer_spec import TrainerSpec
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.trainer_base import config_for

# Named draws and the standard draw each stands for in a trainer that draws for itself, in the
# order such a trainer draws them (see `served_from`).
NORMAL_DRAWS = ("latent_noise", "cycle_latent_noise")
UNIFORM_DRAWS = ("text_t", "latent_t", "cycle_latent_t", "mask_uniform", "pseudo_token_uniform")
INJECTED, CAPTURED, NONE = "injected by name (draws=)", "captured from its random calls and served", "none drawn"


class CandidateError(AssertionError):
    """The trainer under test failed: raised in its constructor or step, or broke the protocol."""


def served_from(draws: Mapping[str, torch.Tensor]) -> dict[tuple[str, int], list[torch.Tensor]]:
    """Named draws as a `DrawCapture` serves them: by kind and size, in the order above."""
    served: dict[tuple[str, int], list[torch.Tensor]] = OrderedDict()
    for kind, names in (("normal", NORMAL_DRAWS), ("uniform", UNIFORM_DRAWS)):
        for name in names:
            if name in draws:
                value = draws[name].detach().cpu()
                served.setdefault((kind, value.numel()), []).append(value)
    return served


def sample_draws(draws: Mapping[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """The draws of sample i of a batch (row i of each), for running that sample alone."""
    return {k: v[i : i + 1] for k, v in draws.items()}


def trainer_failure(role: str, spec: TrainerSpec, phase: str, exc: BaseException) -> CandidateError:
    """The CandidateError for `exc` raised by the trainer `spec` in `phase`: the exception and the
    last frame of the trainer's own file (or folder)."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = spec.source_file.parent if spec.source_file is not None else None
    chosen = [f for f in frames if own is not None and Path(f.filename).resolve().is_relative_to(own)] or frames
    where = f" at {chosen[-1].filename}:{chosen[-1].lineno} in {chosen[-1].name}" if chosen else ""
    message = " ".join(str(exc).split()) or "(no message)"
    return CandidateError(
        f"the {role} trainer {spec.cls.__qualname__} raised {type(exc).__name__} in its {phase}: {message}{where}"
    )


@dataclass
class StepRecord:
    """What one step did. `passes` are named (see `compat.observe`); `draws` are the named draws
    the harness offered; `draw_mode` says how they reached the trainer."""

    loss: torch.Tensor
    metrics: dict
    passes: list[ModelPass]
    draws: dict[str, torch.Tensor]
    draw_mode: str
    capture: DrawCapture | None
    trainer: Any = field(repr=False)
    recorder: PassRecorder = field(repr=False, default=None)

    @property
    def kinds(self) -> list[str]:
        return [p.kind for p in self.passes]

    def one(self, kind: str) -> ModelPass:
        """The step's single pass of `kind`; Incompatible naming what the step did otherwise."""
        found = passes_of(self.passes, kind)
        expect(
            len(found) == 1,
            f"the step makes {len(found)} {kind} model passes where it must make one (its passes, named by their "
            f"inputs: {', '.join(self.kinds) or 'none'})",
            f"give the {kind} pass {PASS_INPUTS[kind]}",
        )
        return found[0]

    def release_outputs(self) -> "StepRecord":
        """Drops the passes' outputs (text logits are [B, S, V]: with a 30k vocabulary a step's four
        passes hold over 100 MiB) for a record whose inputs, timesteps and loss are all that is needed."""
        for p in self.passes:
            p.outputs = ()
        return self

    def has(self, kind: str) -> bool:
        return bool(passes_of(self.passes, kind))

    def candidate_noises(self) -> list[tuple[str, torch.Tensor]]:
        """Every normal draw the step could have used: the offered ones, then the captured ones."""
        found = [(name, self.draws[name]) for name in NORMAL_DRAWS if name in self.draws]
        if self.capture is not None:
            found += [(f"captured draw {d.describe()}", d.value) for d in self.capture.draws]
        return found

    def noise_of(
        self, p: ModelPass, x0: torch.Tensor, alphas_cumprod: torch.Tensor, num_timesteps: int, tolerance: str
    ) -> tuple[str, torch.Tensor]:
        """(name, noise [B, D]) such that the pass's latents are sqrt(ab) x0 + sqrt(1 - ab) noise at
        the pass's own latent t under the configured schedule; AssertionError when none is."""
        B = p.batch_size
        t = p.timestep("latent")
        ab = alphas_cumprod[oracle.timestep_index(t, num_timesteps)]
        fed = p.latents_2d.double().cpu()
        tried = []
        for name, noise in self.candidate_noises():
            if noise.numel() != fed.numel():
                continue
            want = oracle.noised(x0.reshape(B, -1), noise.reshape(B, -1).double().cpu(), ab)
            rtol, atol = oracle.TOLERANCES[tolerance]
            if torch.allclose(fed, want, rtol=rtol, atol=atol):
                return name, noise.reshape(B, -1)
            tried.append(f"{name} (max diff {float((fed - want).abs().max()):.3g})")
        tried_text = "; ".join(tried) or "no normal draw of that size"
        incompatible(
            f"the {p.kind} pass's latents are not sqrt(ab) x0 + sqrt(1 - ab) n at its t (mean {float(t.mean()):.4g}) "
            "under the configured schedule for any noise the step drew",
            "noise the latents with the configured model.latent_beta_schedule / latent_timesteps",
            tried_text,
        )


class Subject:
    """A trainer class in a role, driven through upstream's protocol.

    Args:
        spec: the class and what it supports (`TrainerSpec`).
        role: "stable" (the reference) or "cycle" (the candidate), for messages.
    """

    def __init__(self, spec: TrainerSpec, role: str):
        self.spec = spec
        self.role = role

    def build(self, model: torch.nn.Module, vocab: Any, dtype: torch.dtype, config: Any):
        try:
            return self.spec.cls(model, vocab, MaskedDiffusion(vocab), dtype, config_for(self.spec.cls, config))
        except Exception as exc:  # the trainer's own failure is a verdict, not a crash of the gate
            raise trainer_failure(self.role, self.spec, "constructor", exc) from exc

    def step(
        self,
        model: torch.nn.Module,
        vocab: Any,
        dtype: torch.dtype,
        config: Any,
        batch: dict,
        *,
        step: int | None = None,
        draws: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
        mask_token_id: int,
        grad: bool = True,
        outputs: bool = True,
        after: StepRecord | None = None,
    ) -> StepRecord:
        """One step on `batch` (see the module docstring). `grad=False` runs without an autograd
        graph (values only); `outputs=False` keeps no pass's outputs (inputs, timesteps and the loss
        only). `after` continues the trainer of an earlier step (its own state, e.g. its generator)
        instead of building a fresh one."""
        with trainer_running():  # the config keys read in here are the trainer's (compat.config_reads)
            if after is None:
                recorder = PassRecorder(model, keep_outputs=outputs)
                trainer = self.build(recorder, vocab, dtype, config)
            else:
                recorder, trainer = after.recorder, after.trainer
                recorder.passes = []
                recorder.keep_outputs = outputs
            draws = dict(draws or {})
            loss, metrics, capture, mode = self.call(trainer, batch, step=step, draws=draws, seed=seed, grad=grad)
        passes = classify_passes(list(recorder.passes), batch, mask_token_id)
        return StepRecord(loss, metrics, passes, draws, mode, capture, trainer, recorder)

    def call(
        self,
        trainer: Any,
        batch: dict,
        *,
        step: int | None = None,
        draws: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
        grad: bool = True,
    ) -> tuple[torch.Tensor, dict, DrawCapture | None, str]:
        """`trainer(batch)` with `step=` where it takes one and the draws given by name or served:
        (loss, metrics, the capture or None, how the draws reached it)."""
        draws = dict(draws or {})
        kwargs: dict[str, Any] = {}
        if self.spec.accepts_step and step is not None:
            kwargs["step"] = step
        capture = None
        if self.spec.accepts_draws:
            offered = {k: v for k, v in draws.items() if k in self.spec.draw_names}
            if offered:
                kwargs["draws"] = offered
            mode = INJECTED
        else:
            capture = DrawCapture(seed, served=served_from(draws))
            mode = CAPTURED
        run = trainer if isinstance(trainer, torch.nn.Module) else trainer.forward
        try:
            with torch.set_grad_enabled(grad), capture if capture is not None else _nothing():
                out = run(batch, **kwargs)
        except Exception as exc:
            raise trainer_failure(self.role, self.spec, "step", exc) from exc
        loss, metrics = _protocol_output(self, out)
        if capture is not None and not capture.used_global_rng:
            mode = NONE
        return loss, metrics, capture, mode


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _protocol_output(subject: Subject, out) -> tuple[torch.Tensor, dict]:
    if not (
        isinstance(out, (tuple, list))
        and len(out) == 2
        and torch.is_tensor(out[0])
        and out[0].numel() == 1
        and isinstance(out[1], Mapping)
    ):
        shown = type(out).__name__ + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
        raise CandidateError(
            f"the {subject.role} trainer {subject.spec.cls.__qualname__} returned {shown}; the "
            "protocol is forward(batch) -> (scalar loss tensor, metrics dict)"
        )
    return out[0], dict(out[1])
