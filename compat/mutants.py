"""Planted defects: the suite's proof of teeth.

Each mutant patches one thing in the reference, the cycle trainer or the checkpoint loader for the
duration of a `with mutant.apply():` block, and names the row that must catch it. Three are the
upstream defects seen when the upstream code ran on the real mmdit library (UPSTREAM_FACTS 1, 3, 4);
the rest are the mistakes a port of these trainers is likely to make.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator
from unittest import mock

import torch
import torch.nn.functional as F

import cycle_vae_impl.trainers.cycle_vae_trainer as cycle_module
import latentDLM_mmdit.checkpoints as checkpoints_module
import latentDLM_mmdit.checkpoints.keys as checkpoint_keys_module
import latentDLM_mmdit.draws as draws_module
import latentDLM_mmdit.improved_trainer_stable as stable_module
import latentDLM_mmdit.continuous_diffusion as diffusion_module
import latentDLM_mmdit.models.multimodal_mmdit as model_module
import latentDLM_mmdit.trainer_base as base_module
import latentDLM_mmdit.training.dataloader as training_data_module
import latentDLM_mmdit.training.distributed as training_distributed_module
import latentDLM_mmdit.training.loop as training_loop_module
from latentDLM_mmdit.training import LoopSettings
from latentDLM_mmdit.continuous_diffusion import ContinuousDiffusion
from latentDLM_mmdit.latent_settings import LatentSettings, upstream_stable_reading
from latentDLM_mmdit.losses import NORMALIZE_EPS


TRAINER_ERROR = "trainer error"  # the defect makes the trainer raise: the row's check reports it
ASSERTION = "assertion"          # the defect changes numbers or inputs: the check's own assertion fails
CONTROL = "harness control"      # the defect is in the reference the gate measures against: its control fails
REVIEWED = "review"              # the defect is a cost, not a difference: the check flags `review` (REVIEW)


@dataclass(frozen=True)
class Mutant:
    """A planted defect and the check meant to catch it (`row`, `check`: a key of that row's
    CHECKS). `expect` says how: the check's own assertion, or the trainer raising."""

    name: str
    row: str
    check: str
    description: str
    patches: Callable[[], list]
    expect: str = ASSERTION
    review: str | None = None  # with expect REVIEWED: the review item the check must flag (and not unmutated)

    @contextlib.contextmanager
    def apply(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for patch in self.patches():
                stack.enter_context(patch)
            yield


# The resources row's cached traces of the stable trainer alone (`RowMeasurements.stable`, `.counterparts`).
STABLE_TRACE_KEYS = ("stable", "counterparts")


def patched_classes(patches) -> list[type] | None:
    """The classes whose attributes the (not started) patches replace; None when one patches
    anything else (a module's function: any trainer may call it)."""
    classes = []
    for patch in patches:
        target = patch.getter()
        if not isinstance(target, type):
            return None
        classes.append(target)
    return classes


@contextlib.contextmanager
def fresh_runs(ctx, mutant=None):
    """Runs the context caches (the trajectories' training runs, the resources row's traced steps)
    are redone under a mutant, and the unmutated ones come back after it. The stable trainer's
    traced steps are kept when the mutant patches only classes the stable trainer is not made of
    (the cycle trainer's): they are the same computation, unmutated."""
    saved = ctx.trajectories, ctx.resources
    kept = {}
    classes = patched_classes(mutant.patches()) if mutant is not None else None
    if classes is not None and not set(classes) & set(ctx.stable_subject.spec.cls.__mro__):
        kept = {key: value for key, value in ctx.resources.items() if key[0] in STABLE_TRACE_KEYS}
    ctx.trajectories, ctx.resources = {}, kept
    try:
        yield
    finally:
        ctx.trajectories, ctx.resources = saved


# -- the defects -------------------------------------------------------------------------------------
def _broadcast_latent_mse(latent_pred, latent_target):
    # Upstream cycle trainer: [B,1,D] prediction against a [B,D] target, no reshape.
    pred = F.normalize(latent_pred, p=2, dim=-1, eps=NORMALIZE_EPS)
    target = F.normalize(latent_target, p=2, dim=-1, eps=NORMALIZE_EPS)
    return torch.clamp(F.mse_loss(pred, target), 0.0, 10.0)


def _x0_without_reshape(original):
    def x0_from_prediction(self, xt, t, prediction):
        # Upstream: latent_pred kept as [B,1,D] against xt [B,D]: broadcasts to [B,B,D].
        return original(self, xt, t, prediction.reshape(prediction.shape[0], 1, -1))
    return x0_from_prediction


def _two_output_unpack(outputs):
    text_logits, latent_pred = outputs  # upstream stable trainer: fails on the cluster 3-tuple
    return text_logits, latent_pred


def _stable_reads_root_keys(original_init):
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        values = upstream_stable_reading(self.config)  # upstream's stable trainer: root keys or defaults
        self.latent_settings = LatentSettings(int(values["latent_timesteps"]), str(values["latent_beta_schedule"]),
                                              str(values["latent_parameterization"]), {k: "root" for k in values})
        self.latent_diffusion = ContinuousDiffusion(self.latent_settings.num_timesteps,
                                                    self.latent_settings.beta_schedule,
                                                    parameterization=self.latent_settings.parameterization)
    return __init__


def _always_random_t(self, source, name, batch_size, device):
    u = source.uniform(name, (batch_size,), device)
    return torch.clamp(self.latent_t_min + (self.latent_t_max - self.latent_t_min) * u, max=0.9999)


def _unnormalised_mse(latent_pred, latent_target):
    return torch.clamp(F.mse_loss(latent_pred, latent_target.reshape(latent_pred.shape)), 0.0, 10.0)


def _half_masked_l2t(self, input_ids):
    every_other = (torch.arange(input_ids.shape[1], device=input_ids.device) % 2 == 0).expand_as(input_ids)
    ids = torch.where(every_other, torch.full_like(input_ids, self.mask_token_id), input_ids)
    return ids, torch.ones_like(input_ids, dtype=torch.bool)


def _none_to_ones(self, t, batch, device):
    if t is not None:
        return t
    return torch.ones(batch, device=device, dtype=self.conditioning.combine[0].weight.dtype)


def _stop_grad_off(original_init):
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.stop_grad_latent = False
    return __init__


def _wrong_x0_from_v(self, xt, t, v):
    sqrt_ab, sqrt_1m_ab = self._coeffs(t, xt)
    return sqrt_ab * xt + sqrt_1m_ab * v  # sign error: x0 = sqrt(ab) xt - sqrt(1-ab) v


def _mask_dropped(original_forward):
    def forward(self, text_tokens, latents, text_timesteps, latent_timesteps, attention_mask=None):
        return original_forward(self, text_tokens, latents, text_timesteps, latent_timesteps, None)
    return forward


def _prefix_kept(key):
    stripped = True
    while stripped:
        stripped = False
        for prefix in ("module.", "_orig_mod."):  # forgets the trainer's "model." prefix
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return None if key.startswith("text_noise_schedule.") else key


def _ramp_ignores_warmup(step, base, warmup_steps, ramp_steps):
    if step is None:
        return base
    if ramp_steps <= 0:
        return base
    return base * min(1.0, step / float(ramp_steps))


def _global_rng_take(self, name, shape, device, kind):
    if name in self.injected:
        value = self.injected[name].to(device=device, dtype=torch.float32)
    else:
        value = (torch.rand if kind == "uniform" else torch.randn)(shape).to(device)  # global RNG
    self.used[name] = value
    return value


def _cycle_freezes_text(original_forward):
    def forward(self, batch, step=None, draws=None):
        for name, param in self.model.named_parameters():
            if stable_module.parameter_group(name) == "text":
                param.requires_grad_(False)
        return original_forward(self, batch, step=step, draws=draws)
    return forward


def _cycle_autocast_off(original_forward):
    def forward(self, batch, step=None, draws=None):
        # "Numerically safer": the cycle trainer's whole step in float32, whatever the loop asked for.
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return original_forward(self, batch, step=step, draws=draws)
    return forward


def _latent_mse_in_low_precision(latent_pred, latent_target):
    # A latent MSE reduced in the outputs' dtype (bfloat16 under autocast).
    low = latent_pred.dtype
    with torch.autocast(latent_pred.device.type, enabled=False):
        pred = F.normalize(latent_pred, p=2, dim=-1, eps=NORMALIZE_EPS).to(low)
        target = F.normalize(latent_target.reshape(latent_pred.shape).float(), p=2, dim=-1, eps=NORMALIZE_EPS).to(low)
        return torch.clamp(((pred - target) ** 2).mean(), 0.0, 10.0).float()


def _cycle_entry_beta1(original_train):
    def _train(config, settings, dist_ctx, entry, *args, **kwargs):
        if entry.kind == "cycle":  # an optimizer setting that differs only in the cycle entry point
            settings = dataclasses.replace(settings, betas=(0.8, settings.betas[1]))
        return original_train(config, settings, dist_ctx, entry, *args, **kwargs)
    return _train


def _clip_norm_from_other_key(original_from_settings):
    def from_settings(config):
        settings = original_from_settings(config)
        # the clipping norm read from optimizer.weight_decay instead of optimizer.grad_clip_norm
        return dataclasses.replace(settings, grad_clip_norm=float(config.optimizer.weight_decay))
    return staticmethod(from_settings)


def _mmdit_default_streams(original_cls):
    def build(*args, **kwargs):
        kwargs["num_residual_streams"] = 4  # the library default, not upstream's 2
        return original_cls(*args, **kwargs)
    return build


def _dtype_ignored(original_init):
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.dtype = torch.float32  # training.dtype read, then forgotten
    return __init__


def _latent_ramp_from_text_key(original_init):
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        base, warmup, _ = self.weights["cycle_latent"]
        self.weights["cycle_latent"] = (base, warmup, self.weights["cycle_text"][2])  # the wrong key's ramp
    return __init__


def _ddp_not_wrapped(trainer, device):
    return trainer.model  # the loop forgets DDP: no gradient all-reduce between ranks


_real_cosine_betas = diffusion_module.cosine_betas


def _cosine_offset_wrong(num_timesteps, s=0.008):
    return _real_cosine_betas(num_timesteps, s=0.08)


_real_pseudo_tokens = cycle_module.pseudo_tokens_from_logits


def _categorical_at_temperature_2(logits, sampling, uniform=None):
    return _real_pseudo_tokens(logits / 2 if sampling == "categorical" else logits, sampling, uniform)


def _cycle_latent_t_as_index(original):
    def sample_latent_t(self, source, name, batch_size, device):
        t = original(self, source, name, batch_size, device)
        if name == "cycle_latent_t" and self.latent_t_mode == "full":
            return t * (self.latent_diffusion.num_timesteps - 1)  # index 999 for t = 1: same noise, wrong input
        return t
    return sample_latent_t


def _weights_as_python_floats(self, step):
    # The weights computed inside the compiled step and used as Python floats (no compiler.disable, no
    # tensors): dynamo bakes each ramp value into the graph.
    w_text, w_latent = self.term_weight("cycle_text", step), self.term_weight("cycle_latent", step)
    self.last_weights = (w_text, w_latent)
    return w_text, w_latent, w_text > 0.0, w_latent > 0.0


def _mask_checked_outside_compile(prepare):
    def prepare_batch(batch, dtype, owner):
        input_ids, attention_mask, latents = prepare(batch, dtype, owner)
        if torch.compiler.is_compiling():
            attention_mask = None  # the mask's check-and-convert guarded by `not is_compiling()`, mask lost
        return input_ids, attention_mask, latents
    return prepare_batch


def _graph_kept_past_stop_grad(original_step):
    def cycle_step(self, batch, w_text, w_latent, text_on, latent_on, draws=None):
        logits = []
        run = self._run

        def recording_run(*args, **kwargs):
            out = run(*args, **kwargs)
            logits.append(out[0])
            return out

        self._run = recording_run
        try:
            total, metrics = original_step(self, batch, w_text, w_latent, text_on, latent_on, draws=draws)
        finally:
            del self._run
        if latent_on:
            # The pseudo tokens' confidence from the L2T logits (the second pass), kept in the graph
            # although stop-grad is on: x / x is 1.0 in value, so the loss is unchanged, but backward
            # now keeps softmax(L2T logits) [B, S, V] in float32.
            confidence = torch.softmax(logits[1].float(), dim=-1).amax(dim=-1).mean()
            total = total * (confidence / confidence.detach())
        return total, metrics
    return cycle_step


def _passes_at_weight_zero(original):
    def term_weights(self, step):
        w_text, w_latent, _, _ = original(self, step)
        return w_text, w_latent, True, True  # every cycle pass made, whatever its weight
    return term_weights


_real_installed_versions = checkpoints_module.installed_versions


MUTANTS: tuple[Mutant, ...] = (
    Mutant("upstream_defect_1_latent_broadcast", "forward_contract", "batching_cycle",
           "cycle latent MSE of [B,1,D] against [B,D] (averages B*B pairs)",
           lambda: [mock.patch.object(cycle_module, "normalized_latent_mse", _broadcast_latent_mse)],
           expect=TRAINER_ERROR),  # torch's "Using a target size" warning, an error in the suite
    Mutant("upstream_defect_1_x0_broadcast", "forward_contract", "keywords_and_shapes",
           "x0 reconstructed from a [B,1,D] prediction against [B,D] x_t",
           lambda: [mock.patch.object(ContinuousDiffusion, "x0_from_prediction",
                                      _x0_without_reshape(ContinuousDiffusion.x0_from_prediction))],
           expect=TRAINER_ERROR),
    Mutant("upstream_defect_3_cluster_unpack", "forward_contract", "cluster_head",
           "stable trainer unpacks two outputs from a cluster-head model",
           lambda: [mock.patch.object(stable_module, "split_model_outputs", _two_output_unpack)], expect=TRAINER_ERROR),
    Mutant("upstream_defect_4_root_keys", "config_resolution", "same_yaml_same_settings",
           "stable trainer reads latent diffusion keys from the config root",
           lambda: [mock.patch.object(stable_module.MultimodalDiffusionTrainer, "__init__",
                                      _stable_reads_root_keys(stable_module.MultimodalDiffusionTrainer.__init__))]),
    Mutant("random_latent_t", "t2l_latent_timestep", "cycle_distribution",
           "cycle T2L samples t in [t_min, t_max] whatever latent_t_mode says",
           lambda: [mock.patch.object(cycle_module.CycleVAETrainer, "sample_latent_t", _always_random_t)]),
    Mutant("unnormalised_mse", "latent_loss_form", "epsilon-cosine",
           "cycle latent loss is a plain MSE without L2 normalisation",
           lambda: [mock.patch.object(cycle_module, "normalized_latent_mse", _unnormalised_mse)]),
    Mutant("partial_l2t_mask", "l2t_masking", "l2t_loss_batch_n",
           "cycle L2T masks every other token instead of all",
           lambda: [mock.patch.object(cycle_module.CycleVAETrainer, "l2t_text_inputs", _half_masked_l2t)]),
    Mutant("none_to_ones", "none_timesteps", "none_equals_zeros",
           "model maps a None timestep to ones instead of zeros",
           lambda: [mock.patch.object(model_module.MultimodalMMDiT, "timesteps_or_zeros", _none_to_ones)]),
    Mutant("stop_grad_off", "cycle_terms", "stop_grad",
           "cycle trainer ignores loss.cycle_stop_grad_latent=true",
           lambda: [mock.patch.object(cycle_module.CycleVAETrainer, "__init__",
                                      _stop_grad_off(cycle_module.CycleVAETrainer.__init__))]),
    Mutant("wrong_v_formula", "x0_reconstruction", "formula_v_param",
           "x0 from v with the wrong sign: sqrt(ab) x_t + sqrt(1-ab) v",
           lambda: [mock.patch.object(ContinuousDiffusion, "x0_from_v", _wrong_x0_from_v)]),
    Mutant("dropped_attention_mask", "forward_contract", "padding_does_not_leak",
           "model ignores the attention mask (padding attended)",
           lambda: [mock.patch.object(model_module.MultimodalMMDiT, "forward",
                                      _mask_dropped(model_module.MultimodalMMDiT.forward))]),
    Mutant("checkpoint_prefix_left_on", "pretrained_checkpoint", "upstream_layouts",
           "loader strips module./_orig_mod. but leaves the trainer's model. prefix",
           lambda: [mock.patch.object(checkpoint_keys_module, "normalize_key", _prefix_kept)]),
    Mutant("ramp_ignores_warmup", "cycle_terms", "ramp",
           "cycle weight ramp starts at step 0 regardless of *_warmup_steps",
           lambda: [mock.patch.object(cycle_module, "ramp_weight", _ramp_ignores_warmup)]),
    Mutant("global_rng_draws", "determinism", "stable_unconditional",
           "trainer draws come from the global torch RNG instead of the trainer's generator",
           lambda: [mock.patch.object(draws_module.DrawSource, "_take", _global_rng_take)]),
    Mutant("cycle_freezes_text_group", "gradient_flow", "cycle_total",
           "cycle trainer freezes the text group (stable t2l style) for its whole step",
           lambda: [mock.patch.object(cycle_module.CycleVAETrainer, "forward",
                                      _cycle_freezes_text(cycle_module.CycleVAETrainer.forward))]),
    Mutant("mmdit_default_residual_streams", "pretrained_checkpoint", "loads_strictly",
           "model built with mmdit's default 4 residual streams instead of the configured 2",
           lambda: [mock.patch.object(model_module, "MMDiT", _mmdit_default_streams(model_module.MMDiT))]),
    Mutant("hyper_connections_version_drift", "dependency_versions", "recorded_vs_installed",
           "installed hyper-connections differs from the one recorded in the checkpoint",
           lambda: [mock.patch.object(checkpoints_module, "installed_versions",
                                      lambda: dict(_real_installed_versions(), **{"hyper-connections": "0.3.9"}))]),
    Mutant("dtype_ignored", "mixed_precision", "bf16_cast_matches_fp32",
           "trainers read training.dtype and then feed the model float32 anyway",
           lambda: [mock.patch.object(base_module.DiffusionTrainerBase, "__init__",
                                      _dtype_ignored(base_module.DiffusionTrainerBase.__init__))]),
    Mutant("cycle_autocast_off", "mixed_precision", "autocast_exercised",
           "the cycle trainer turns autocast off for its step (it trains in float32 while judged at bf16)",
           lambda: [mock.patch.object(cycle_module.CycleVAETrainer, "forward",
                                      _cycle_autocast_off(cycle_module.CycleVAETrainer.forward))]),
    Mutant("reference_latent_mse_in_bf16", "mixed_precision", "losses_computed_in_float32",
           "the stable reference reduces its latent MSE in the outputs' bfloat16 instead of float32",
           lambda: [mock.patch.object(stable_module, "normalized_latent_mse", _latent_mse_in_low_precision)]),
    Mutant("cycle_entry_beta1", "trajectories", "cycle_loop_matches_oracle",
           "the cycle entry point's loop uses AdamW beta1 0.8 whatever optimizer.beta1 says",
           lambda: [mock.patch.object(training_loop_module, "_train", _cycle_entry_beta1(training_loop_module._train))]),
    Mutant("clip_norm_from_other_key", "trajectories", "stable_loop_matches_oracle",
           "the loop reads its clipping norm from optimizer.weight_decay instead of optimizer.grad_clip_norm "
           "(the reference's own loop then fails its replay: the row cannot judge, exit 2)",
           lambda: [mock.patch.object(LoopSettings, "from_settings",
                                      _clip_norm_from_other_key(LoopSettings.from_settings))],
           expect=CONTROL),
    Mutant("synthetic_data_reseeded", "trajectories", "golden_values",
           "the loop's synthetic data seeded differently (a numerics change only a golden file sees)",
           lambda: [mock.patch.object(training_data_module, "SYNTHETIC_DATA_SEED_OFFSET",
                                      training_data_module.SYNTHETIC_DATA_SEED_OFFSET + 1)]),
    Mutant("latent_ramp_from_text_key", "recommended_settings", "trainer_honours_config",
           "cycle_latent's ramp length read from cycle_text_ramp_steps (a setting read from the wrong key)",
           lambda: [mock.patch.object(cycle_module.CycleVAETrainer, "__init__",
                                      _latent_ramp_from_text_key(cycle_module.CycleVAETrainer.__init__))]),
    Mutant("ddp_not_wrapped", "ddp", "ddp_matches_single_process",
           "the training loop forgets to wrap the model in DDP (no gradient all-reduce between ranks)",
           lambda: [mock.patch.object(training_distributed_module, "wrap_model_for_ddp", _ddp_not_wrapped)]),
    Mutant("cosine_offset_wrong", "reference_integrity", "schedules",
           "the cosine schedule of both trainers uses s = 0.08 instead of 0.008",
           lambda: [mock.patch.object(diffusion_module, "cosine_betas", _cosine_offset_wrong)]),
    Mutant("categorical_at_temperature_2", "cycle_terms", "categorical_sampling",
           "categorical pseudo tokens sampled from softmax(logits / 2)",
           lambda: [mock.patch.object(cycle_module, "pseudo_tokens_from_logits", _categorical_at_temperature_2)]),
    Mutant("cycle_latent_t_as_index", "cycle_terms", "terms_recomputed",
           "the cycle_latent pass is given t as the index 999 instead of 1.0 (same noise, other input)",
           lambda: [mock.patch.object(cycle_module.CycleVAETrainer, "sample_latent_t",
                                      _cycle_latent_t_as_index(cycle_module.CycleVAETrainer.sample_latent_t))]),
    Mutant("weights_as_python_floats", "compiled_trainer", "recompilations_bounded",
           "the cycle weights enter the compiled step as Python floats (a recompilation per ramp step)",
           lambda: [mock.patch.object(cycle_module.CycleVAETrainer, "term_weights", _weights_as_python_floats)]),
    Mutant("mask_lost_when_compiled", "compiled_trainer", "compiled_matches_eager",
           "the cycle trainer converts the attention mask inside an `if not is_compiling()` check: compiled, "
           "padding is attended",
           lambda: [mock.patch.object(cycle_module, "prepare_batch", _mask_checked_outside_compile(cycle_module.prepare_batch))]),
    Mutant("cycle_latent_graph_kept", "resources", "memory",
           "the cycle trainer scales its loss by the pseudo tokens' softmax confidence over its detached value "
           "(1.0 in value): the graph through the L2T logits is kept for backward although stop-grad is on "
           "(+B x S x V float32 saved)",
           lambda: [mock.patch.object(cycle_module.CycleVAETrainer, "cycle_step",
                                      _graph_kept_past_stop_grad(cycle_module.CycleVAETrainer.cycle_step))]),
    Mutant("passes_at_weight_zero", "resources", "flops",
           "the cycle trainer makes the cycle_text and cycle_latent passes while their weights are 0 (the warmup): "
           "a cost (REVIEW), as the cycle_terms row says of it",
           lambda: [mock.patch.object(cycle_module.CycleVAETrainer, "term_weights",
                                      _passes_at_weight_zero(cycle_module.CycleVAETrainer.term_weights))],
           expect=REVIEWED, review="passes_for_terms_weighted_0"),
)
