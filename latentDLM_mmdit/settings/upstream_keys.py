"""Upstream's keys: its names of schema keys (`ALIASES`, `VALUE_ALIASES`, `optimizer.betas`) and the
keys it wrote that are accepted but not used here, each with the reason (`UPSTREAM_UNUSED`)."""

from __future__ import annotations

from dataclasses import dataclass


# Upstream names of schema keys: (schema key, value translation).
ALIASES = {
    "logging.log_freq": ("logging.log_every", None),
    "logging.save_freq": ("logging.save_every", None),
    "logging.save_dir": ("logging.log_dir", None),
    # upstream's get_optimizer built AdamW for type adam; psgd (heavyball) is not available here.
    "optimizer.type": ("optimizer.name", {"adam": "adamw", "adamw": "adamw"}),
}
# Upstream values of schema keys: key -> {upstream value: (value here, why)}.
_MULTIMODAL_MDLM = (
    "upstream's stable trainer fell back to unconditional for a loss_type other than l2t, t2l, "
    "unconditional, sequential and random; multimodal_mdlm (its mmdit.yaml) trained unconditional"
)
VALUE_ALIASES = {"loss.loss_type": {"multimodal_mdlm": ("unconditional", _MULTIMODAL_MDLM)}}
BETAS_KEY = "optimizer.betas"
_DATA_LOADER = "upstream's data loader option; this project reads data.token_dir / data.latent_dir with its own loader"
_NOT_READ = "not read by upstream's stable training script, trainer or model either"


@dataclass(frozen=True)
class UpstreamKey:
    """An upstream key accepted but not used here; `allowed` (when set): the only values that give
    upstream's behaviour, anything else is an error."""

    reason: str
    allowed: tuple | None = None


UPSTREAM_UNUSED: dict[str, UpstreamKey] = {
    "hydra": UpstreamKey(
        "Hydra's own settings (run and sweep directories); the output directory here is "
        "--output-dir or logging.log_dir/logging.run_name"
    ),
    "data.data_dir": UpstreamKey(_DATA_LOADER),
    "data.data_files": UpstreamKey(_DATA_LOADER),
    "data.dataset_name": UpstreamKey(_DATA_LOADER),
    "data.latent_data_root": UpstreamKey(_DATA_LOADER),
    "data.max_length": UpstreamKey(_DATA_LOADER),
    "data.max_samples": UpstreamKey("upstream capped the samples it read; every sample of the data dirs is used here"),
    "data.max_val_samples": UpstreamKey("no evaluation loop here"),
    "data.val_ratio": UpstreamKey("no evaluation loop here"),
    "data.initial_scan_limit": UpstreamKey(_DATA_LOADER),
    "data.load_tokens": UpstreamKey("pre-tokenized .npz files are the only input here", allowed=(True,)),
    "data.use_preprocessed": UpstreamKey("upstream's preprocessed layout is the only input here", allowed=(True,)),
    "data.tokenizer_path": UpstreamKey("upstream's training script read tokenizer.path, not this key"),
    "data.tokenizer_name": UpstreamKey("upstream's training script read tokenizer.path, not this key"),
    "data.cache_dir": UpstreamKey("nothing is downloaded here"),
    "data.local_files_only": UpstreamKey("nothing is downloaded here"),
    "data.sequential_schedule": UpstreamKey("upstream's stable trainer read training.sequential_schedule"),
    "model.type": UpstreamKey(
        "upstream chose its model class by it; MultimodalMMDiT is the model here", allowed=("multimodal_mmdit",)
    ),
    "model.diffusion_process": UpstreamKey(
        "upstream's stable script built MaskedDiffusion whatever it says; so does this project"
    ),
    "model.latent_diffusion_process": UpstreamKey(
        "upstream's trainers built ContinuousDiffusion whatever it says; so does this project"
    ),
    "model.use_multimodal": UpstreamKey(_NOT_READ),
    "model.latent_beta_min": UpstreamKey(
        "upstream's trainers built ContinuousDiffusion without it (betas 1e-4 to "
        "0.02 for the linear and sigmoid schedules); so does this project"
    ),
    "model.latent_beta_max": UpstreamKey(
        "upstream's trainers built ContinuousDiffusion without it (betas 1e-4 to "
        "0.02 for the linear and sigmoid schedules); so does this project"
    ),
    "model.p_uniform": UpstreamKey(
        "upstream's stable script built MaskedDiffusion(tokenizer) without it (pure masking); so does this project"
    ),
    "model.t_eps": UpstreamKey(
        "upstream's stable script built MaskedDiffusion(tokenizer) without it; so does this project"
    ),
    "model.n_heads": UpstreamKey("read by nothing, as upstream: the mmdit backbone runs 8 heads of 64 dims"),
    "model.use_stub_if_no_mmdit": UpstreamKey(
        "upstream's cycle entry point could fall back to a stub model; the real mmdit is always used here"
    ),
    "training.eval_batch_size": UpstreamKey("no evaluation loop here"),
    "training.num_epochs": UpstreamKey(
        "this loop runs training.num_train_steps optimizer steps; upstream's stable "
        "script ran num_epochs passes over its data and used num_train_steps only "
        "in its LR schedule"
    ),
    "training.world_size": UpstreamKey("set by the launcher at run time (torchrun)"),
    "training.resume": UpstreamKey("resume with --resume CKPT", allowed=(None,)),
    "training.total_steps": UpstreamKey(_NOT_READ),
    "training.save_every_n_steps": UpstreamKey(_NOT_READ),
    "training.loss_type": UpstreamKey("upstream's trainers read loss.loss_type"),
    "loss.loss_scale": UpstreamKey(
        "upstream multiplied the loss by it before backward; only 1.0 is supported here", allowed=(1, 1.0)
    ),
    "loss.reduction": UpstreamKey(_NOT_READ),
    "loss.use_cross_entropy": UpstreamKey(_NOT_READ),
    "loss.text_loss_weight": UpstreamKey(_NOT_READ + " (the text loss has weight 1)"),
    "loss.text_kl_weight": UpstreamKey(_NOT_READ),
    "optimizer.use_fused": UpstreamKey("not read by upstream's get_optimizer either"),
    "tokenizer.cache_dir": UpstreamKey("tokenizer folders are read locally here; nothing is downloaded"),
    "tokenizer.local_files_only": UpstreamKey("tokenizer folders are read locally here; nothing is downloaded"),
    "tokenizer.name": UpstreamKey("a hub name; nothing is downloaded here (pass --tokenizer DIR)"),
    "logging.eval_freq": UpstreamKey("no evaluation loop here"),
    "logging.num_eval_batches": UpstreamKey("no evaluation loop here"),
    "logging.wandb_project": UpstreamKey("no wandb here: every step goes to metrics.jsonl"),
    "logging.wandb_entity": UpstreamKey("no wandb here: every step goes to metrics.jsonl"),
    "logging.wandb_dir": UpstreamKey("no wandb here: every step goes to metrics.jsonl"),
}
BETAS_OVER_BETA1_BETA2 = (
    "upstream's stable trainer built AdamW from optimizer.betas (its optimizer group) "
    "and never read beta1/beta2; optimizer.betas sets both here"
)
