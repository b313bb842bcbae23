"""The fixture layer every row shares: ONE model instance, both trainers over it, seeded batches
with padding, and the random draws both trainers are given. `CompatContext` is the tester: it reads
the user's inputs and builds the model (here); what rows feed the trainers (`row_inputs.RowInputs`)
and the trainers' runs (`runs.TrainerRuns`) are its mixins.

With no options it runs on the embedded default: the packaged tiny stable and cycle configs and a
checkpoint written by the stable training entry point (a few dozen synthetic steps, made once per
session). With options it runs on the user's checkpoint, configs and upstream-format data.
"""

from __future__ import annotations

import copy
import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from latentDLM_mmdit.checkpoints import (
    CheckpointContents,
    CheckpointError,
    LoadReport,
    ModelLayout,
    derive_layout,
    layout_differences,
    load_checkpoint_into,
)
from latentDLM_mmdit.factory import build_model_uninitialized
from latentDLM_mmdit.improved_trainer_stable import MultimodalDiffusionTrainer
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
from latentDLM_mmdit.seeding import seed_everything
from cycle_vae_impl.trainers.cycle_vae_trainer import CycleVAETrainer
from compat.inputs import (
    GateVocab,
    check_options,
    default_seq_len,
    load_user_config,
    open_user_checkpoint,
    read_data_samples,
    resolve_device,
    resolve_gate_vocab,
)
from compat.options import CompatOptions
from compat.oracle import TOLERANCES
from compat.outcomes import GateInputError, blocked, control_failed
from compat.row_inputs import RowInputs
from compat.runs import TrainerRuns
from compat.subjects import Subject
from compat.trainer_spec import TrainerSpec

logger = logging.getLogger(__name__)

EMBEDDED_PRETRAIN_STEPS = 30
LARGE_MODEL_PARAMS = 20_000_000
# The table's entries per autocast dtype: (losses, gradients).
AUTOCAST_TOLERANCES = {
    "bf16": ("autocast_bf16_loss", "autocast_bf16_grad"),
    "fp16": ("autocast_fp16_loss", "autocast_fp16_grad"),
}
PROXY_SEED = 1234
PROXY_SIZES = {"hidden_size": 32, "cond_dim": 32, "n_blocks": 1, "max_seq_len": 32, "dropout": 0.0}
# Model keys that decide the parameter layout; both configs must agree on them.
LAYOUT_KEYS = (
    "hidden_size",
    "n_blocks",
    "cond_dim",
    "max_seq_len",
    "num_residual_streams",
    "latent_dim",
    "cluster_size",
)


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


def row_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A row's settings (`loss.*` keys unless dotted), checked against the settings schema when the
    row module is imported, i.e. at collection time: a typo is a collection error naming the key and
    the nearest valid one, never a setting silently added and a row that tests the default. (The
    values are checked when a trainer's config is built from them, by the same schema.)"""
    from latentDLM_mmdit.settings import ConfigError, schema_kind, unknown_key_message

    for key in settings:
        full = key if "." in key else f"loss.{key}"
        if schema_kind(full) is None:
            raise ConfigError(unknown_key_message(full, "a compat row's settings"))
    return dict(settings)


def layout_of(source, path: Path):
    """The model layout the checkpoint's names and shapes imply (`checkpoints.derive_layout`)."""
    try:
        return derive_layout(source.shapes, str(path))
    except CheckpointError as exc:
        raise GateInputError(
            f"--checkpoint {path}: {exc}",
            "pass a checkpoint written by the stable trainer (upstream's or this project's)",
        ) from None


SENSITIVITY_SEED = 1357
SENSITIVITY_MIN = TOLERANCES["sensitivity"][0]
# What each compared input must move: the timesteps both outputs, the latents the text logits
# (L2T is conditioned on them), the text the latent prediction (T2L is conditioned on it).
SENSITIVITY_PROBES = {"text_t": (0, 1), "latent_t": (0, 1), "latents": (0,), "text": (1,)}


@torch.no_grad()
def sensitivity(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """For each input the rows compare, the smallest relative change (max |change| / max |output|)
    of the outputs it must move when it changes: text t 0.3 -> 0.9, latent t 0.7 -> 0.1, the latents
    negated, the real tokens shifted."""
    B = batch["input_ids"].shape[0]
    device = batch["input_ids"].device
    base = dict(
        text_tokens=batch["input_ids"],
        latents=batch["latent"],
        attention_mask=batch["attention_mask"],
        text_timesteps=torch.full((B,), 0.3, device=device),
        latent_timesteps=torch.full((B,), 0.7, device=device),
    )
    shifted = torch.where(
        batch["attention_mask"].bool(), (batch["input_ids"] + 1) % model.vocab_size, batch["input_ids"]
    )
    changes = {
        "text_t": {"text_timesteps": torch.full((B,), 0.9, device=device)},
        "latent_t": {"latent_timesteps": torch.full((B,), 0.1, device=device)},
        "latents": {"latents": -batch["latent"]},
        "text": {"text_tokens": shifted},
    }
    reference = model(**base)
    out = {}
    for name, change in changes.items():
        moved = model(**{**base, **change})
        out[name] = min(
            float((moved[i] - reference[i]).abs().max() / reference[i].abs().max().clamp_min(1e-12))
            for i in SENSITIVITY_PROBES[name]
        )
    return out


SENSITIZING_SCALES = (0.05, 0.1, 0.2, 0.4)


def sensitized_copy(model: MultimodalMMDiT, scale: float = 0.05) -> MultimodalMMDiT:
    """A copy whose every weight is perturbed by `scale` N(0,1) (seeded), as the upstream parity
    fixtures were (0.05), so that zero-initialised time gates and a short pretrain do not hide a
    difference."""
    copy_ = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(SENSITIVITY_SEED)
    with torch.no_grad():
        for p in copy_.parameters():
            p.add_((scale * torch.randn(p.shape, generator=gen)).to(p))
    return copy_


def require_sensitive(ctx, inputs: tuple[str, ...]) -> dict[str, float]:
    """The semantic model's sensitivity to `inputs` (computed once per session); the check is NOT RUN
    ("could not check") when an input barely moves the outputs."""
    if ctx._sensitivity is None:
        ctx._sensitivity = sensitivity(ctx.semantic_model(), ctx.batch(2, seed=SENSITIVITY_SEED))
    seen = ctx._sensitivity
    blind = [name for name in inputs if seen[name] < SENSITIVITY_MIN]
    if blind:
        control_failed(
            f"the model's outputs barely change (relative {', '.join(f'{seen[n]:.1e}' for n in blind)}"
            f") when {', '.join(blind)} change, below {SENSITIVITY_MIN:g}, even on a sensitized copy: this "
            "row would pass whether or not the trainers feed them right"
        )
    return seen


def sensitivity_control(*inputs: str):
    """A row's control check: the model it runs on responds to every input the row compares (see
    `require_sensitive`); `row_test` makes every other check of the row require it too."""

    def check_model_sees_inputs(ctx, measure):
        seen = require_sensitive(ctx, inputs)
        measure("sensitivity", ", ".join(f"{k} {seen[k]:.2g}" for k in inputs))
        measure("semantic_model", ctx.semantic_note)

    check_model_sees_inputs.inputs = inputs
    return check_model_sees_inputs


NONFINITE_SCAN_CHUNK = 2**22  # elements of a tensor checked at once: isfinite's temporaries stay ~16 MiB


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names (with counts) of the model's tensors that hold NaN or Inf, scanned in chunks so that a
    full-size embedding costs no temporaries of its own size (the gate's memory peak)."""
    found = []
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                flat = value.detach().reshape(-1)
                bad = sum(
                    int(flat[i : i + NONFINITE_SCAN_CHUNK].isfinite().logical_not().sum())
                    for i in range(0, flat.numel(), NONFINITE_SCAN_CHUNK)
                )
                if bad:
                    found.append(f"{name} ({bad} of {value.numel()} non-finite)")
    return found


@dataclass
class CompatContext(RowInputs, TrainerRuns):
    """Everything a row needs. Build it with `CompatContext.create(options, workdir)`."""

    options: CompatOptions
    workdir: Path
    stable_config: DictConfig
    cycle_config: DictConfig
    stable_config_path: str
    cycle_config_path: str
    checkpoint_path: Path
    device: torch.device
    sizes: dict[str, int]
    n_params: int
    seq_len: int
    seq_len_source: str
    data_samples: list | None = field(default=None, repr=False)
    layout: ModelLayout | None = None
    gate_vocab: GateVocab | None = None
    contents: CheckpointContents | None = field(default=None, repr=False)
    # The checkpoint's metadata (this project's files: config, versions, trainer; upstream's: none), read
    # when the file was opened at `create`: rows read it here instead of opening the file again.
    checkpoint_metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    model: MultimodalMMDiT | None = None
    model_released: bool = False  # a large checkpoint's weights, freed once its own row has run
    load_report: LoadReport | None = None
    load_error: str | None = None
    nonfinite: list[str] = field(default_factory=list)
    stable_subject: Subject = field(
        default_factory=lambda: Subject(TrainerSpec.of(MultimodalDiffusionTrainer), "stable")
    )
    cycle_subject: Subject = field(default_factory=lambda: Subject(TrainerSpec.of(CycleVAETrainer), "cycle"))
    setup_seconds: float = 0.0
    _sensitivity: dict[str, float] | None = field(default=None, repr=False)
    _semantic: MultimodalMMDiT | None = field(default=None, repr=False)
    semantic_note: str = "semantics rows not run"
    trajectories: dict[str, Any] = field(default_factory=dict, repr=False)  # the trajectories row's runs
    resources: dict[Any, Any] = field(default_factory=dict, repr=False)  # the resources row's traced steps
    # Every check that passed in this session, keyed by what decides its outcome (the check and both
    # trainers as driven: class, step and draws protocol, role): a planted defect's control may be
    # that pass (`compat/test_mutants.py`), on the built-in and the plug-in path alike.
    passed_checks: dict = field(default_factory=dict, repr=False)  # check key -> the review items it flagged
    # The outcome of each planted defect's check, keyed by (defect, check_key): the plug-in path's
    # case reuses the built-in path's run when its subject is driven the same way.
    mutated_outcomes: dict = field(default_factory=dict, repr=False)
    # The configs rows run under, built once: (id(base config), overrides) -> (base, sealed config).
    row_configs: dict = field(default_factory=dict, repr=False)

    def check_key(self, check) -> tuple:
        def driven(subject: Subject) -> tuple:
            spec = subject.spec
            return (spec.cls, spec.accepts_step, spec.accepts_draws, tuple(spec.draw_names), subject.role)

        return (check, driven(self.cycle_subject), driven(self.stable_subject))

    @classmethod
    def create(cls, options: CompatOptions, workdir: Path, load_model: bool = True) -> "CompatContext":
        """Reads every input (GateInputError naming the problem when one cannot be used), then
        builds the shared model from the checkpoint (a load failure is the pretrained row's
        verdict, kept in `load_error`). `load_model=False` reads only the checkpoint's names and
        shapes (what the resources row needs; `bench --only resources` measures it so); the rows that
        need the model are then blocked."""
        check_options(options)
        device = resolve_device(options.device)
        stable_config, stable_path = load_user_config(options.stable_config, "stable")
        cycle_config, cycle_path = load_user_config(options.cycle_config, "cycle")
        checkpoint = (
            Path(options.checkpoint) if options.checkpoint else make_embedded_checkpoint(stable_config, workdir)
        )
        with open_user_checkpoint(checkpoint) as source:
            layout = layout_of(source, checkpoint)
            contents = source.contents
            metadata = copy.deepcopy(dict(source.metadata))
            checkpoint = Path(source.path)  # the file read (upstream's folder holds checkpoint.pt)
            n_params = sum(int(torch.Size(s).numel()) for s in source.shapes.values())
        # What the weights are (vocabulary, latent width) from the checkpoint; the cluster head from
        # the cycle config (what the user will train; a mismatch fails the strict load).
        sizes = {
            "vocab_size": layout.vocab_size,
            "latent_dim": layout.latent_dim,
            "cluster_size": int(cycle_config.model.get("cluster_size", 0) or 0),
        }
        max_seq_len = int(cycle_config.model.max_seq_len)
        gate_vocab = resolve_gate_vocab(options, sizes["vocab_size"], {"stable": stable_config, "cycle": cycle_config})
        vocab = gate_vocab.vocab
        samples = read_data_samples(options, vocab, max_seq_len, sizes["latent_dim"]) if options.data else None
        seq_len, seq_len_source = default_seq_len(options, samples, max_seq_len)
        ctx = cls(
            options,
            workdir,
            stable_config,
            cycle_config,
            stable_path,
            cycle_path,
            checkpoint,
            device,
            sizes,
            n_params,
            seq_len,
            seq_len_source,
            samples,
            layout=layout,
            contents=contents,
            gate_vocab=gate_vocab,
            checkpoint_metadata=metadata,
        )
        if options.cycle_trainer:
            ctx.cycle_subject = Subject(TrainerSpec.load(options.cycle_trainer, "--cycle-trainer"), "cycle")
        if options.stable_trainer:
            ctx.stable_subject = Subject(TrainerSpec.load(options.stable_trainer, "--stable-trainer"), "stable")
        if not load_model:
            ctx.load_error = "not loaded: the context was created with load_model=False"
            return ctx
        try:
            ctx.model = ctx.build_model(load=True)
        except CheckpointError as exc:
            explained = [
                d for d in layout_differences(layout, cycle_config) if d.config_key != "tokenizer.vocab_size"
            ]  # the vocabulary is taken from the checkpoint
            ctx.load_error = str(exc) + ("".join(f"; {d}" for d in explained) if explained else "")
        else:
            ctx.nonfinite = nonfinite_parameters(ctx.model)
        return ctx

    def describe(self) -> dict[str, str]:
        """What was checked, for the matrix's header."""
        return {
            "checkpoint": str(self.checkpoint_path)
            if self.options.checkpoint
            else f"embedded default (stable trainer, {EMBEDDED_PRETRAIN_STEPS} synthetic steps)",
            "stable config": self.stable_config_path,
            "cycle config": self.cycle_config_path,
            "data": (
                f"{self.options.data_tokens} + {self.options.data_latents} "
                f"({len(self.data_samples or [])} samples read)"
            )
            if self.options.data
            else "synthetic",
            "batch": f"{self.options.batch_size} x {self.seq_len} tokens ({self.seq_len_source})",
            "vocabulary": ", ".join(f"{k}={getattr(self.vocab, k)} ({v})" for k, v in self.gate_vocab.sources.items()),
            "device": str(self.device),
            "model": self.model_note,
            "semantic model": self.semantic_note,
            "setup seconds": f"{self.setup_seconds:.1f}",
            "cycle trainer": self.cycle_subject.spec.describe(),
            "stable trainer": self.stable_subject.spec.describe(),
        }

    # -- model ----------------------------------------------------------------------------------
    def model_sizes(self) -> dict[str, int]:
        """vocab_size / latent_dim from the checkpoint's shapes, cluster_size from the cycle config."""
        return dict(self.sizes)

    def build_model(self, load: bool = True, path: Path | None = None) -> MultimodalMMDiT:
        """A fresh model of the configured layout, strictly loaded from `path` (default: the
        checkpoint under test), in eval mode (dropout off) on the compat device."""
        sizes = self.model_sizes()
        seed_everything(int(self.cycle_config.training.get("seed", 42)))
        args = dict(
            vocab_size=sizes["vocab_size"], latent_dim=sizes["latent_dim"], cluster_size=sizes.get("cluster_size", 0)
        )
        if load:  # allocated, not initialised: every tensor comes from the checkpoint
            model = build_model_uninitialized(self.cycle_config.model, **args)
            self.load_report = load_checkpoint_into(model, path or self.checkpoint_path)
        else:
            model = MultimodalMMDiT(self.cycle_config.model, **args)
        return model.eval().to(self.device)

    # -- scale: a full-size checkpoint -----------------------------------------------------------
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
        config = OmegaConf.merge(
            self.cycle_config.model, PROXY_SIZES, {"max_seq_len": max(self.seq_len, int(PROXY_SIZES["max_seq_len"]))}
        )
        cluster = sizes.get("cluster_size", 0) if cluster_size is None else cluster_size
        return (
            MultimodalMMDiT(
                config, vocab_size=sizes["vocab_size"], latent_dim=sizes["latent_dim"], cluster_size=cluster
            )
            .eval()
            .to(self.device)
        )

    def semantic_model(self) -> MultimodalMMDiT:
        """The model for checks of the trainers' semantics: the checkpoint's model (for a large
        checkpoint the tiny proxy), or a sensitized copy of it when its outputs barely respond to
        the inputs the rows compare (timesteps, latents, text): a row must not pass because the
        model is blind to what a defect changes. Cached."""
        if self._semantic is None:
            base = self.require_model() if not self.large else self.proxy_model()
            seen = sensitivity(base, self.batch(2, seed=SENSITIVITY_SEED))
            blind = {k: v for k, v in seen.items() if v < SENSITIVITY_MIN}
            if blind:
                probe = self.batch(2, seed=SENSITIVITY_SEED)
                for scale in SENSITIZING_SCALES:  # the smallest perturbation that makes every input visible
                    self._semantic = sensitized_copy(base, scale)
                    if min(sensitivity(self._semantic, probe).values()) >= SENSITIVITY_MIN:
                        break
                self.semantic_note = (
                    f"semantics rows ran on a sensitized copy (every weight + {scale:g} N(0,1), "
                    f"seed {SENSITIVITY_SEED}): the {'proxy' if self.large else 'checkpoint'}'s "
                    "outputs barely respond to " + ", ".join(f"{k} (relative change {v:.1e})" for k, v in blind.items())
                )
            else:
                self._semantic = base
                self.semantic_note = f"semantics rows ran on the {'proxy' if self.large else 'checkpoint'}'s own model"
        return self._semantic

    def fresh_semantic_model(self) -> MultimodalMMDiT:
        """A new instance equal to `semantic_model()`."""
        return copy.deepcopy(self.semantic_model())

    @property
    def model_note(self) -> str:
        if not self.large:
            return f"checkpoint model ({self.n_params / 1e6:.2f}M parameters)"
        return (
            f"checkpoint of {self.n_params / 1e6:.0f}M parameters: rows that check the trainers' "
            "semantics with many passes, backward passes or model copies ran on a tiny proxy built "
            "from the same config; loading, outputs and both trainers' losses ran on the checkpoint"
        )

    def pretrained_or_proxy(self) -> MultimodalMMDiT:
        """The model for checks that compare a few passes of both trainers on the pretrained weights:
        the checkpoint's own; for a large checkpoint the semantics rows' proxy instead. Those checks are
        about the trainers' code, which the proxy runs alike; the pretrained_checkpoint row runs both
        trainers' losses on the full-size checkpoint itself, once (each full-size pass costs seconds on a
        CPU, and the gate must stay within its time)."""
        return self.semantic_model() if self.large else self.require_model()

    @property
    def pretrained_note(self) -> str:
        """Which model `pretrained_or_proxy` gave, for a row's measured values."""
        return "the proxy (large checkpoint)" if self.large else "the checkpoint's model"

    @property
    def loaded(self) -> bool:
        """The checkpoint loaded into the configured model (its weights may since have been released)."""
        return self.model is not None or self.model_released

    def release_model(self) -> bool:
        """Frees a large checkpoint's weights once the only row that runs on them (pretrained_checkpoint)
        is done: every other row runs on the proxy, and the gate's peak memory is then the load's,
        not the load's plus every row's. `require_model()` loads them again if a later check asks.
        Returns whether anything was released."""
        if not self.large or self.model is None:
            return False
        self.model = None
        self.model_released = True
        gc.collect()
        return True

    def require_model(self) -> MultimodalMMDiT:
        """The shared model. A row that needs it is NOT RUN (blocked by the pretrained-checkpoint
        row, which is then INCOMPATIBLE) when it did not load or holds non-finite weights."""
        if self.model is None and self.model_released:
            self.model = self.build_model(load=True)
            self.model_released = False
        if self.model is None:
            blocked(
                f"the checkpoint does not load into the configured model (see the pretrained checkpoint "
                f"row): {self.load_error}"
            )
        if self.nonfinite:
            blocked(
                f"the checkpoint holds non-finite weights (see the pretrained checkpoint row): "
                f"{', '.join(self.nonfinite[:3])}"
            )
        return self.model


def slice_batch(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Sample i of a batch, as a batch of one."""
    return {k: v[i : i + 1] for k, v in batch.items()}


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
    """A row module's test: one parametrized case per check, ids from the CHECKS keys. When the row
    has a sensitivity control, every check first requires it: a row whose model cannot see what it
    compares is NOT RUN ("could not check"), never a pass."""
    import pytest

    control = checks.get("control_sensitivity")

    @pytest.mark.parametrize("check", list(checks.values()), ids=list(checks))
    def test_row(ctx, measure, check):
        if control is not None and check is not control:
            require_sensitive(ctx, control.inputs)
        flagged = []

        def recording(name, value, review=False, **kwargs):
            if review:
                flagged.append(name)
            measure(name, value, review=review, **kwargs)

        check(ctx, recording)
        ctx.passed_checks[ctx.check_key(check)] = tuple(flagged)

    return test_row
