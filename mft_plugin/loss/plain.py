"""The plain loss path: per-token losses from the student's ``[batch, seq, vocab]`` logits.

The reference the fused path (:mod:`mft_plugin.loss.chunked`) is tested against, and the path of
models or objectives it cannot serve. Rows flagged in the batch's routing
(:class:`mft_plugin.data.batches.RowRouting`) train on plain NLL whatever the objective; the
teacher then runs on the other rows only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mft_plugin.data.batches import RowRouting
from mft_plugin.loss.corrected import nll_token_losses
from mft_plugin.strategy import Objective
from mft_plugin.teacher.sources import Teacher


def plain_token_losses(
    objective: Objective,
    teacher: Teacher | None,
    student_logits: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
) -> torch.Tensor:
    """Per-token losses ``[batch, seq]``: the objective's, and plain NLL on the routed FT rows.

    ``student_logits``: ``[batch, seq, vocab]``; ``batch``: the collated batch (model inputs and
    routing columns); ``labels``: ``[batch, seq]`` already shifted.
    """
    ft_rows = RowRouting.of(batch).ft_rows
    if ft_rows is None:
        teacher_logits = teacher.logits(batch) if teacher is not None else None
        return objective.token_losses(student_logits, teacher_logits, labels)
    losses = nll_token_losses(student_logits, labels)
    rows = ~ft_rows
    if rows.any():  # a composed batch holds the same number on every rank, so all ranks run the teacher
        teacher_logits = teacher.logits(batch, rows) if teacher is not None else None
        losses[rows] = objective.token_losses(student_logits[rows], teacher_logits, labels[rows])
    return losses
