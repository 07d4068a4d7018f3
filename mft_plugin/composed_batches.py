"""Training sets composed micro-batch by micro-batch, and the per-row choice of loss.

Replay (paper Sec. 3.1, "Baselines": half of every batch is general-domain data) needs the
proportion in *every* batch, not on average. A data-stage mitigation that mixes in rows of
another kind marks them in :data:`REPLAY_COLUMN` and lays its rows out so that each consecutive
``micro_batch_size`` rows are one micro-batch of the intended composition. The Trainer's usual
row-level shuffle would undo that, so :class:`MicroBatchSampler` shuffles whole micro-batches
(seeded, a new order each epoch). Under several processes accelerate gives each rank whole
batches of the sampler (rank r takes batches r, r + N, ...; a short last round repeats whole
batches from the start), so each rank's micro-batch keeps the composition; with gradient
accumulation every accumulated micro-batch does too.

Rows flagged in :data:`FT_LOSS_COLUMN` train on the plain finetuning loss whatever the objective
(replayed pre-training text is not a correction of the teacher); the teacher then runs only on
the other rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from mft_plugin.losses import nll_token_losses
from mft_plugin.strategy import Objective
from mft_plugin.teacher import Teacher

REPLAY_COLUMN = "is_replay"  # 1: a general-domain row a data-stage mitigation mixed in
FT_LOSS_COLUMN = "ft_loss"  # 1: a row that trains on the plain FT loss whatever the objective


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


def row_token_losses(
    objective: Objective,
    teacher: Teacher | None,
    student_logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    ft_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token losses ``[batch, seq]``: the objective's, and plain NLL on the ``ft_rows``.

    ``student_logits``: ``[batch, seq, vocab]``; ``labels``: ``[batch, seq]`` already shifted;
    ``ft_rows``: ``[batch]`` (nonzero = plain FT loss) or None. The teacher sees only the rows
    that use the objective.
    """
    if ft_rows is None or not ft_rows.any():
        teacher_logits = teacher.logits(input_ids, attention_mask) if teacher is not None else None
        return objective.token_losses(student_logits, teacher_logits, labels)
    losses = nll_token_losses(student_logits, labels)
    rows = ft_rows == 0
    if rows.any():  # a composed batch holds the same number on every rank, so all ranks run the teacher
        mask = attention_mask[rows] if attention_mask is not None else None
        teacher_logits = teacher.logits(input_ids[rows], mask) if teacher is not None else None
        losses[rows] = objective.token_losses(student_logits[rows], teacher_logits, labels[rows])
    return losses
