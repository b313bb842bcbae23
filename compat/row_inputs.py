"""What rows feed the trainers: seeded batches with padding (synthetic or the user's data), the
named random draws both trainers are given, and the dtype they are fed in. A mixin of
`compat.harness.CompatContext` (it reads the context's vocabulary, sequence length, device, data
and cycle config)."""

from __future__ import annotations

import torch

from latentDLM_mmdit.factory import dtype_from_config
from latentDLM_mmdit.synthetic import synthetic_batch


class RowInputs:
    """Batches, draws and the trainer dtype; see the module docstring."""

    @property
    def trainer_dtype(self) -> torch.dtype:
        """The dtype both trainers feed latents and timesteps in: `training.dtype` of the cycle
        config (what the cluster run will use); the stable trainer is run in it too."""
        return dtype_from_config(self.cycle_config)

    @property
    def trainer_dtype_name(self) -> str:
        return str(self.cycle_config.training.dtype)

    def x0_of(self, batch: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The batch's clean latents [B, D] as the trainers feed them (rounded to `dtype`, default the
        trainer dtype), in float64 on the CPU: the x0 of the oracle."""
        B = batch["input_ids"].shape[0]
        return self.as_fed(batch["latent"].reshape(B, -1), dtype).double()

    def as_fed(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`x` as a trainer casts it before use (rounded to `dtype`, default the trainer dtype), in
        float32 on the CPU."""
        return x.detach().to(dtype or self.trainer_dtype).float().cpu()

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
        if self.data_samples is not None:
            return self._data_batch(batch_size, seed)
        gen = torch.Generator().manual_seed(10_000 + seed)
        batch = synthetic_batch(self.vocab, batch_size, self.seq_len, self.latent_dim, gen)
        S = self.seq_len
        lengths = [max(1, S - (i + 1) * S // (2 * batch_size)) for i in range(batch_size)]  # all < S: padded
        mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
        batch["attention_mask"] = mask
        batch["input_ids"] = torch.where(
            mask.bool(), batch["input_ids"], torch.full_like(batch["input_ids"], self.vocab.pad_token_id)
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def _data_batch(self, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        samples = self.data_samples
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

    def draws(self, batch: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
        """Every named draw a step of either trainer can use, from seeded generators: the latent
        noises [B, D], the latent t uniforms [B], the pseudo-token uniforms [B, S], and the stable
        unconditional mode's text t [B] and mask uniforms [B, S]."""
        B, S = batch["input_ids"].shape
        return {
            "latent_noise": self.noise(batch, seed=seed),
            "cycle_latent_noise": self.noise(batch, seed=seed + 50_000),
            "latent_t": self.uniforms((B,), seed=seed),
            "cycle_latent_t": self.uniforms((B,), seed=seed + 50_000),
            "pseudo_token_uniform": self.uniforms((B, S), seed=seed + 60_000),
            "text_t": self.uniforms((B,), seed=seed + 70_000),
            "mask_uniform": self.uniforms((B, S), seed=seed + 80_000),
        }
