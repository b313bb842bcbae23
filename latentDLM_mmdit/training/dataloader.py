"""The data side of the loop: the dataset a run trains on, the deterministic, resumable sample
order every rank shares (`BatchOrder`), and the DataLoader that reads this rank's batches in that
order (`BatchFeed`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from omegaconf import DictConfig

from latentDLM_mmdit.data import DataError, SyntheticDataset, UpstreamLatentDataset, collate
from latentDLM_mmdit.draws import make_generator
from latentDLM_mmdit.factory import build_text_side
from latentDLM_mmdit.training.loop_settings import LoopSettings, TrainingError

# Streams derived from training.seed, kept apart from the trainer generator (seed + rank).
DATA_ORDER_SEED_OFFSET = 1_000_003
SYNTHETIC_DATA_SEED_OFFSET = 2_000_003
LOADER_SEED_OFFSET = 3_000_017  # + rank: the DataLoader's generator (its workers' base seed)


def build_dataset(config: DictConfig, settings: LoopSettings, *, synthetic: bool, token_dir, latent_dir):
    """(the dataset a run trains on, a description for the log): seeded synthetic samples, or
    upstream-format token and latent folders (the arguments, else data.token_dir / data.latent_dir)."""
    vocab, _ = build_text_side(config)
    max_seq_len = int(config.model.max_seq_len)
    latent_dim = int(config.model.latent_dim)
    if synthetic:
        if token_dir is not None or latent_dir is not None:
            raise TrainingError("pass either synthetic data or token/latent directories, not both")
        if settings.synthetic_seq_len > max_seq_len:
            raise TrainingError(
                f"data.synthetic_seq_len={settings.synthetic_seq_len} exceeds model.max_seq_len={max_seq_len}"
            )
        return SyntheticDataset(
            vocab,
            settings.synthetic_num_samples,
            settings.synthetic_seq_len,
            latent_dim,
            settings.seed + SYNTHETIC_DATA_SEED_OFFSET,
        ), "synthetic"
    token_dir = token_dir if token_dir is not None else (settings.token_dir or None)
    latent_dir = latent_dir if latent_dir is not None else (settings.latent_dir or None)
    if token_dir is None or latent_dir is None:
        raise TrainingError(
            "no training data: pass --synthetic, or --data-tokens DIR and --data-latents DIR "
            "(or set data.token_dir and data.latent_dir)"
        )
    dataset = UpstreamLatentDataset(token_dir, latent_dir, max_seq_len, vocab)
    if dataset.latent_dim != latent_dim:
        raise TrainingError(
            f"latents in {latent_dir} have width {dataset.latent_dim}, model.latent_dim is {latent_dim}"
        )
    return dataset, f"{token_dir} + {latent_dir} ({len(dataset)} samples)"


class BatchOrder:
    """Deterministic, resumable sample order shared by every rank.

    Each epoch is one permutation drawn from its own generator; the epoch is cut into global
    batches of `batch_size * world_size` (the remainder is dropped) and rank r takes the r-th
    slice of `batch_size` of each global batch.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int, seed: int):
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise TrainingError(
                f"the data has {num_samples} sample(s), fewer than one global batch of "
                f"{batch_size} x {world_size} process(es) = {global_batch}"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.world_size, self.rank = world_size, rank
        self.batches_per_epoch = num_samples // global_batch
        self.generator = make_generator(seed)
        self.epoch, self.position = 0, 0
        self.permutation: torch.Tensor | None = None

    def next_indices(self) -> list[int]:
        if self.permutation is None or self.position >= self.batches_per_epoch:
            if self.permutation is not None:
                self.epoch += 1
            self.permutation = torch.randperm(self.num_samples, generator=self.generator)
            self.position = 0
        start = self.position * self.batch_size * self.world_size + self.rank * self.batch_size
        self.position += 1
        return self.permutation[start : start + self.batch_size].tolist()

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "position": self.position,
            "permutation": self.permutation,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("num_samples", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise TrainingError(
                    f"cannot resume the data order: the checkpoint has {key}={state[key]}, "
                    f"this run {getattr(self, key)} (resume with the same data, "
                    "training.train_batch_size and number of processes)"
                )
        self.generator.set_state(state["generator"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.permutation = state["permutation"]

    def copy(self) -> BatchOrder:
        """An independent order at the same position (drawing from it leaves this one where it is)."""
        twin = BatchOrder(self.num_samples, self.batch_size, self.world_size, self.rank, seed=0)
        twin.load_state_dict(self.state_dict())
        return twin


class _OrderSampler(torch.utils.data.Sampler):
    """The DataLoader's sampler: the batches of a copy of `order` from its current position, endless."""

    def __init__(self, order: BatchOrder):
        self.order = order

    def __iter__(self) -> Iterator[list[int]]:
        twin = self.order.copy()
        while True:
            yield twin.next_indices()


@dataclass(frozen=True)
class _ReadFailure:
    """A DataError raised while a worker read a batch, carried to the training process as a value
    (the DataLoader would re-raise it with the worker's traceback inside the message)."""

    message: str


class _BatchReads(torch.utils.data.Dataset):
    """Index list -> the collated batch (`collate`) plus its `indices` [B]; a DataError becomes a _ReadFailure."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor] | _ReadFailure:
        try:
            batch = collate([self.dataset[i] for i in indices])
        except DataError as exc:
            return _ReadFailure(str(exc))
        return {**batch, "indices": torch.tensor(indices, dtype=torch.int64)}


def _as_read(batch: Any) -> Any:
    return batch


class BatchFeed:
    """This rank's batches in `order`, read by a `torch.utils.data.DataLoader`.

    The loader's sampler draws from a copy of `order`, so its workers may read ahead; `order` itself
    moves one batch per `next_batch()`, and its state is the position of the batches consumed:
    saving `order.state_dict()` and resuming from it continues with exactly the next batch, whatever
    the number of workers. Every batch's indices are checked against `order`.

    Args:
        dataset: map-style dataset of samples (`collate` stacks them).
        order: the rank's BatchOrder (moved by this feed).
        num_workers: reader processes (0: read in this process).
        device: batches are moved there; on CUDA they are read into pinned memory and copied
            asynchronously.
        seed: seeds the generator the DataLoader draws its workers' base seed from (never the global RNG).
    """

    def __init__(
        self, dataset: torch.utils.data.Dataset, order: BatchOrder, *, num_workers: int, device: torch.device, seed: int
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset, self.order, self.num_workers, self.device = dataset, order, num_workers, device
        self.seed = seed
        self._batches: Iterator[Any] | None = None

    def _start(self) -> Iterator[Any]:
        loader = torch.utils.data.DataLoader(
            _BatchReads(self.dataset),
            batch_size=None,
            sampler=_OrderSampler(self.order),
            num_workers=self.num_workers,
            collate_fn=_as_read,
            pin_memory=self.device.type == "cuda",
            generator=make_generator(self.seed),
        )
        return iter(loader)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch on the device: input_ids [B,S], attention_mask [B,S], latent [B,1,D]."""
        if self._batches is None:
            self._batches = self._start()
        read = next(self._batches)
        if isinstance(read, _ReadFailure):
            raise DataError(read.message)
        expected = self.order.next_indices()
        if read["indices"].tolist() != expected:
            raise RuntimeError(
                f"the data loader delivered samples {read['indices'].tolist()}, the data order "
                f"expects {expected} (a defect of BatchFeed)"
            )
        non_blocking = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=non_blocking) for k, v in read.items() if k != "indices"}

    def close(self) -> None:
        """Stops the reader processes (a later next_batch starts new ones at the current position)."""
        self._batches = None
