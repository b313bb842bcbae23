"""The rows of the compatibility matrix, as the review lays it out (topic, stable, cycle), and
the verdicts a row can get.

Each row has one test module `compat/test_row_<id>.py` whose module mark
`pytest.mark.compat_row("<id>")` ties its tests to the row. A row's verdict comes from its tests:
any failure -> INCOMPATIBLE; every test skipped or deselected -> NOT RUN; a test that recorded a
measured risk -> REVIEW; otherwise OK.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

COMPAT_DIR = Path(__file__).resolve().parent

OK = "OK"
REVIEW = "REVIEW"
INCOMPATIBLE = "INCOMPATIBLE"
NOT_RUN = "NOT RUN"
VERDICTS = (OK, REVIEW, INCOMPATIBLE, NOT_RUN)


@dataclass(frozen=True)
class Row:
    id: str
    topic: str
    stable: str
    cycle: str

    @property
    def module(self) -> Path:
        """The row's test module, `compat/test_row_<id>.py`."""
        return COMPAT_DIR / f"test_row_{self.id}.py"


ROWS = (
    Row(
        "forward_contract",
        "Model forward contract",
        "keywords; (text_logits [B,S,V], latent_pred [B,1,D]) or a cluster 3-tuple",
        "same keywords; per-batch loss terms = per-sample terms",
    ),
    Row("none_timesteps", "None timesteps", "None mapped to zeros", "tensors (zeros)"),
    Row(
        "l2t_masking",
        "L2T text masking",
        "all tokens masked, CE over every position",
        "all tokens masked, CE over every position",
    ),
    Row(
        "t2l_latent_timestep", "T2L latent timestep", "latent_t = 1 (full noise)", "loss.latent_t_mode (full | random)"
    ),
    Row(
        "latent_loss_form",
        "Latent loss form",
        "normalised MSE x latent_loss_weight",
        "normalised MSE x latent_loss_weight",
    ),
    Row("cycle_terms", "Cycle terms", "none", "cycle_text + cycle_latent, weights with warmup/ramp, stop-grad"),
    Row("x0_reconstruction", "x0 reconstruction", "not used", "x0 from eps / v / x0 for cycle_text"),
    Row(
        "config_resolution",
        "Config resolution",
        "upstream read latent keys from the config root",
        "reads model.* latent keys",
    ),
    Row(
        "gradient_flow",
        "Gradient flow",
        "l2t freezes the latent group, t2l the text group",
        "no freezing; per-term gradients",
    ),
    Row(
        "pretrained_checkpoint",
        "Pretrained checkpoint",
        "writes the checkpoint",
        "loads it strictly, identical outputs",
    ),
    Row(
        "dependency_versions",
        "Dependency versions",
        "recorded in the checkpoint",
        "installed mmdit / hyper-connections",
    ),
    Row(
        "mixed_precision",
        "Mixed precision (autocast)",
        "float32 reference; bf16 autocast",
        "autocast on every pass, losses and gradients near float32",
    ),
    Row(
        "compiled_trainer",
        "Compiled trainer (torch.compile)",
        "compiled = eager",
        "compiled = eager; recompiles only when a term turns on",
    ),
    Row("determinism", "Determinism", "same seed, same losses", "same seed, same losses"),
    Row(
        "recommended_settings",
        "Recommended settings (section 5)",
        "-",
        "latent_t_mode full, small cycle weights with a ramp, stop-grad on",
    ),
    Row("ddp", "DDP (2 gloo processes)", "single-process loss and gradients", "single-process loss and gradients"),
    Row(
        "trajectories",
        "Trajectories (K loop steps)",
        "K steps of the real loop = the AdamW/clipping/schedule replay",
        "the same; base losses kept against the stable continuation; golden values",
    ),
    Row(
        "resources",
        "Resources (memory, FLOPs per step)",
        "peak memory per rank and FLOPs of a step, each mode of its schedule",
        "the same, weights at their largest; fits --gpu-memory; GPU-hours at --gpu-tflops",
    ),
    Row(
        "reference_integrity",
        "Reference integrity (shared components)",
        "schedules, masking, loss helpers, checkpoints, model forward",
        "the same code: against the float64 oracle and recorded golden values",
    ),
)

ROWS_BY_ID = {row.id: row for row in ROWS}
