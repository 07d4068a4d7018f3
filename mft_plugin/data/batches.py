"""Batches as the model and the loss see them: the collator, the model inputs, and the declared
per-row routing columns.

A data-stage mitigation may add columns to the training set that are *not* model inputs but tell
the loss how to treat a row. They are declared here, once, in :data:`ROUTING_COLUMNS`; every other
key a batch carries (``input_ids``, ``attention_mask``, ``position_ids`` of packed rows, ...) except
``labels`` is a model input, and :func:`model_inputs` is the one place that decides it, for the
student, the teacher and the evaluation alike.

Replay (paper Sec. 3.1, "Baselines": half of every batch is general-domain data) needs the
proportion in *every* batch, not on average. A mitigation that mixes in rows of another kind marks
them in :data:`REPLAY_COLUMN` and lays its rows out so that each consecutive ``micro_batch_size``
rows are one micro-batch of the intended composition. The Trainer's usual row-level shuffle would
undo that, so :class:`MicroBatchSampler` shuffles whole micro-batches (seeded, a new order each
epoch). Under several processes accelerate gives each rank whole batches of the sampler (rank r
takes batches r, r + N, ...; a short last round repeats whole batches from the start), so each
rank's micro-batch keeps the composition; with gradient accumulation every accumulated micro-batch
does too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from mft_plugin.data.labels import IGNORE_INDEX

LABELS = "labels"
REPLAY_COLUMN = "is_replay"
FT_LOSS_COLUMN = "ft_loss"
ROW_COLUMN = "teacher_row"
ROUTING_COLUMNS: dict[str, str] = {  # column -> what it tells the loss (int per row)
    REPLAY_COLUMN: "1: a general-domain row a data-stage mitigation mixed in; the training set is then "
    "composed micro-batch by micro-batch and shuffled in whole micro-batches (MicroBatchSampler)",
    FT_LOSS_COLUMN: "1: the row trains on the plain FT loss whatever the objective (w = 1; e.g. replayed "
    "pre-training text, which is no correction of the teacher); the teacher runs on the other rows only",
    ROW_COLUMN: "the row's index in the teacher cache (mft_plugin.teacher.cache), added with the cache",
}


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of a model forward: every key of ``batch`` but the labels and the
    routing columns. Student, teacher and evaluation all call the model with exactly these."""
    return {key: value for key, value in batch.items() if key != LABELS and key not in ROUTING_COLUMNS}


@dataclass(frozen=True)
class RowRouting:
    """The routing columns of one batch, typed: what the loss reads besides the model inputs."""

    ft_rows: torch.Tensor | None  # [batch] bool, or None when no row takes the plain FT loss
    cache_rows: torch.Tensor | None  # [batch] long: rows of the teacher cache, or None

    @classmethod
    def of(cls, batch: Mapping[str, torch.Tensor]) -> RowRouting:
        ft = batch.get(FT_LOSS_COLUMN)
        ft_rows = ft.bool() if ft is not None and bool(ft.any()) else None
        return cls(ft_rows=ft_rows, cache_rows=batch.get(ROW_COLUMN))


@dataclass(frozen=True)
class PaddingCollator:
    """Pads blocks to the longest in the batch; padding is masked and never a label.

    ``labels`` are the input ids, unshifted (Hugging Face convention); the trainer shifts them.
    Integer columns other than ``input_ids`` (e.g. a replay flag) are passed through as tensors.
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX),
        }
        for key in features[0].keys() - {"input_ids"}:
            batch[key] = torch.as_tensor([f[key] for f in features])
        return batch


class MicroBatchSampler(Sampler[int]):
    """Row indices with whole micro-batches (consecutive ``micro_batch_size`` rows) shuffled."""

    def __init__(self, num_rows: int, micro_batch_size: int, seed: int) -> None:
        if num_rows % micro_batch_size:
            raise ValueError(
                f"a composed training set has {num_rows} rows, not a multiple of micro_batch_size {micro_batch_size}"
            )
        self.micro_batch_size = micro_batch_size
        self.num_batches = num_rows // micro_batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at each epoch: the order is a function of (seed, epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        for batch in torch.randperm(self.num_batches, generator=generator).tolist():
            yield from range(batch * self.micro_batch_size, (batch + 1) * self.micro_batch_size)

    def __len__(self) -> int:
        return self.num_batches * self.micro_batch_size
