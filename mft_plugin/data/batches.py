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

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from mft_plugin.data.labels import IGNORE_INDEX

LABELS = "labels"
REPLAY_COLUMN = "is_replay"
FT_LOSS_COLUMN = "ft_loss"
ROW_COLUMN = "teacher_row"
TOKEN_COLUMN = "teacher_token"
ROUTING_COLUMNS: dict[str, str] = {  # column -> what it tells the loss (int per row)
    REPLAY_COLUMN: "1: a general-domain row a data-stage mitigation mixed in; the training set is then "
    "composed micro-batch by micro-batch and shuffled in whole micro-batches (MicroBatchSampler)",
    FT_LOSS_COLUMN: "1: the row trains on the plain FT loss whatever the objective (w = 1; e.g. replayed "
    "pre-training text, which is no correction of the teacher); the teacher runs on the other rows only",
    ROW_COLUMN: "the row's index in the teacher cache (mft_plugin.teacher.cache), added with the cache",
    TOKEN_COLUMN: "per token: where the token is in the teacher cache (mft_plugin.teacher.stored.token_indices), for "
    "rows that are concatenations of cached rows (Axolotl's multipack); padding reads no cached token",
}


POSITIONS = "position_ids"


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments of a model forward: every key of ``batch`` but the labels and the
    routing columns. Student, teacher and evaluation all call the model with exactly these.

    A packed batch (``position_ids`` and no ``attention_mask``, :class:`PaddingCollator`) also runs
    with ``use_cache=False``: transformers (``masking_utils``) turns restarting position ids into a
    block-diagonal mask only when neither an attention mask nor a KV cache is given, and a model whose
    config says ``use_cache: true`` would otherwise make a cache and let records attend to each other.
    """
    inputs: dict[str, Any] = {key: value for key, value in batch.items() if key != LABELS and key not in ROUTING_COLUMNS}
    if POSITIONS in inputs and "attention_mask" not in inputs:
        inputs["use_cache"] = False
    return inputs


@dataclass(frozen=True)
class RowRouting:
    """The routing columns of one batch, typed: what the loss reads besides the model inputs."""

    ft_rows: torch.Tensor | None  # [batch] bool, or None when no row takes the plain FT loss
    cache_rows: torch.Tensor | None  # [batch] long: rows of the teacher cache, or None
    cache_tokens: torch.Tensor | None = None  # [batch, seq] long: tokens of the teacher cache (packed rows), or None

    @classmethod
    def of(cls, batch: Mapping[str, torch.Tensor]) -> RowRouting:
        ft = batch.get(FT_LOSS_COLUMN)
        ft_rows = ft.bool() if ft is not None and bool(ft.any()) else None
        return cls(ft_rows=ft_rows, cache_rows=batch.get(ROW_COLUMN), cache_tokens=batch.get(TOKEN_COLUMN))


@dataclass(frozen=True)
class PaddingCollator:
    """Pads rows to the longest in the batch (or to ``pad_to``, ``pad_to_sequence_len``); padding is
    never a label.

    A row's ``labels`` (unshifted, Hugging Face convention; the trainer shifts them) default to its
    input ids. Rows with ``position_ids`` are packed records (``mft_plugin.data.packing``): their batch
    carries ``position_ids`` and no ``attention_mask`` (see :func:`model_inputs`), and each row's
    padding is one more block with positions restarting at 0, which nothing else attends to. Other
    integer columns (e.g. a replay flag) are passed through as tensors.
    """

    pad_token_id: int
    pad_to: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max([len(f["input_ids"]) for f in features] + [self.pad_to or 0])
        packed = any(f.get(POSITIONS) is not None for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        positions = torch.arange(width).repeat(len(features), 1) - lengths[:, None]  # padding: 0, 1, ...
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(feature.get(LABELS) or feature["input_ids"], dtype=torch.long)
            given = feature.get(POSITIONS)
            positions[row, :n] = torch.as_tensor(given, dtype=torch.long) if given is not None else torch.arange(n)
        batch = {"input_ids": input_ids, LABELS: labels}
        if packed:
            batch[POSITIONS] = positions
        else:
            batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        for key in features[0].keys() - {"input_ids", LABELS, POSITIONS}:
            batch[key] = torch.as_tensor([f[key] for f in features])
        return batch


class MicroBatchSampler(Sampler[int]):
    """Row indices in whole micro-batches (consecutive ``micro_batch_size`` rows), a new order each epoch.

    Without ``compose``, the rows are laid out as micro-batches already and the micro-batches are
    shuffled. With it, ``compose(epoch)`` gives the epoch's row order (whole micro-batches, e.g. a
    replay mitigation's fresh draw of general rows, ``Mitigation.epoch_order``), and the dataset may
    hold more rows than one epoch uses.
    """

    def __init__(
        self, num_rows: int, micro_batch_size: int, seed: int, compose: Callable[[int], list[int]] | None = None
    ) -> None:
        rows = len(compose(0)) if compose is not None else num_rows
        if rows % micro_batch_size:
            raise ValueError(
                f"a composed training set has {rows} rows per epoch, not a multiple of micro_batch_size {micro_batch_size}"
            )
        self.micro_batch_size = micro_batch_size
        self.num_batches = rows // micro_batch_size
        self.seed = seed
        self.compose = compose
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at each epoch: the order is a function of (seed, epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.compose is not None:
            yield from self.compose(self.epoch)
            return
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        for batch in torch.randperm(self.num_batches, generator=generator).tolist():
            yield from range(batch * self.micro_batch_size, (batch + 1) * self.micro_batch_size)

    def __len__(self) -> int:
        return self.num_batches * self.micro_batch_size
