"""The fixture layer every row shares: ONE model instance, both trainers over it, seeded batches
with padding, and the random draws both trainers are given.

With no options it runs on the embedded default: the packaged tiny stable and cycle configs and a
checkpoint written by the stable training entry point (a few dozen synthetic steps, made once per
session). With options it runs on the user's checkpoint, configs and upstream-format data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from latentDLM_mmdit.config import with_updates
from latentDLM_mmdit.checkpoints import (
    CheckpointError, LoadReport, load_checkpoint_into, model_sizes_from, open_checkpoint,
)
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.factory import build_model_uninitialized, dtype_from_config
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
from latentDLM_mmdit.seeding import seed_everything
from latentDLM_mmdit.synthetic import synthetic_batch
from latentDLM_mmdit.tokenizer import vocab_from_config
from cycle_vae_impl.trainers.cycle_vae_trainer import CycleVAETrainer

logger = logging.getLogger(__name__)

EMBEDDED_PRETRAIN_STEPS = 30
LARGE_MODEL_PARAMS = 20_000_000
LAST_CONTEXT = None  # the context of the last session (the gate reports its model note)
PROXY_SEED = 1234
PROXY_SIZES = {"hidden_size": 32, "cond_dim": 32, "n_blocks": 1, "max_seq_len": 32, "dropout": 0.0}
# Model keys that decide the parameter layout; both configs must agree on them.
LAYOUT_KEYS = ("hidden_size", "n_blocks", "cond_dim", "max_seq_len", "num_residual_streams", "latent_dim", "cluster_size")


@dataclass
class CompatOptions:
    """What the user passes (pytest `--compat-*` options or the gate's flags)."""

    checkpoint: str | None = None
    stable_config: str | None = None
    cycle_config: str | None = None
    data_tokens: str | None = None
    data_latents: str | None = None
    device: str = "cpu"
    report: str | None = None
    batch_size: int = 4
    seq_len: int = 16

    @property
    def embedded(self) -> bool:
        return self.checkpoint is None


def _load_config(path: str | None, kind: str) -> tuple[DictConfig, str]:
    from cycle_vae_impl.configs import config_path
    from latentDLM_mmdit.config import load_config

    resolved = Path(path) if path else Path(config_path(kind))
    return load_config(resolved), str(resolved)


def make_embedded_checkpoint(stable_config: DictConfig, workdir: Path, steps: int = EMBEDDED_PRETRAIN_STEPS) -> Path:
    """Trains the stable trainer `steps` steps on synthetic data with the stable entry point's loop
    and returns the checkpoint it wrote."""
    from latentDLM_mmdit.train_stable import STABLE
    from latentDLM_mmdit.training import run_training

    config = OmegaConf.create(OmegaConf.to_container(stable_config, resolve=True))
    config.training.num_train_steps = steps
    config.logging.save_every = steps
    out = workdir / "embedded_stable_pretrain"
    run_training(config, trainer=STABLE, output_dir=out, synthetic=True, progress=False)
    written = sorted(out.rglob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    if not written:
        raise RuntimeError(f"the stable training loop wrote no checkpoint under {out}")
    return written[-1]


@dataclass
class CompatContext:
    """Everything a row needs. Build it with `CompatContext.create(options, workdir)`."""

    options: CompatOptions
    workdir: Path
    stable_config: DictConfig
    cycle_config: DictConfig
    stable_config_path: str
    cycle_config_path: str
    checkpoint_path: Path
    model: MultimodalMMDiT | None
    load_report: LoadReport | None
    load_error: str | None
    device: torch.device
    _data_samples: list | None = field(default=None, repr=False)
    _n_params: int | None = field(default=None, repr=False)
    _proxy: MultimodalMMDiT | None = field(default=None, repr=False)

    @classmethod
    def create(cls, options: CompatOptions, workdir: Path) -> "CompatContext":
        stable_config, stable_path = _load_config(options.stable_config, "stable")
        cycle_config, cycle_path = _load_config(options.cycle_config, "cycle")
        device = torch.device(options.device)
        checkpoint = Path(options.checkpoint) if options.checkpoint else make_embedded_checkpoint(stable_config, workdir)
        ctx = cls(options, workdir, stable_config, cycle_config, stable_path, cycle_path, checkpoint,
                  None, None, None, device)
        global LAST_CONTEXT
        LAST_CONTEXT = ctx
        try:
            ctx.model = ctx.build_model(load=True)
        except CheckpointError as exc:
            ctx.load_error = str(exc)
        return ctx

    # -- model ----------------------------------------------------------------------------------
    def model_sizes(self) -> dict[str, int]:
        """vocab_size / latent_dim / cluster_size: recorded in the checkpoint, else the configs."""
        recorded = model_sizes_from(self.checkpoint_path) if self.checkpoint_path.suffix == ".safetensors" else None
        cfg = self.cycle_config
        return recorded or {"vocab_size": int(cfg.tokenizer.vocab_size), "latent_dim": int(cfg.model.latent_dim),
                            "cluster_size": int(cfg.model.get("cluster_size", 0) or 0)}

    def build_model(self, load: bool = True, path: Path | None = None) -> MultimodalMMDiT:
        """A fresh model of the configured layout, strictly loaded from `path` (default: the
        checkpoint under test), in eval mode (dropout off) on the compat device."""
        sizes = self.model_sizes()
        seed_everything(int(self.cycle_config.training.get("seed", 42)))
        args = dict(vocab_size=sizes["vocab_size"], latent_dim=sizes["latent_dim"],
                    cluster_size=sizes.get("cluster_size", 0))
        if load:  # allocated, not initialised: every tensor comes from the checkpoint
            model = build_model_uninitialized(self.cycle_config.model, **args)
            self.load_report = load_checkpoint_into(model, path or self.checkpoint_path)
        else:
            model = MultimodalMMDiT(self.cycle_config.model, **args)
        return model.eval().to(self.device)

    # -- scale: a full-size checkpoint -----------------------------------------------------------
    @property
    def n_params(self) -> int:
        """Parameter count of the checkpoint under test (from its header, without loading it)."""
        if self._n_params is None:
            with open_checkpoint(self.checkpoint_path) as source:
                self._n_params = sum(int(torch.Size(s).numel()) for s in source.shapes.values())
        return self._n_params

    @property
    def large(self) -> bool:
        """A checkpoint too large for checks that need backward passes, many passes or copies of
        the model (about 2e7 parameters and up): those run on `proxy_model()`."""
        return self.n_params > LARGE_MODEL_PARAMS

    def proxy_model(self, cluster_size: int | None = None) -> MultimodalMMDiT:
        """A tiny model with the checkpoint's vocabulary, latent width, cluster head and residual
        streams (1 block, width 32), seeded random weights: it exercises the trainers' code, which
        is what the semantics checks are about, at a cost independent of the checkpoint's size."""
        seed_everything(PROXY_SEED)
        sizes = self.model_sizes()
        config = OmegaConf.merge(self.cycle_config.model, PROXY_SIZES,
                                 {"max_seq_len": max(self.seq_len, int(PROXY_SIZES["max_seq_len"]))})
        cluster = sizes.get("cluster_size", 0) if cluster_size is None else cluster_size
        return MultimodalMMDiT(config, vocab_size=sizes["vocab_size"], latent_dim=sizes["latent_dim"],
                               cluster_size=cluster).eval().to(self.device)

    def semantic_model(self) -> MultimodalMMDiT:
        """The model for checks of the trainers' semantics: the checkpoint's model, or for a large
        checkpoint the proxy (cached)."""
        if not self.large:
            return self.require_model()
        if self._proxy is None:
            self._proxy = self.proxy_model()
        return self._proxy

    def fresh_semantic_model(self) -> MultimodalMMDiT:
        """A new instance equal to `semantic_model()` (a fresh load, or a fresh proxy)."""
        if not self.large:
            self.require_model()
            return self.build_model(load=True)
        return self.proxy_model()

    @property
    def model_note(self) -> str:
        if not self.large:
            return "checkpoint model"
        return (f"checkpoint of {self.n_params / 1e6:.0f}M parameters: rows that check the trainers' "
                "semantics with many passes, backward passes or model copies ran on a tiny proxy built "
                "from the same config; loading, outputs and both trainers' losses ran on the checkpoint")

    def require_model(self) -> MultimodalMMDiT:
        """The shared model; rows that need it are skipped (NOT RUN) when it failed to load."""
        import pytest

        if self.model is None:
            pytest.skip(f"the checkpoint did not load, so this row cannot run: {self.load_error}")
        return self.model

    # -- trainers -------------------------------------------------------------------------------
    @property
    def vocab(self):
        return vocab_from_config(self.cycle_config)

    def _with_loss(self, config: DictConfig, overrides: dict[str, Any]) -> DictConfig:
        """A validated copy of `config` with the row's overrides (`loss.*` keys unless dotted); a key
        the schema does not know (a typo) is a ConfigError naming the nearest valid key."""
        updates = {(key if "." in key else f"loss.{key}"): value for key, value in overrides.items()}
        for key, value in list(updates.items()):
            root_key = key.removeprefix("model.")
            if key.startswith("model.latent_") and config.get(root_key) is not None:  # keep a root spelling in step
                updates.setdefault(root_key, value)
        return with_updates(config, updates, "compat row overrides")

    def stable(self, mode: str, model: torch.nn.Module | None = None, base: DictConfig | None = None,
               **overrides: Any) -> MultimodalDiffusionTrainer:
        """A fresh stable trainer in `mode` over the semantic model (or `model`), from the stable
        config (or `base`). Overrides are `loss.*` keys unless dotted."""
        config = self._with_loss(self.stable_config if base is None else base, {"loss_type": mode, **overrides})
        vocab = self.vocab
        return MultimodalDiffusionTrainer(model or self.semantic_model(), vocab, MaskedDiffusion(vocab),
                                          dtype_from_config(config), config)

    def cycle(self, model: torch.nn.Module | None = None, base: DictConfig | None = None,
              **overrides: Any) -> CycleVAETrainer:
        """A fresh cycle trainer over the semantic model (or `model`), from the cycle config (or
        `base`, whose loss_type is then set to cycle_vae), with `loss.*` overrides."""
        if base is not None:
            overrides = {"loss_type": "cycle_vae", **overrides}
        config = self._with_loss(self.cycle_config if base is None else base, overrides)
        vocab = self.vocab
        trainer = CycleVAETrainer(model or self.semantic_model(), vocab, MaskedDiffusion(vocab),
                                  dtype_from_config(config), config)
        unfreeze(trainer.model)  # a stable trainer over the same model may have frozen groups
        return trainer

    # -- inputs ---------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return min(int(self.options.seq_len), int(self.cycle_config.model.max_seq_len))

    @property
    def trainer_dtype(self) -> torch.dtype:
        """The dtype the trainers feed latents and timesteps in (`training.dtype` of the cycle config)."""
        return dtype_from_config(self.cycle_config)

    def as_fed(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as a trainer casts it before use (rounded to the trainer dtype), in float32 on the CPU."""
        return x.detach().to(self.trainer_dtype).float().cpu()

    @property
    def oracle_tolerance(self) -> str:
        """Tolerance name for trainer vs float64 oracle: float32, or bfloat16 when the trainers run
        their inputs in a 16-bit dtype."""
        return "float32_oracle" if self.trainer_dtype == torch.float32 else "bfloat16"

    @property
    def latent_dim(self) -> int:
        return int(self.model_sizes()["latent_dim"])

    def batch(self, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """A batch of `batch_size` samples with padding (each sample's tail is masked out), from
        synthetic data or the user's upstream-format data, on the compat device."""
        if self.options.data_tokens:
            return self._data_batch(batch_size, seed)
        gen = torch.Generator().manual_seed(10_000 + seed)
        batch = synthetic_batch(self.vocab, batch_size, self.seq_len, self.latent_dim, gen)
        S = self.seq_len
        lengths = [max(1, S - (i + 1) * S // (2 * batch_size)) for i in range(batch_size)]  # all < S: padded
        mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
        batch["attention_mask"] = mask
        batch["input_ids"] = torch.where(mask.bool(), batch["input_ids"],
                                         torch.full_like(batch["input_ids"], self.vocab.pad_token_id))
        return {k: v.to(self.device) for k, v in batch.items()}

    def _data_batch(self, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        from latentDLM_mmdit.data import UpstreamLatentDataset

        if self._data_samples is None:
            if not self.options.data_latents:
                raise ValueError("--compat-data-tokens needs --compat-data-latents too")
            dataset = UpstreamLatentDataset(self.options.data_tokens, self.options.data_latents,
                                            int(self.cycle_config.model.max_seq_len), self.vocab)
            self._data_samples = [dataset[i] for i in range(min(len(dataset), 64))]
        samples = self._data_samples
        picks = [samples[(seed * batch_size + i) % len(samples)] for i in range(batch_size)]
        S = self.seq_len
        batch = {
            "input_ids": torch.stack([torch.as_tensor(s["input_ids"])[:S] for s in picks]),
            "attention_mask": torch.stack([torch.as_tensor(s["attention_mask"])[:S] for s in picks]),
            "latent": torch.stack([torch.as_tensor(s["latent"]).reshape(1, -1) for s in picks]).float(),
        }
        return {k: v.to(self.device) for k, v in batch.items()}

    def noise(self, batch: dict[str, torch.Tensor], seed: int = 0) -> torch.Tensor:
        """Standard normal latent noise [B, D] from a seeded generator: the draw both trainers get."""
        gen = torch.Generator().manual_seed(20_000 + seed)
        B = batch["input_ids"].shape[0]
        return torch.randn(B, self.latent_dim, generator=gen).to(self.device)

    def uniforms(self, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(30_000 + seed)
        return torch.rand(shape, generator=gen).to(self.device)


def unfreeze(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def slice_batch(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Sample i of a batch, as a batch of one."""
    return {k: v[i:i + 1] for k, v in batch.items()}


def grads_by_name(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_checks(checks: dict, ctx: CompatContext, measure=None) -> None:
    """Runs every check of a row (the mutant tests and the gate's kill table use this)."""
    measure = measure or (lambda *args, **kwargs: None)
    for check in checks.values():
        check(ctx, measure)


def row_runner(checks: dict):
    """A row module's `run_row(ctx, measure=None)`: all its checks, raising on the first failure."""
    def run_row(ctx: CompatContext, measure=None) -> None:
        run_checks(checks, ctx, measure)
    return run_row


def row_test(checks: dict):
    """A row module's test: one parametrized case per check, ids from the CHECKS keys."""
    import pytest

    @pytest.mark.parametrize("check", list(checks.values()), ids=list(checks))
    def test_row(ctx, measure, check):
        check(ctx, measure)
    return test_row


class CallRecorder(torch.nn.Module):
    """Wraps a model and records how a trainer calls it (positional args, keywords, shapes)."""

    def __init__(self, inner: torch.nn.Module, keep_outputs: bool = True):
        super().__init__()
        self.inner = inner
        self.keep_outputs = keep_outputs  # logits are [B,S,V]: many calls at a large V add up
        self.calls: list[tuple[tuple, dict]] = []
        self.outputs: list[tuple] = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        out = self.inner(*args, **kwargs)
        if self.keep_outputs:
            self.outputs.append(tuple(o.detach() for o in out))
        return out
