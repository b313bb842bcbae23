"""The model's sizes and layout from a checkpoint's names and shapes alone (`derive_layout`), and
how a config differs from it, key by key (`layout_differences`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from latentDLM_mmdit.checkpoints.base import (
    CheckpointError,
    MMDIT_02_MARKERS,
    MMDIT_03_MARKERS,
    RESIDUAL_CONTAINER,
)
from latentDLM_mmdit.checkpoints.keys import (
    BLOCK_KEY,
    CLUSTER_HEAD,
    COND_OUT,
    LATENT_IN,
    POSITION_EMBED,
    STATIC_ALPHA_KEY,
    TEXT_HEAD,
    TOKEN_EMBED,
)
from latentDLM_mmdit.checkpoints.source import _as_source, check_model_sizes, CheckpointSource, open_checkpoint

MODEL_DEFAULT_RESIDUAL_STREAMS = 2  # what MultimodalMMDiT builds when model.num_residual_streams is unset


def model_sizes_from(path: str | Path) -> dict[str, int] | None:
    """vocab_size / latent_dim / cluster_size recorded in a checkpoint of this format, checked
    against the tensor shapes; None when the checkpoint records none."""
    with open_checkpoint(path) as source:
        sizes = source.metadata.get("model_sizes")
        return None if sizes is None else check_model_sizes(sizes, source.shapes, str(source.path))


@dataclass(frozen=True)
class ModelLayout:
    """The MultimodalMMDiT layout a state dict implies.

    num_residual_streams is None when the residual-stream shapes do not tell it; residual_layout
    is "0.2.x" / "0.3.x" (the mmdit version whose parameter names appear) or None; evidence maps
    each field to the key and shape it was read from."""

    vocab_size: int
    hidden_size: int
    latent_dim: int
    max_seq_len: int
    n_blocks: int
    cond_dim: int
    cluster_head: bool
    num_residual_streams: int | None
    residual_layout: str | None
    evidence: dict[str, str] = field(compare=False, default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "evidence"}


def derive_layout(shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> ModelLayout:
    """Derives the model layout from names and shapes alone.

    Args:
        shapes: model key (prefixes stripped, as `CheckpointSource.shapes`) -> shape.
        source: what the shapes came from, for messages.
    Raises CheckpointError naming the key when a needed tensor is missing or shapes disagree."""

    def need(key: str, ndim: int) -> tuple[int, ...]:
        shape = shapes.get(key)
        if shape is None or len(shape) != ndim:
            raise CheckpointError(
                f"{source}: cannot derive the model layout: {key} is "
                f"{'missing' if shape is None else f'{list(shape)}, not {ndim}-D'} "
                "(not a MultimodalMMDiT state dict?)"
            )
        return tuple(shape)

    def agree(what: str, key: str, got: int, want: int) -> None:
        if got != want:
            raise CheckpointError(
                f"{source}: {key} {list(shapes[key])} gives {what} {got}, "
                f"{TOKEN_EMBED} {list(shapes[TOKEN_EMBED])} gives {want}"
            )

    vocab, hidden = need(TOKEN_EMBED, 2)
    _, max_seq_len, pos_hidden = need(POSITION_EMBED, 3)
    agree("hidden_size", POSITION_EMBED, pos_hidden, hidden)
    latent_width, latent_dim = need(LATENT_IN, 2)
    agree("2 x hidden_size", LATENT_IN, latent_width, 2 * hidden)
    cond_dim, cond_in = need(COND_OUT, 2)
    if cond_in != 4 * cond_dim:
        raise CheckpointError(f"{source}: {COND_OUT} {list(shapes[COND_OUT])} is not [C, 4C]")
    for head in (TEXT_HEAD, CLUSTER_HEAD):
        if head in shapes and tuple(shapes[head]) != (vocab, hidden):
            raise CheckpointError(
                f"{source}: {head} {list(shapes[head])} is not [vocab_size, hidden_size] = "
                f"{[vocab, hidden]} as {TOKEN_EMBED} gives"
            )
    blocks = sorted({int(m.group(1)) for k in shapes if (m := BLOCK_KEY.match(k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(
            f"{source}: cannot derive n_blocks: mmdit.blocks.<i> indices are {blocks or 'absent'}, not 0..n-1"
        )
    alphas = {tuple(s) for k, s in shapes.items() if STATIC_ALPHA_KEY.match(k)}
    if not any(RESIDUAL_CONTAINER in k for k in shapes):
        streams = 1  # mmdit builds hyper-connection parameters only for more than one stream
    elif len(alphas) == 1 and len(next(iter(alphas))) == 2 and next(iter(alphas))[1] == next(iter(alphas))[0] + 1:
        streams = next(iter(alphas))[0]
    else:
        streams = None
    residual_layout = (
        "0.2.x"
        if any(m in k for k in shapes for m in MMDIT_02_MARKERS)
        else "0.3.x"
        if any(m in k for k in shapes for m in MMDIT_03_MARKERS)
        else None
    )
    evidence = {
        "vocab_size": f"{TOKEN_EMBED} {[vocab, hidden]}",
        "hidden_size": f"{TOKEN_EMBED} {[vocab, hidden]}",
        "latent_dim": f"{LATENT_IN} {[latent_width, latent_dim]}",
        "max_seq_len": f"{POSITION_EMBED} {list(shapes[POSITION_EMBED])}",
        "n_blocks": f"mmdit.blocks.0..{blocks[-1]}",
        "cond_dim": f"{COND_OUT} {[cond_dim, cond_in]}",
        "cluster_head": f"{CLUSTER_HEAD} {'present' if CLUSTER_HEAD in shapes else 'absent'}",
        "num_residual_streams": (
            f"static_alpha {list(next(iter(alphas)))}"
            if alphas and streams
            else "no residual_fns parameters"
            if streams == 1
            else "residual shapes inconclusive"
        ),
    }
    return ModelLayout(
        vocab,
        hidden,
        latent_dim,
        max_seq_len,
        len(blocks),
        cond_dim,
        CLUSTER_HEAD in shapes,
        streams,
        residual_layout,
        evidence,
    )


def checkpoint_layout(checkpoint: CheckpointSource | str | Path) -> ModelLayout:
    """derive_layout for an opened checkpoint or a path (read from the header / pickle only)."""
    source, owned = _as_source(checkpoint)
    try:
        return derive_layout(source.shapes, str(source.path))
    finally:
        if owned:
            source.close()


_MISSING = object()


def _config_value(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            return _MISSING
    return node


@dataclass(frozen=True)
class LayoutDifference:
    config_key: str
    config_value: Any
    checkpoint_value: Any
    evidence: str

    def __str__(self) -> str:
        shown = "not set" if self.config_value is _MISSING else repr(self.config_value)
        return f"{self.config_key}: config {shown}, checkpoint {self.checkpoint_value!r} ({self.evidence})"


def layout_differences(layout: ModelLayout, config: Any) -> list[LayoutDifference]:
    """Config keys whose value does not build the checkpoint's layout, one entry per key.

    Args:
        layout: from derive_layout / checkpoint_layout.
        config: a run config (dict or OmegaConf, read only) with `model.*` and
            `tokenizer.vocab_size`; an unset key is a difference, except
            model.num_residual_streams, whose unset value builds MODEL_DEFAULT_RESIDUAL_STREAMS."""
    pairs = [
        ("tokenizer.vocab_size", "vocab_size"),
        ("model.hidden_size", "hidden_size"),
        ("model.latent_dim", "latent_dim"),
        ("model.max_seq_len", "max_seq_len"),
        ("model.n_blocks", "n_blocks"),
        ("model.cond_dim", "cond_dim"),
    ]
    out = []
    for key, name in pairs:
        value = _config_value(config, key)
        if value is _MISSING or value != getattr(layout, name):
            out.append(LayoutDifference(key, value, getattr(layout, name), layout.evidence[name]))
    cluster = _config_value(config, "model.cluster_size")
    cluster_on = cluster is not _MISSING and cluster is not None and cluster > 0
    if cluster_on != layout.cluster_head:
        out.append(
            LayoutDifference(
                "model.cluster_size", cluster, "> 0" if layout.cluster_head else 0, layout.evidence["cluster_head"]
            )
        )
    if layout.num_residual_streams is not None:
        streams = _config_value(config, "model.num_residual_streams")
        built = MODEL_DEFAULT_RESIDUAL_STREAMS if streams is _MISSING or streams is None else streams
        if built != layout.num_residual_streams:
            out.append(
                LayoutDifference(
                    "model.num_residual_streams",
                    streams,
                    layout.num_residual_streams,
                    layout.evidence["num_residual_streams"],
                )
            )
    return out


def explain_layout_differences(layout: ModelLayout, config: Any, source: str = "checkpoint") -> str | None:
    """None when the config builds the checkpoint's layout; else one line per differing key."""
    differences = layout_differences(layout, config)
    if not differences:
        return None
    return "\n".join(
        [f"the config does not build the layout of {source}; set these keys to the checkpoint's values:"]
        + [f"  {d}" for d in differences]
    )
