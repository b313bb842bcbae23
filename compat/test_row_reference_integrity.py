"""Row: reference integrity.

What both trainers share can be wrong in both at once, and a stable-against-cycle comparison
cannot see that. Checked here against the float64 oracle (written from the papers, not from the
library) and against golden values this project recorded and committed
(`compat/reference_golden.py`), so that a shared defect fails the gate:

- noise schedules: `ContinuousDiffusion.alphas_cumprod` for linear, cosine and sigmoid at T = 1000
  and T = 50 equal the oracle's closed forms, and the golden values; continuous t maps to index
  floor(t (T - 1)), t = 1 to the last; add_noise, its targets and the x0 conversions equal the oracle;
- masking: `MaskedDiffusion` masks exactly where the uniforms fall below MDLM's move chance
  1 - exp(-sigma(t)) (oracle), with the configured mask id and nothing else changed (injected
  uniforms, or the global RNG when neither uniforms nor a generator are given), and its masking
  rate on its own draws matches the move chance (a binomial test per t); its buffers are upstream's
  `text_noise_schedule.*` (names and values);
- batch preparation and output splitting (shared by both trainers): mis-shaped latents, masks and
  ids, and model outputs that are not a 2- or 3-tuple, are refused;
- loss helpers: the masked CE (partial and one-position masks, ids past 100, the clamp at 100) and
  the normalised latent MSE equal the oracle's;
- checkpoints: a round trip is bit-exact; a missing, an extra and a mis-shaped key are each refused
  naming the key;
- a model forward: the golden tiny model's outputs equal the recorded ones;
- the stable reference's mode per step (upstream's `sequential` and `random` loss types, which a
  pretraining run used): sequential follows training.sequential_schedule cyclically (steps when the
  step is given, epochs else; empty: unconditional) as `oracle.sequential_mode` says, random draws
  the modes in proportion to training.mode_weights (a chi-square test; a weight of 0 never drawn),
  a fixed mode stays fixed.
"""

from __future__ import annotations

import pytest
import torch

from compat import oracle, reference_golden
from compat.harness import row_runner, row_test
from compat.oracle import tol
from compat.outcomes import Incompatible, comparison_details, incompatible
from latentDLM_mmdit import checkpoints
from latentDLM_mmdit.continuous_diffusion import ContinuousDiffusion
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.losses import masked_text_ce, normalized_latent_mse, token_accuracy
from latentDLM_mmdit.tokenizer import SyntheticVocab
from latentDLM_mmdit.trainer_base import prepare_batch, split_model_outputs

pytestmark = pytest.mark.compat_row("reference_integrity")
SCHEDULES = ("linear", "cosine", "sigmoid")
MASKING_ALPHA = 1e-4
MASKING_DRAWS = 20_000


def check_schedules(ctx, measure):
    golden = reference_golden.load()["alphas_cumprod"]
    worst = 0.0
    for schedule in SCHEDULES:
        for T in (reference_golden.T, 50):
            got = ContinuousDiffusion(T, schedule).alphas_cumprod.double()
            want = oracle.alphas_cumprod(schedule, T)
            torch.testing.assert_close(
                got,
                want,
                **tol("float32_oracle"),
                msg=lambda m, s=schedule, n=T: f"{s} alphas_cumprod (T={n}) differs from the closed form\n{m}",
            )
            worst = max(worst, float((got - want).abs().max()))
        table = ContinuousDiffusion(reference_golden.T, schedule).alphas_cumprod
        for index, value in golden[schedule].items():
            torch.testing.assert_close(
                table[int(index)].double(),
                torch.tensor(value, dtype=torch.float64),
                **tol("float32_loss"),
                msg=lambda m, s=schedule, i=index: (
                    f"{s} alphas_cumprod[{i}] differs from the recorded golden value\n{m}"
                ),
            )
    measure("schedules_max_abs_vs_oracle", worst)


def check_timesteps_and_noising(ctx, measure):
    T = 1000
    t = torch.tensor([0.0, 0.3, 0.5, 0.999, 1.0])
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(5, 6, generator=gen), torch.randn(5, 6, generator=gen)
    for schedule in SCHEDULES:
        for parameterization in ("epsilon", "x0", "v_param"):
            d = ContinuousDiffusion(T, schedule, parameterization=parameterization)
            idx = d.timestep_indices(t)
            assert torch.equal(idx, oracle.timestep_index(t, T)), f"t {t.tolist()} maps to indices {idx.tolist()}"
            ab = oracle.alphas_cumprod(schedule, T)[oracle.timestep_index(t, T)]
            xt, target = d.add_noise(x0, t, noise)
            label = f"{schedule}/{parameterization}"
            torch.testing.assert_close(
                xt.double(),
                oracle.noised(x0, noise, ab),
                **tol("float32_oracle"),
                msg=lambda m, lbl=label: f"{lbl}: x_t differs from sqrt(ab) x0 + sqrt(1-ab) eps\n{m}",
            )
            torch.testing.assert_close(
                target.double(),
                oracle.target(x0, noise, ab, parameterization),
                **tol("float32_oracle"),
                msg=lambda m, lbl=label: f"{lbl}: the target differs\n{m}",
            )
            keep = t < 0.99  # x0 from eps divides by sqrt(ab) ~ 0 at t = 1
            got = d.x0_from_prediction(xt, t, target)[keep].double()
            torch.testing.assert_close(
                got,
                oracle.x0_from_prediction(xt, target, ab, parameterization)[keep],
                **tol("float32_x0_from_prediction"),
                msg=lambda m, lbl=label: f"{lbl}: x0 from the prediction differs from the oracle's\n{m}",
            )
    measure("noising", "x_t, targets and x0 conversions equal the oracle's (3 schedules x 3 parameterizations)")


def check_masking(ctx, measure):
    from scipy import stats

    vocab = SyntheticVocab(50, mask_token_id=49, pad_token_id=0)
    masking = MaskedDiffusion(vocab)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 49, (4, 16), generator=gen)
    t = torch.tensor([0.0, 0.2, 0.6, 1.0])
    uniform = torch.rand(4, 16, generator=gen)
    masked = masking.sample_zt(ids, t, uniform=uniform)
    want_masked = uniform.double() < oracle.move_chance(t)[:, None]
    assert torch.equal(masked == vocab.mask_token_id, want_masked), (
        "tokens are masked elsewhere than where the uniforms fall below 1 - exp(-sigma(t))"
    )
    assert torch.equal(masked[~want_masked], ids[~want_masked]), "unmasked tokens changed"
    # No uniforms and no generator: the draws come from the global RNG (as upstream's callers did).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        from_global = masking.sample_zt(ids, t)
        torch.manual_seed(6)
        global_uniform = torch.rand(ids.shape)
    assert torch.equal(from_global, masking.sample_zt(ids, t, uniform=global_uniform)), (
        "with no uniforms and no generator, the mask is not drawn from the global RNG on the tokens' device"
    )
    worst_p = 1.0
    for value in (0.1, 0.5, 0.9):
        draws = masking.sample_zt(
            torch.ones(1, MASKING_DRAWS, dtype=torch.long),
            torch.tensor([value]),
            generator=torch.Generator().manual_seed(int(value * 100)),
        )
        hits = int((draws == vocab.mask_token_id).sum())
        p = stats.binomtest(hits, MASKING_DRAWS, float(oracle.move_chance(torch.tensor([value]))[0])).pvalue
        worst_p = min(worst_p, p)
        assert p >= MASKING_ALPHA, (
            f"at t={value} {hits} of {MASKING_DRAWS} tokens were masked; the move chance "
            f"{float(oracle.move_chance(torch.tensor([value]))[0]):.4f} makes that p = {p:.2g}"
        )
    measure("masking_rate_min_p", worst_p)
    # The buffers upstream's checkpoints carry as text_noise_schedule.* (names and values).
    buffers = dict(masking.named_buffers())
    want_prior = torch.full((50,), -1000.0)
    want_prior[vocab.mask_token_id] = 0.0
    assert sorted(buffers) == ["log_B", "log_gamma", "log_prior"], f"MaskedDiffusion buffers {sorted(buffers)}"
    assert torch.equal(buffers["log_prior"], want_prior), "log_prior is not 0 at the mask id and -1000 elsewhere"
    assert float(buffers["log_gamma"]) == 0.0 and float(buffers["log_B"]) == -20.0, "log_gamma / log_B changed"


def check_loss_helpers(ctx, measure):
    gen = torch.Generator().manual_seed(9)
    logits, ids = torch.randn(3, 7, 11, generator=gen), torch.randint(0, 11, (3, 7), generator=gen)
    every = torch.ones(3, 7, dtype=torch.bool)
    torch.testing.assert_close(
        masked_text_ce(logits, ids, every).double(),
        oracle.ce_every_position(logits, ids),
        **tol("float32_oracle"),
        msg=lambda m: f"masked_text_ce over every position\n{m}",
    )
    # Partial masks (upstream's unconditional mode), a mask of one position, and a vocabulary past
    # 100 with the id 100 among the targets (a helper with an ignore index there would drop it).
    big_logits = torch.randn(2, 9, 130, generator=gen)
    big_ids = torch.randint(0, 130, (2, 9), generator=gen)
    big_ids[0, :3] = 100
    partial = torch.rand(2, 9, generator=gen) < 0.5
    partial[0, 0] = True
    one = torch.zeros(2, 9, dtype=torch.bool)
    one[1, 4] = True
    for name, mask in (
        ("a partial mask", partial),
        ("a mask of one position", one),
        ("every position", partial | True),
    ):
        torch.testing.assert_close(
            masked_text_ce(big_logits, big_ids, mask).double(),
            oracle.masked_ce(big_logits, big_ids, mask),
            **tol("float32_oracle"),
            msg=lambda m, name=name: f"masked_text_ce over {name}\n{m}",
        )
        got, want = token_accuracy(big_logits, big_ids, mask), oracle.token_accuracy(big_logits, big_ids, mask)
        assert abs(got - want) <= 1e-6, f"token_accuracy over {name}: {got}, the oracle's {want}"  # a float32 mean
    big_logits[1, 4, big_ids[1, 4]] = 50.0  # the one masked position predicted right
    assert token_accuracy(big_logits, big_ids, one) == 1.0 and token_accuracy(big_logits, big_ids, one & False) == 0.0
    with pytest.raises(ValueError, match="shapes disagree"):
        masked_text_ce(big_logits, big_ids, partial[:, :5])
    # Confidently wrong logits: a CE of about 1e4 per token, clamped to upstream's 100.
    wrong = torch.zeros(1, 3, 5)
    wrong[0, torch.arange(3), torch.tensor([1, 2, 3])] = -1e4
    got = masked_text_ce(wrong, torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool))
    want = oracle.masked_ce(wrong, torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool))
    assert float(got) == float(want) == 100.0, f"a cross entropy of about 1e4 gives {float(got)}, not the clamp 100"
    pred, target = torch.randn(3, 1, 5, generator=gen), torch.randn(3, 5, generator=gen)
    torch.testing.assert_close(
        normalized_latent_mse(pred, target).double(),
        oracle.normalized_mse(pred, target),
        **tol("float32_oracle"),
        msg=lambda m: f"normalized_latent_mse\n{m}",
    )
    # A target that cannot be the prediction's per sample is refused, never reshaped into it: one
    # with other values per sample, and one with as many values in all but another batch size (a
    # reshape would mix samples silently).
    for wrong_shape in ((3, 4), (5, 3)):  # pred is [3, 1, 5]: 12 values in all, then 15 in 5 samples
        with pytest.raises(ValueError, match="different numbers of values per sample"):
            normalized_latent_mse(pred, torch.randn(wrong_shape, generator=gen))
    measure("loss_helpers", "equal the oracle's (every, partial and one-position masks; ids past 100; accuracy)")


def check_checkpoint_round_trips(ctx, measure):
    from safetensors.torch import load_file, save_file

    model = reference_golden.golden_model()
    folder = ctx.workdir / "reference_integrity"
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoints.save_checkpoint(
        folder / "golden.safetensors",
        model,
        config={"model": reference_golden.MODEL_CONFIG},
        trainer_kind="stable",
        step=0,
    )
    fresh = type(model)(reference_golden.MODEL_CONFIG, **reference_golden.MODEL_SIZES)
    checkpoints.load_checkpoint_into(fresh, path)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), f"round trip changed {name}"
    state = load_file(str(path))
    victim = "latent_head.0.weight"
    variants = {
        "missing": {k: v for k, v in state.items() if k != victim},
        "extra": {**state, "unexpected_head.weight": torch.zeros(2)},
        "mis-shaped": {**state, victim: torch.zeros(3, 3)},
    }
    for label, tensors in variants.items():
        bad = folder / f"{label}.safetensors"
        save_file(tensors, str(bad))
        with pytest.raises(checkpoints.CheckpointError) as refused:
            checkpoints.load_checkpoint_into(
                type(model)(reference_golden.MODEL_CONFIG, **reference_golden.MODEL_SIZES), bad
            )
        key = "unexpected_head.weight" if label == "extra" else victim
        assert key in str(refused.value), f"a {label} key was refused without naming {key}: {refused.value}"
    measure("checkpoint_round_trip", "bit-exact; missing, extra and mis-shaped keys refused by name")


def check_model_forward_golden(ctx, measure):
    golden = reference_golden.load()["model_forward"]
    with torch.no_grad():
        text_logits, latent_pred = reference_golden.golden_model()(**reference_golden.golden_inputs())
    torch.testing.assert_close(
        text_logits[:, :3, :5],
        torch.tensor(golden["text_logits[:, :3, :5]"]),
        **tol("float32_oracle"),
        msg=lambda m: f"the golden model's text logits changed\n{m}",
    )
    torch.testing.assert_close(
        latent_pred,
        torch.tensor(golden["latent_pred"]),
        **tol("float32_oracle"),
        msg=lambda m: f"the golden model's latent prediction changed\n{m}",
    )
    measure("model_forward", "equals the recorded golden outputs")


def check_batch_and_outputs(ctx, measure):
    """The shared batch preparation and output splitting: what they accept and what they refuse."""
    ids, latent = torch.zeros(2, 5, dtype=torch.long), torch.randn(2, 4)
    mask = torch.ones(2, 5, dtype=torch.long)
    got_ids, got_mask, got_latents = prepare_batch(
        {"input_ids": ids, "latent": latent[:, None], "attention_mask": mask}, torch.float64, "x"
    )
    assert got_mask.dtype == torch.bool and got_latents.shape == (2, 4) and got_latents.dtype == torch.float64
    for name, batch in (
        ("latents of another batch size", {"input_ids": ids, "latent": torch.randn(3, 4)}),
        ("latents [B, 2, D]", {"input_ids": ids, "latent": torch.randn(2, 2, 4)}),
        ("a mask of another shape", {"input_ids": ids, "latent": latent, "attention_mask": mask[:, :4]}),
        ("input_ids [S]", {"input_ids": ids[0], "latent": latent}),
    ):
        with pytest.raises(ValueError, match="must be"):
            prepare_batch(batch, torch.float32, f"batch with {name}")
    with pytest.raises(KeyError, match="missing 'latent'"):
        prepare_batch({"input_ids": ids}, torch.float32, "x")
    text, lat, cluster = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert split_model_outputs((text, lat)) == (text, lat) and split_model_outputs([text, lat, cluster]) == (text, lat)
    for outputs, got in (
        ((text,), "tuple of length 1"),
        ((text, lat, cluster, cluster), "tuple of length 4"),
        (text, "Tensor of length -"),
    ):
        with pytest.raises(ValueError, match=f"model must return .* got {got}"):
            split_model_outputs(outputs)
    measure("batch_and_outputs", "mis-shaped latents, masks and ids and wrong output tuples refused")


# Unequal lengths per entry, steps and epochs told apart, a mode repeated after another.
MODE_SCHEDULE = (("l2t", 2, 1), ("t2l", 3, 2), ("unconditional", 1, 3), ("l2t", 2, 1))
MODE_WEIGHTS = (0.0, 1.0, 3.0)  # unconditional never, t2l three times as often as l2t


def check_stable_mode_schedule(ctx, measure):
    def trainer(loss_type: str, settings: dict):
        config = ctx.stable_config_for(loss_type, settings)
        return MultimodalDiffusionTrainer(
            ctx.semantic_model(), ctx.vocab, MaskedDiffusion(ctx.vocab), torch.float32, config
        )

    schedule = [dict(type=m, steps=s, epochs=e) for m, s, e in MODE_SCHEDULE]
    sequential = trainer("sequential", {"training.sequential_schedule": schedule})
    cycle_steps = sum(s for _, s, _ in MODE_SCHEDULE)
    for step in range(2 * cycle_steps + 1):
        got, want = sequential.training_mode(step), oracle.sequential_mode(list(MODE_SCHEDULE), step, 0)
        assert got == want, f"sequential mode at step {step}: {got}, training.sequential_schedule says {want}"
    for epoch in range(2 * sum(e for _, _, e in MODE_SCHEDULE) + 1):
        sequential.current_epoch = epoch
        got, want = sequential.training_mode(None), oracle.sequential_mode(list(MODE_SCHEDULE), None, epoch)
        assert got == want, f"sequential mode in epoch {epoch} (no step given): {got}, the schedule says {want}"
    empty = trainer("sequential", {"training.sequential_schedule": []}).training_mode(3)
    assert empty == "unconditional", f"sequential with an empty schedule: {empty}, not unconditional"
    for fixed in ("l2t", "t2l", "unconditional"):
        modes = {trainer(fixed, {}).training_mode(step) for step in range(4)}
        assert modes == {fixed}, f"loss_type {fixed} trained in modes {sorted(modes)}"

    spec = oracle.STATISTICS["stable_random_modes"]
    random_mode = trainer("random", {"training.mode_weights": list(MODE_WEIGHTS)})
    random_mode.generator.manual_seed(spec["draws"])
    drawn = [random_mode.training_mode(step) for step in range(spec["draws"])]
    counts = {mode: drawn.count(mode) for mode in ("unconditional", "l2t", "t2l")}
    assert counts["unconditional"] == 0, f"random mode drew unconditional {counts['unconditional']} times at weight 0"
    from scipy import stats

    expected = [spec["draws"] * w / sum(MODE_WEIGHTS[1:]) for w in MODE_WEIGHTS[1:]]
    p_value = float(stats.chisquare([counts["l2t"], counts["t2l"]], expected).pvalue)
    measure(
        "stable_random_modes",
        f"{counts} of {spec['draws']} at weights {list(MODE_WEIGHTS)}, chi-square p {p_value:.2g}",
    )
    assert p_value >= spec["alpha"], (
        f"random mode draws {counts} over {spec['draws']} steps, not in proportion to training.mode_weights "
        f"{list(MODE_WEIGHTS)} (chi-square p = {p_value:.2g} < alpha {spec['alpha']})"
    )
    measure("stable_sequential_modes", f"equal the schedule's, by step and by epoch ({len(MODE_SCHEDULE)} entries)")


def shared_component(check, component: str, path: str):
    """`check` of a component both trainers share: a failure says which component is wrong (a defect
    there is on both sides, so no stable-vs-cycle comparison could see it) and where to fix it."""

    def checked(ctx, measure):
        try:
            check(ctx, measure)
        except Incompatible:
            raise
        except AssertionError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            incompatible(
                f"the shared {component} is wrong: {lines[0] if lines else 'a reference value differs'}",
                f"fix {path} (both trainers use it; the oracle and recorded golden values are in compat/oracle.py "
                "and compat/data/reference_golden.json)",
                comparison_details("\n".join(lines[1:])),
            )

    checked.__name__ = getattr(check, "__name__", "check")
    return checked


CHECKS = {
    "schedules": shared_component(check_schedules, "noise schedule", "latentDLM_mmdit/continuous_diffusion.py"),
    "timesteps_and_noising": shared_component(
        check_timesteps_and_noising, "timestep mapping or noising", "latentDLM_mmdit/continuous_diffusion.py"
    ),
    "masking": shared_component(check_masking, "text masking", "latentDLM_mmdit/diffusion_process.py"),
    "loss_helpers": shared_component(check_loss_helpers, "loss helpers", "latentDLM_mmdit/losses.py"),
    "checkpoint_round_trips": shared_component(
        check_checkpoint_round_trips, "checkpoint reader/writer", "latentDLM_mmdit/checkpoints/"
    ),
    "model_forward_golden": shared_component(
        check_model_forward_golden,
        "model forward",
        "latentDLM_mmdit/models/multimodal_mmdit.py (or install the pinned mmdit / hyper-connections)",
    ),
    "stable_mode_schedule": shared_component(
        check_stable_mode_schedule, "stable reference's mode schedule", "latentDLM_mmdit/improved_trainer_stable.py"
    ),
    "batch_and_outputs": shared_component(
        check_batch_and_outputs, "batch preparation or output splitting", "latentDLM_mmdit/trainer_base.py"
    ),
}


run_row = row_runner(CHECKS)
test_reference_integrity = row_test(CHECKS)
