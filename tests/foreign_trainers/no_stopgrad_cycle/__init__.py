"""A cycle trainer whose x0 estimate reaches cycle_text with its gradient although
`loss.cycle_stop_grad_latent` is true: it calls `x0.detach()` and drops the result. Its forward
numbers are those of a correct trainer (same loss for the same random numbers); only the
gradients differ: cycle_text also trains the T2L path (latent_head, latent_encoder) through x0.
Random numbers come from torch's global RNG, drawn in the same order as functional_cycle's.

Load it by path: tests/foreign_trainers/no_stopgrad_cycle/cycle.py:NoStopGradCycleTrainer
(a package using absolute imports of itself: its parent folder must be importable).

Gate verdict expected: INCOMPATIBLE on the cycle-terms row (gradient reaches the T2L prediction
through cycle_text while cycle_stop_grad_latent is true); the loss-only rows stay OK; gate exit 1.
"""

from no_stopgrad_cycle.cycle import NoStopGradCycleTrainer

__all__ = ["NoStopGradCycleTrainer"]
