"""The trainers' runs every row makes: one step of the stable reference or of the cycle trainer
under test (built-in, or the user's by SPEC) on the context's model, under a row's config
overrides. A mixin of `compat.harness.CompatContext` (it reads the context's configs, vocabulary,
subjects and semantic model): the tester builds, this runs, as transformers' model tester and
mixin divide the work."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from latentDLM_mmdit.config import with_updates
from latentDLM_mmdit.factory import dtype_from_config
from compat.subjects import StepRecord


def unfreeze(model: torch.nn.Module) -> None:
    """Every parameter trainable again (a stable trainer over the same model may have frozen groups)."""
    for p in model.parameters():
        p.requires_grad_(True)


class TrainerRuns:
    """`run_stable` / `run_cycle` and the configs they run under; see the module docstring."""

    # -- trainers -------------------------------------------------------------------------------
    @property
    def vocab(self):
        """The vocabulary both trainers use: the checkpoint's size, the resolved mask and pad ids."""
        return self.gate_vocab.vocab

    def _with_loss(self, config: DictConfig, overrides: dict[str, Any]) -> DictConfig:
        """A validated copy of `config` with the row's overrides (`loss.*` keys unless dotted); a key
        the schema does not know (a typo) is a ConfigError naming the nearest valid key."""
        updates = {(key if "." in key else f"loss.{key}"): value for key, value in overrides.items()}
        for key, value in list(updates.items()):
            root_key = key.removeprefix("model.")
            if key.startswith("model.latent_") and config.get(root_key) is not None:  # keep a root spelling in step
                updates.setdefault(root_key, value)
        # Rows run many steps under the same few configs: each is built (and validated) once per
        # context (`row_configs`). The built config is sealed (read-only): handing it out again is safe.
        key = (id(config), repr(sorted(updates.items())))
        base, built = self.row_configs.get(key, (None, None))
        if base is not config:  # a new base, or another object at a freed one's id
            built = with_updates(config, updates, "compat row overrides")
            self.row_configs[key] = (config, built)
        return built

    # -- trainers under test: observed, never asked ---------------------------------------------
    def stable_config_for(
        self, mode: str, settings: dict[str, Any] | None = None, base: DictConfig | None = None
    ) -> DictConfig:
        """The stable config (or `base`) in `mode` and the comparison dtype, with `settings`
        (`loss.*` keys unless dotted)."""
        overrides = {"loss_type": mode, "training.dtype": self.trainer_dtype_name, **(settings or {})}
        return self._with_loss(self.stable_config if base is None else base, overrides)

    def cycle_config_for(self, settings: dict[str, Any] | None = None, base: DictConfig | None = None) -> DictConfig:
        """The cycle config (or `base`, made a cycle config) with `settings` (`loss.*` keys unless dotted)."""
        overrides = dict(settings or {})
        if base is not None:
            overrides = {"loss_type": "cycle_vae", **overrides}
        return self._with_loss(self.cycle_config if base is None else base, overrides)

    def run_cycle(
        self,
        batch: dict[str, torch.Tensor],
        *,
        settings: dict[str, Any] | None = None,
        config: DictConfig | None = None,
        model: torch.nn.Module | None = None,
        **step: Any,
    ) -> StepRecord:
        """One step of the cycle trainer under test (`--cycle-trainer`, default the built-in one) on
        `batch`, under `config` (default: the cycle config with `settings`), on `model` (default the
        semantic model); `step` are `_run`'s step arguments."""
        config = config if config is not None else self.cycle_config_for(settings)
        model = model if model is not None else self.semantic_model()
        unfreeze(model)  # a stable trainer over the same model may have frozen groups
        return self._run(self.cycle_subject, model, config, batch, **step)

    def run_stable(
        self,
        mode: str,
        batch: dict[str, torch.Tensor],
        *,
        settings: dict[str, Any] | None = None,
        config: DictConfig | None = None,
        model: torch.nn.Module | None = None,
        **step: Any,
    ) -> StepRecord:
        """One step of the stable reference (`--stable-trainer`, default the built-in one) in `mode`,
        as `run_cycle`."""
        config = config if config is not None else self.stable_config_for(mode, settings)
        model = model if model is not None else self.semantic_model()
        return self._run(self.stable_subject, model, config, batch, **step)

    def _run(
        self,
        subject,
        model: torch.nn.Module,
        config: DictConfig,
        batch: dict[str, torch.Tensor],
        *,
        step: int | None = None,
        draws: dict[str, torch.Tensor] | None = None,
        seed: int = 0,
        grad: bool = False,
        outputs: bool = True,
        after: StepRecord | None = None,
    ) -> StepRecord:
        """One step of `subject` (either trainer in its role) on `model` under `config`: its passes
        observed, `draws` given by name or served (see `compat.subjects`).

        Args:
            step: the global step given as `step=` (a trainer without it gets none).
            draws: the named random draws (default: served from `seed`).
            seed: seeds what the step draws that `draws` does not give.
            grad: build the autograd graph (a check that needs gradients or what requires grad);
                without it, none (a [B, S, V] vocabulary makes a graph's saved tensors the largest cost).
            outputs: keep each pass's outputs in the record (False: a check of inputs, timesteps or losses).
            after: an earlier step's record whose trainer continues (its own state, e.g. its generator).
        """
        return subject.step(
            model,
            self.vocab,
            dtype_from_config(config),
            config,
            batch,
            step=step,
            draws=draws,
            seed=seed,
            mask_token_id=self.vocab.mask_token_id,
            grad=grad,
            outputs=outputs,
            after=after,
        )
