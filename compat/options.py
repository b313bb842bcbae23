"""The gate's options, declared once: the command line (`python -m compat --checkpoint ...`) and
the pytest plugin (`pytest compat/ --compat-checkpoint ...`) are both built from `OPTIONS`."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class GateOption:
    """One option: `--<name>` on the gate, `--compat-<name>` in pytest, `<name with _>` on CompatOptions."""

    name: str
    help: str
    type: type = str
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def default(self) -> Any:
        """The default, declared once: the `CompatOptions` field of the same name."""
        field = next((f for f in fields(CompatOptions) if f.name == self.dest), None)
        if field is None or field.default is MISSING:
            raise TypeError(f"CompatOptions has no field {self.dest!r} with a default for option --{self.name}")
        return field.default


OPTIONS: tuple[GateOption, ...] = (
    GateOption(
        "checkpoint",
        "checkpoint under test: this project's .safetensors, upstream's .pt/.pth, or upstream's "
        "checkpoint folder; default: the embedded stable pretrain",
        metavar="CKPT",
    ),
    GateOption(
        "stable-config",
        "the stable trainer's YAML (plain, or upstream's Hydra file with a defaults list); "
        "default: the packaged tiny config",
        metavar="YAML",
    ),
    GateOption("cycle-config", "the cycle trainer's YAML; default: the packaged tiny config", metavar="YAML"),
    GateOption("data-tokens", "upstream-format token folder (<stem>_tokens.npz); needs --data-latents", metavar="DIR"),
    GateOption("data-latents", "upstream-format latent folder (<stem>.npy); needs --data-tokens", metavar="DIR"),
    GateOption(
        "tokenizer",
        "a local tokenizer folder (tokenizer.json, or vocab.txt with special_tokens_map.json / "
        "tokenizer_config.json): the mask and pad ids when the configs do not give them (upstream's "
        "configs hold only a tokenizer path)",
        metavar="DIR",
    ),
    GateOption("mask-token-id", "the mask token id (else from the configs or --tokenizer)", type=int, metavar="ID"),
    GateOption("pad-token-id", "the pad token id (else from the configs or --tokenizer)", type=int, metavar="ID"),
    GateOption(
        "cycle-trainer",
        "the cycle trainer class to judge: package.module:Class or path/to/file.py:Class "
        "(upstream's protocol: Class(model, tokenizer, text_noise_schedule, dtype, config), "
        "forward(batch) -> (loss, metrics)); default: this project's CycleVAETrainer",
        metavar="SPEC",
    ),
    GateOption(
        "stable-trainer",
        "the stable reference class, as --cycle-trainer; default: this project's "
        "MultimodalDiffusionTrainer (upstream parity)",
        metavar="SPEC",
    ),
    GateOption("device", "cpu, cuda or cuda:N"),
    GateOption("batch-size", "samples per batch of the rows (>= 2)", type=int, metavar="N"),
    GateOption(
        "seq-len",
        "tokens per sample; default: 16 on synthetic data, on your data the longest sample "
        "(capped by model.max_seq_len)",
        type=int,
        metavar="N",
    ),
    GateOption(
        "compile-backend",
        "torch.compile backend of the compiled_trainer row (inductor, aot_eager, eager); default: "
        "aot_eager on cpu, inductor on cuda",
        metavar="NAME",
    ),
    GateOption(
        "compile-scope",
        "what the compiled_trainer row compiles: full (the trainer with the model's forward inlined, "
        "as the cluster run) or trainer (the trainer's own code, model passes eager); default: "
        "full on cuda, trainer on cpu (tracing the mmdit backbone takes ~30 s of CPU per pass)",
        metavar="SCOPE",
    ),
    GateOption(
        "gpu-memory",
        "memory of one GPU for the resources row's fit check, with its unit (80GiB, 24GB, 81920MiB); "
        "default: the CUDA device's total memory with --device cuda, else the fit check is not applicable",
        metavar="SIZE",
    ),
    GateOption(
        "gpu-tflops",
        "dense bf16 TFLOP/s of one GPU (e.g. 989 for an H100 SXM): the resources row projects GPU-hours "
        "for training.num_train_steps at an assumed utilisation; default: no projection",
        type=float,
        metavar="X",
    ),
    GateOption(
        "golden",
        "a golden trajectory file (from --record-golden) the trajectories row compares against; "
        "default: the committed one for the embedded default, none for your inputs",
        metavar="FILE",
    ),
    GateOption(
        "record-golden",
        "write the trajectories' per-step losses, gradient norms and final-weight "
        "checksums to FILE (then compare against it)",
        metavar="FILE",
    ),
)


@dataclass
class CompatOptions:
    """What the user passed (the gate's flags or pytest's `--compat-*` options). Each field is one
    option of `OPTIONS` and its default is the option's default (`GateOption.default` reads it here)."""

    checkpoint: str | None = None
    stable_config: str | None = None
    cycle_config: str | None = None
    data_tokens: str | None = None
    data_latents: str | None = None
    tokenizer: str | None = None
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    cycle_trainer: str | None = None
    stable_trainer: str | None = None
    device: str = "cpu"
    batch_size: int = 4
    seq_len: int | None = None
    compile_backend: str | None = None
    compile_scope: str | None = None
    gpu_memory: str | None = None
    gpu_tflops: float | None = None
    golden: str | None = None
    record_golden: str | None = None

    @property
    def embedded(self) -> bool:
        return self.checkpoint is None

    @property
    def user_inputs(self) -> bool:
        """True when the user gave a checkpoint, config, data or trainer of their own (the embedded
        default otherwise: the planted defects and the committed golden file are for that)."""
        return any(
            (self.checkpoint, self.stable_config, self.cycle_config, self.cycle_trainer, self.stable_trainer, self.data)
        )

    @property
    def data(self) -> bool:
        return bool(self.data_tokens or self.data_latents)
