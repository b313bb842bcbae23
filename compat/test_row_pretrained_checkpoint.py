"""Row: pretrained checkpoint.

Users reuse checkpoints written by the stable trainer (upstream's `.pt` files, or this project's
safetensors) to start the cycle trainer. That is only compatible if the weights load strictly
(every key, every shape, nothing left at its initial value) and give the numbers the stable trainer
gave. Checked on the checkpoint under test (embedded default: written by the stable training loop):

(a) it loads strictly into the configured model, and every weight is finite (the rows that use the
    model are NOT RUN, blocked, when one is not);
(b) two fresh model instances loaded from it, one driven by the stable trainer and one by the
    cycle trainer, give bit-identical L2T and T2L outputs on the same batch and draws (observed
    passes), the same T2L latent loss, and the cycle trainer's base loss (cycle weights 0) is the
    stable L2T loss + latent_loss_weight x the stable T2L term; model outputs bit-identical to the
    shared model's; the checkpoint file is unchanged by loading;
(c) the same weights in upstream's layouts load strictly through
    `latentDLM_mmdit.checkpoints.load_checkpoint_into` (a fresh call each time, into a model whose
    every tensor was set to NaN first, so a tensor left unloaded shows) and give bit-identical
    outputs: upstream's trainer dict (`model_state_dict` with `model.` keys and the text noise
    schedule's buffers), DDP + torch.compile prefixes (`module._orig_mod.model.`, and the other
    nesting order), and a bare state dict; the source files' sha256 are unchanged;
(d) a real checkpoint written under mmdit 0.2.2 (other residual-stream layout) is refused with a
    CheckpointError that says it comes from another mmdit version;
(e) measured: number of tensors, file size, writer and step.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from compat.harness import row_runner, row_settings, row_test
from compat.observe import L2T, T2L
from compat.terms import LatentSchedule, latent_term
from compat.outcomes import expect, expect_close, incompatible, not_applicable
from compat.oracle import tol
from latentDLM_mmdit import checkpoints
from latentDLM_mmdit.checkpoints import CheckpointError
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT

pytestmark = pytest.mark.compat_row("pretrained_checkpoint")
BASE_ONLY = row_settings({"latent_t_mode": "full", "cycle_text_weight": 0.0, "cycle_latent_weight": 0.0})

MMDIT02_FIXTURE = Path(__file__).resolve().parent / "data" / "mmdit02_layout_h16.safetensors"
SEED = 95


def model_outputs(ctx, model, batch) -> tuple[torch.Tensor, ...]:
    """Every output of one forward pass at non-trivial timesteps (no randomness: eval mode)."""
    B = batch["input_ids"].shape[0]
    text_t = torch.linspace(0.1, 0.9, B, device=ctx.device)
    latent_t = torch.linspace(0.8, 0.2, B, device=ctx.device)
    with torch.no_grad():
        out = model(
            text_tokens=batch["input_ids"],
            latents=batch["latent"],
            text_timesteps=text_t,
            latent_timesteps=latent_t,
            attention_mask=batch["attention_mask"],
        )
    return tuple(o.detach() for o in out)


def assert_same_outputs(got, want, what: str) -> None:
    expect(
        len(got) == len(want),
        f"{what} gives {len(got)} outputs where the shared model gives {len(want)}",
        "load every tensor of the checkpoint into a model of the configured layout",
    )
    for i, (g, w) in enumerate(zip(got, want)):
        expect_close(
            g,
            w,
            **tol("bit_exact"),
            problem=f"{what} gives another output {i} than the shared model from the same file",
            fix="load the checkpoint strictly, every tensor (prefixes stripped, nothing left initialised)",
        )


def poisoned_model(ctx, like: MultimodalMMDiT | None = None) -> MultimodalMMDiT:
    """A fresh model of the configured layout (or a deep copy of `like`) whose every floating
    tensor is NaN: whatever a load leaves out shows up in the outputs."""
    model = ctx.build_model(load=False) if like is None or not ctx.large else copy.deepcopy(like)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.fill_(math.nan)
    return model


def written_by(report) -> str:
    """Who wrote the checkpoint, as far as it says: this project's metadata, or upstream's
    TrainingState record."""
    kind, step = report.metadata.get("trainer_kind"), report.metadata.get("step")
    if kind is not None:
        return f"{kind} trainer" + (f", step {step}" if step is not None else "")
    state = report.metadata.get("state")
    if getattr(state, "step", None) is not None:
        return f"upstream training script (TrainingState step {state.step})"
    return "writer not recorded"


def check_loads_strictly(ctx, measure):
    """(a) + (e): the checkpoint under test loads strictly; its size and provenance."""
    path = Path(ctx.checkpoint_path)
    measure("file_bytes", path.stat().st_size)
    if ctx.load_error is not None:
        incompatible(
            "the checkpoint does not load strictly into the model the cycle config builds",
            "set the cycle config's model.* keys to the checkpoint's layout (the differences are listed)",
            ctx.load_error,
        )
    measure("nonfinite_tensors", len(ctx.nonfinite))
    expect(
        not ctx.nonfinite,
        f"the checkpoint holds non-finite weights in {len(ctx.nonfinite)} tensor(s), so fine-tuning from it trains "
        "on NaN",
        "start from an earlier checkpoint of the run",
        f"{'; '.join(ctx.nonfinite[:8])}{' ...' if len(ctx.nonfinite) > 8 else ''}",
    )
    if ctx.large:  # no second copy of a full-size model: the shared model's own strict load is the evidence
        model, report = ctx.require_model(), ctx.load_report
    else:
        model = poisoned_model(ctx)
        try:
            report = checkpoints.load_checkpoint_into(model, path)
        except CheckpointError as exc:
            incompatible(
                "the checkpoint does not load strictly into a fresh model of the configured layout",
                "build the model with the checkpoint's layout (model.num_residual_streams and the other model.* keys)",
                str(exc),
            )
    expected = len(model.state_dict())
    measure("n_tensors", report.n_tensors)
    measure("written_by", written_by(report), headline=True)
    if report.contents is not None:
        measure(
            "weights_from",
            f"{', '.join(report.contents.keys_used)} of {Path(report.contents.file).name}"
            + (f"; ignored {', '.join(report.contents.ignored)}" if report.contents.ignored else "")
            + (
                f"; prefixes stripped {', '.join(report.contents.prefixes_stripped)}"
                if report.contents.prefixes_stripped
                else ""
            ),
        )
    expect(
        report.n_tensors == expected,
        f"the checkpoint provides {report.n_tensors} tensors where the model has {expected}",
        "load every tensor of the model from the checkpoint (a strict load)",
    )
    if model is not ctx.require_model():  # a large checkpoint is loaded once: there is nothing to compare
        assert_same_outputs(
            model_outputs(ctx, model, ctx.batch(2, seed=SEED)),
            model_outputs(ctx, ctx.require_model(), ctx.batch(2, seed=SEED)),
            "a fresh load of the checkpoint",
        )


def check_fresh_instances_identical(ctx, measure):
    """(b): stable and cycle trainers, each on its own fresh load, give bit-identical base losses."""
    shared = ctx.require_model()
    path = Path(ctx.checkpoint_path)
    before = checkpoints.file_sha256(path)
    batch = ctx.batch(ctx.options.batch_size, seed=SEED + 1)
    if ctx.large:  # one instance shared by both trainers: a full-size model is not loaded twice more
        for_stable = for_cycle = shared
        measure("instances", "one shared instance (large checkpoint)")
    else:
        for_stable, for_cycle = ctx.build_model(load=True), ctx.build_model(load=True)
        want = model_outputs(ctx, shared, batch)
        assert_same_outputs(model_outputs(ctx, for_stable, batch), want, "the stable trainer's fresh instance")
        assert_same_outputs(model_outputs(ctx, for_cycle, batch), want, "the cycle trainer's fresh instance")
    draws = ctx.draws(batch, seed=SEED + 1)
    l2t = ctx.run_stable("l2t", batch, draws=draws, model=for_stable, grad=False)
    t2l = ctx.run_stable("t2l", batch, draws=draws, model=for_stable, grad=False)
    cycle = ctx.run_cycle(batch, settings=BASE_ONLY, draws=draws, model=for_cycle, grad=False)
    for kind, stable_record, output in ((L2T, l2t, 0), (T2L, t2l, 1)):
        expect_close(
            cycle.one(kind).outputs[output],
            stable_record.one(kind).outputs[output],
            **tol("bit_exact"),
            problem=f"on the pretrained weights the cycle trainer's {kind} pass does not reproduce the stable "
            "trainer's output",
            fix=f"give the {kind} pass exactly the stable trainer's inputs (tokens, latents, timesteps, mask, dtypes)",
        )
    schedule = LatentSchedule.of(ctx.cycle_config_for(BASE_ONLY))
    x0 = ctx.x0_of(batch)
    cycle_t2l, _ = latent_term(cycle, cycle.one(T2L), x0, schedule, ctx.oracle_tolerance)
    stable_t2l, _ = latent_term(t2l, t2l.one(T2L), x0, schedule, ctx.oracle_tolerance)
    weight = float(ctx.cycle_config_for(BASE_ONLY).loss.latent_loss_weight)
    want = l2t.loss.detach().double().cpu() + weight * stable_t2l
    expect_close(
        cycle.loss.detach().double().cpu(),
        want,
        **tol(ctx.oracle_tolerance),
        problem="on the pretrained weights the cycle trainer's base loss is not stable l2t's loss + "
        "latent_loss_weight x stable t2l's term",
        fix="compute the base terms as the stable trainer does",
    )
    expect_close(
        cycle_t2l,
        stable_t2l,
        **tol("bit_exact"),
        problem="on the pretrained weights the cycle trainer's T2L latent loss differs from stable t2l's",
        fix="compute the T2L term as stable t2l does (same target, normalisation and reduction)",
    )
    measure("l2t_text_loss", float(l2t.loss))
    measure("t2l_latent_loss", float(stable_t2l))
    expect(checkpoints.file_sha256(path) == before, f"loading {path} changed the file", "open checkpoints read-only")


def upstream_layouts(ctx, model) -> dict[str, object]:
    """`model`'s weights as upstream wrote them (see the module docstring)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    text_noise = {f"text_noise_schedule.{k}": v.clone() for k, v in MaskedDiffusion(ctx.vocab).state_dict().items()}

    def trainer_dict(prefix: str) -> dict:
        inner = {f"{prefix}model.{k}": v for k, v in state.items()}
        inner.update({f"{prefix}{k}": v for k, v in text_noise.items()})
        return {"model_state_dict": inner, "step": 30, "epoch": 0}

    return {
        "upstream_trainer_dict": trainer_dict(""),
        "ddp_compile": trainer_dict("module._orig_mod."),
        "compile_ddp": trainer_dict("_orig_mod.module."),
        "bare_state_dict": dict(state),
    }


def check_upstream_layouts(ctx, measure):
    """(c): each upstream layout loads strictly, outputs bit-identical, source file untouched."""
    shared = ctx.require_model()
    if ctx.large:
        # Writing three more copies of a full-size model is what this row must not cost: the
        # checkpoint's own key names are mapped through each layout, and the full round trip runs
        # on the proxy's weights (same loader code).
        names = {k: tuple(v.shape) for k, v in shared.state_dict().items()}
        for prefix in ("model.", "module._orig_mod.model.", "_orig_mod.module.model."):
            mapping = checkpoints.normalize_keys([prefix + k for k in names] + ["text_noise_schedule.log_B"], prefix)
            expect(
                sorted(mapping) == sorted(names),
                f"the checkpoint loader does not map keys prefixed {prefix!r} back onto the model's keys",
                "strip DDP's module., compile's _orig_mod. and the trainer's model. prefixes in any nesting",
            )
        measure("upstream_layouts_keys", "mapped (large checkpoint: round trip on the proxy)")
        shared = ctx.semantic_model()
    batch = ctx.batch(2, seed=SEED + 2)
    want = model_outputs(ctx, shared, batch)
    folder = Path(ctx.workdir) / "variants"
    folder.mkdir(parents=True, exist_ok=True)
    loaded = []
    for name, obj in upstream_layouts(ctx, shared).items():
        path = folder / f"{name}.pt"
        torch.save(obj, path)
        before = checkpoints.file_sha256(path)
        model = poisoned_model(ctx, like=shared)
        try:
            report = checkpoints.load_checkpoint_into(model, path)
        except CheckpointError as exc:
            incompatible(
                f"a checkpoint in upstream's {name} layout does not load strictly",
                "strip DDP's module., compile's _orig_mod. and the trainer's model. prefixes (in any nesting) and "
                "drop text_noise_schedule.* before the strict load",
                str(exc),
            )
        expect(
            report.n_tensors == len(model.state_dict()),
            f"upstream layout {name}: {report.n_tensors} tensors loaded where the model has {len(model.state_dict())}",
            "load every tensor of the model from upstream's file",
        )
        assert_same_outputs(model_outputs(ctx, model, batch), want, f"upstream layout {name}")
        expect(
            checkpoints.file_sha256(path) == before,
            f"loading upstream layout {name} changed {path}",
            "open checkpoints read-only",
        )
        path.unlink()
        loaded.append(name)
    measure("upstream_layouts_loaded", ",".join(loaded))


def check_other_mmdit_layout(ctx, measure):
    """(d): an mmdit 0.2.x checkpoint is refused with a message naming the version mismatch."""
    with checkpoints.open_checkpoint(MMDIT02_FIXTURE) as source:
        meta = source.metadata
    recorded = (meta.get("versions") or {}).get("mmdit", "not recorded")
    installed = checkpoints.installed_versions()["mmdit"]
    if installed.split(".")[:2] == str(recorded).split(".")[:2]:
        not_applicable(f"the installed mmdit {installed} has the fixture's layout ({recorded}): nothing to refuse")
    sizes, config = meta["model_sizes"], meta["config"]
    model = MultimodalMMDiT(
        config["model"],
        vocab_size=int(sizes["vocab_size"]),
        latent_dim=int(sizes["latent_dim"]),
        cluster_size=int(sizes.get("cluster_size", 0) or 0),
    )
    try:
        checkpoints.load_checkpoint_into(model, MMDIT02_FIXTURE)
    except CheckpointError as exc:
        message = str(exc)
    else:
        incompatible(
            f"a checkpoint written with mmdit {recorded} loads into a model built with mmdit {installed} although "
            "their residual-stream layouts differ",
            "refuse a checkpoint whose recorded mmdit layout differs from the installed one",
        )
    expect(
        "another mmdit version" in message,
        f"loading an mmdit {recorded} checkpoint under mmdit {installed} fails without saying why",
        "name the version mismatch ('another mmdit version') in the refusal",
        message,
    )
    measure("mmdit_0.2_checkpoint", "refused: another mmdit version")


CHECKS = {
    "loads_strictly": check_loads_strictly,
    "fresh_instances_identical": check_fresh_instances_identical,
    "upstream_layouts": check_upstream_layouts,
    "other_mmdit_layout": check_other_mmdit_layout,
}


run_row = row_runner(CHECKS)
test_pretrained_checkpoint = row_test(CHECKS)
