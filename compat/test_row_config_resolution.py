"""Row: config resolution.

Upstream's stable trainer read the latent diffusion keys from the config root (defaults 1000 /
cosine / epsilon when absent) while its configs and the cycle trainer put them under `model.*`
(upstream defect 4). Checked: the same YAML gives the same schedule, parameterization and
timesteps (and the same alphas_cumprod, bit for bit) in both trainers; the settings the checkpoint
was trained with equal those the cycle trainer will use; both configs build the same model layout,
one that fits the checkpoint's vocabulary; a config that upstream's stable trainer would have read
differently is flagged. Other settings that change the losses (the latent loss weight, the dtype)
are reported for what they are, not as incompatibilities; the loss rows compare both trainers in the
cycle config's dtype.
"""

from __future__ import annotations

import pytest

from compat.harness import LAYOUT_KEYS, row_runner, row_settings, row_test
from compat.inputs import explicit_tokenizer_value
from compat.observe import T2L
from compat.terms import LatentSchedule, latent_term
from compat.oracle import tol
from compat.outcomes import Incompatible, expect, expect_close, incompatible
from latentDLM_mmdit.factory import dtype_from_config
from latentDLM_mmdit.latent_settings import resolve_latent_settings, upstream_stable_reading

pytestmark = pytest.mark.compat_row("config_resolution")
BASE_ONLY = row_settings({"latent_t_mode": "full", "cycle_text_weight": 0.0, "cycle_latent_weight": 0.0})


def check_same_yaml_same_settings(ctx, measure):
    """The same YAML gives both trainers the same latent diffusion: each noises its T2L pass under
    the schedule the config resolves to (observed), with the same latents, and is scored by that
    parameterization's target."""
    for label, config in (("stable config", ctx.stable_config), ("cycle config", ctx.cycle_config)):
        batch = ctx.batch(2, seed=80)
        draws = ctx.draws(batch, seed=80)
        stable_config = ctx.stable_config_for("t2l", base=config)
        cycle_config = ctx.cycle_config_for({**BASE_ONLY, "training.dtype": ctx.trainer_dtype_name}, base=config)
        schedule = LatentSchedule.of(config)
        stable = ctx.run_stable("t2l", batch, config=stable_config, draws=draws, grad=False)
        cycle = ctx.run_cycle(batch, config=cycle_config, draws=draws, grad=False)
        expect_close(
            cycle.one(T2L).latents_2d,
            stable.one(T2L).latents_2d,
            **tol("float32_loss"),
            problem=f"given the same YAML ({label}), the two trainers noise the T2L latents differently",
            fix="read the latent diffusion keys from model.* in both trainers (upstream's stable trainer read "
            "them from the config root: upstream defect 4)",
        )
        x0 = ctx.x0_of(batch)
        for trainer, record, run_config in (("stable", stable, stable_config), ("cycle", cycle, cycle_config)):
            try:
                term, _ = latent_term(record, record.one(T2L), x0, schedule, ctx.oracle_tolerance)
            except Incompatible as exc:
                incompatible(
                    f"given the {label}, the {trainer} trainer does not noise under the schedule it resolves to "
                    f"({schedule.beta_schedule}, T={schedule.num_timesteps})",
                    "read model.latent_beta_schedule / latent_timesteps from model.* (not the config root)",
                    exc.details,
                )
            weight = float(run_config.loss.latent_loss_weight)
            want = weight * term if trainer == "stable" else None
            if want is not None:
                expect_close(
                    record.loss.detach().double().cpu(),
                    want,
                    **tol(ctx.oracle_tolerance),
                    problem=f"given the {label}, the stable trainer's loss is not the "
                    f"{schedule.parameterization} target's: it reads another parameterization than model.*",
                    fix="read model.latent_parameterization (upstream's stable trainer read the config root's: "
                    "upstream defect 4)",
                )
    measure("cycle_settings", "/".join(str(v) for v in resolve_latent_settings(ctx.cycle_config).as_dict().values()))


def trained_with(ctx) -> tuple[dict, str]:
    """The latent settings the checkpoint was trained with, and where that knowledge comes from."""
    recorded = ctx.checkpoint_metadata.get("config") if ctx.checkpoint_path.suffix == ".safetensors" else None
    if isinstance(recorded, dict) and recorded.get("model") is not None:
        return resolve_latent_settings(recorded).as_dict(), "the config recorded in the checkpoint"
    return upstream_stable_reading(
        ctx.stable_config
    ), "upstream's stable trainer reading of the stable config (root keys)"


def check_checkpoint_settings_match_cycle(ctx, measure):
    trained, source = trained_with(ctx)
    cycle = resolve_latent_settings(ctx.cycle_config).as_dict()
    measure("trained_with_source", source)
    diff = {k: (trained[k], cycle[k]) for k in cycle if str(trained[k]) != str(cycle[k])}
    expect(
        not diff,
        f"the checkpoint was trained with other latent diffusion settings than the cycle config gives "
        f"({', '.join(f'{k}: trained {a}, cycle {b}' for k, (a, b) in diff.items())})",
        "set the cycle config's model.latent_* keys to what the checkpoint was trained with",
        f"trained with {trained} ({source}); the cycle trainer will use {cycle}",
    )


def check_upstream_reading_flagged(ctx, measure):
    trained, source = trained_with(ctx)
    for label, config in (("stable", ctx.stable_config), ("cycle", ctx.cycle_config)):
        upstream = upstream_stable_reading(config)
        resolved = resolve_latent_settings(config).as_dict()
        differs = {k: (upstream[k], resolved[k]) for k in resolved if str(upstream[k]) != str(resolved[k])}
        if differs:
            measure(
                f"{label}_config_read_differently_by_upstream_stable",
                differs,
                review=not source.startswith("the config recorded"),
            )
    measure("upstream_reading_checked", True)


def check_model_layout_keys_agree(ctx, measure):
    """The two configs build the same model, and one that fits the checkpoint's vocabulary."""
    diff = {}
    for key in LAYOUT_KEYS:
        a, b = ctx.stable_config.model.get(key), ctx.cycle_config.model.get(key)
        if a != b:
            diff[f"model.{key}"] = (a, b)
    for key in ("vocab_size", "mask_token_id", "pad_token_id"):
        # a config that does not give an id itself (or takes it from its tokenizer.path) uses the one
        # the gate resolved: flags, tokenizer folder
        given = ctx.options.tokenizer is not None
        a, b = (
            explicit_tokenizer_value(c, key, given)
            if explicit_tokenizer_value(c, key, given) is not None
            else getattr(ctx.vocab, key)
            for c in (ctx.stable_config, ctx.cycle_config)
        )
        if a != b:
            diff[f"tokenizer.{key}"] = (a, b)
    expect(
        not diff,
        "the stable and cycle configs build different models or mask differently "
        f"({', '.join(f'{k}: stable {a}, cycle {b}' for k, (a, b) in diff.items())})",
        "give the cycle config the stable config's model layout keys and tokenizer ids",
    )
    checkpoint_vocab = ctx.sizes["vocab_size"]
    for label, config in (("stable", ctx.stable_config), ("cycle", ctx.cycle_config)):
        configured = explicit_tokenizer_value(config, "vocab_size", ctx.options.tokenizer is not None)
        expect(
            configured is None or int(configured) == checkpoint_vocab,
            f"the {label} config's tokenizer.vocab_size={configured} builds a model the checkpoint does not fit "
            f"(its embedding has {checkpoint_vocab} rows)",
            f"set tokenizer.vocab_size: {checkpoint_vocab}, or give the tokenizer folder with tokenizer.path",
        )
    measure("layout_keys", "equal")


def check_loss_settings(ctx, measure):
    """What changes the losses besides the latent diffusion keys: `loss.latent_loss_weight` (the
    T2L term's weight in both trainers), `training.dtype` (what the model is fed) and
    `training.mixed_precision` (the autocast it runs under). A difference
    is reported as what it is (REVIEW), never as an incompatibility of the losses: the loss rows
    compare both trainers in the cycle config's dtype."""
    weights = [float(c.loss.get("latent_loss_weight", 0.1)) for c in (ctx.stable_config, ctx.cycle_config)]
    measure(
        "latent_loss_weight",
        f"stable {weights[0]:g}, cycle {weights[1]:g}"
        + (": the T2L term is weighted differently than in pretraining" if weights[0] != weights[1] else ""),
        review=weights[0] != weights[1],
    )
    stable_dtype = dtype_from_config(ctx.stable_config)
    cycle_dtype = dtype_from_config(ctx.cycle_config)
    if stable_dtype != cycle_dtype:
        measure(
            "training.dtype",
            f"the stable config trains in {ctx.stable_config.training.dtype}, the cycle config in "
            f"{ctx.cycle_config.training.dtype}: the fine-tuning run feeds the model another dtype than the "
            f"pretraining did; set training.dtype alike if that is not intended (the loss rows compare both "
            f"trainers in {ctx.trainer_dtype_name}, the cycle config's)",
            review=True,
        )
    else:
        measure("training.dtype", f"{ctx.trainer_dtype_name} in both")
    precision = [str(c.training.mixed_precision) for c in (ctx.stable_config, ctx.cycle_config)]
    measure(
        "training.mixed_precision",
        f"stable {precision[0]}, cycle {precision[1]}"
        + (
            "; the mixed_precision row runs both under the cycle config's autocast"
            if precision[0] != precision[1]
            else ""
        ),
        review=precision[0] != precision[1],
    )
    fed = set()
    batch = ctx.batch(2, seed=81)
    for record in (
        ctx.run_stable("t2l", batch, outputs=False),
        ctx.run_cycle(batch, settings=BASE_ONLY, outputs=False),
    ):
        fed |= {str(p.latent_t.dtype) for p in record.passes if p.latent_t is not None}
    expect(
        fed == {str(cycle_dtype)},
        f"given training.dtype {ctx.trainer_dtype_name}, the trainers feed timesteps in {sorted(fed)}",
        f"cast timesteps and latents to training.dtype ({cycle_dtype}) in both trainers",
    )


CHECKS = {
    "same_yaml_same_settings": check_same_yaml_same_settings,
    "checkpoint_settings_match_cycle": check_checkpoint_settings_match_cycle,
    "upstream_reading_flagged": check_upstream_reading_flagged,
    "model_layout_keys_agree": check_model_layout_keys_agree,
    "loss_settings": check_loss_settings,
}


run_row = row_runner(CHECKS)
test_config_resolution = row_test(CHECKS)
