"""A correct cycle trainer written the way another user might: functional helpers, its own names,
random numbers from torch's GLOBAL RNG (`torch.rand`, `torch.randn_like`), no `draws=` argument,
and the step read from an `iteration` attribute instead of a `step=` keyword.

Its objective is the cycle objective (T2L at latent t from `loss.latent_t_mode`, L2T fully masked
with CE over every position, cycle_text from a detached x0, cycle_latent from argmax or
categorical pseudo tokens, ramped cycle weights). Fed the same random numbers, its loss equals
this repo's `CycleVAETrainer`'s (tests/test_foreign_trainers.py).

Gate verdict expected: every row OK (or REVIEW where this repo's own trainer gets REVIEW, e.g.
gradient flow); nothing INCOMPATIBLE on the packaged tiny cycle config.
"""

from .trainer import FunctionalCycleTrainer

__all__ = ["FunctionalCycleTrainer"]
