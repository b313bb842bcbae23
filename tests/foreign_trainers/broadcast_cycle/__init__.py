"""Upstream's cycle-trainer defect, made to run: the latent prediction [B, 1, D] is compared with
a [B, D] target, so the latent losses and the x0 reconstruction broadcast to [B, B, D].

- The latent MSE is hand-written (`((pred - target) ** 2).mean()`): it averages all B*B
  prediction/target pairs, and unlike `F.mse_loss` it raises no "target size" warning, so only a
  batch-vs-per-sample comparison catches it.
- x0 = predict_x0_from_v(z_t [B, D], t, pred [B, 1, D]) is [B, B, D]; upstream then crashed in
  the model ("too many values to unpack"). This trainer "fixes" the crash the way a user might,
  by averaging over the extra axis, so every sample's x0 mixes the whole batch's z_t.

With B = 1 nothing broadcasts and it equals a correct cycle trainer.

Load it by path: tests/foreign_trainers/broadcast_cycle/trainers/cycle_vae_trainer.py:CycleVAETrainer
(same class name as this repo's trainer: nothing may be keyed on the name).

Gate verdict expected: INCOMPATIBLE on the forward contract (batch loss != mean of the
per-sample losses for B > 1) and on the rows that recompute the cycle terms or x0; gate exit 1.
"""
