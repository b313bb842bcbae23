"""Writes a random checkpoint for a config without holding the model in memory.

The model is built on the meta device (names, shapes, no storage); each tensor is then drawn in
float32 from a seeded generator and streamed to a safetensors file with this project's metadata,
one tensor at a time, so writing a 3.5 GB checkpoint needs about one tensor of memory.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from omegaconf import OmegaConf

from latentDLM_mmdit.checkpoints import FORMAT, installed_versions
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT

CHUNK = 1 << 22  # values drawn per piece


def write_random_checkpoint(config, path: str | Path, seed: int = 0, std: float = 0.02) -> tuple[Path, int]:
    """Returns (path, number of parameters). Every tensor ~ N(0, std^2), float32."""
    path = Path(path)
    model_cfg = config.model
    sizes = {
        "vocab_size": int(config.tokenizer.vocab_size),
        "latent_dim": int(model_cfg.latent_dim),
        "cluster_size": int(model_cfg.get("cluster_size", 0) or 0),
    }
    with torch.device("meta"):
        model = MultimodalMMDiT(model_cfg, **sizes)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 4 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {
        "format": FORMAT,
        "config": json.dumps(OmegaConf.to_container(config, resolve=True)),
        "versions": json.dumps(installed_versions()),
        "trainer_kind": "stable",
        "step": "0",
        "model_sizes": json.dumps(sizes),
        "note": "random weights written by bench.random_checkpoint",
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _name, shape in shapes.items():
            remaining = int(torch.Size(shape).numel())
            while remaining:
                n = min(CHUNK, remaining)
                f.write((torch.randn(n, generator=gen) * std).numpy().tobytes())
                remaining -= n
    return path, sum(int(torch.Size(s).numel()) for s in shapes.values())
