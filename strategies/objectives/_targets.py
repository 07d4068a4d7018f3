"""The two correction weights of the paper's DC(p^T) (Section 2), shared by the objectives.

With d = p^T_argmax - p^T_l (0 where the teacher is right):

    alpha = (d + tau) / (1 + d)                      where argmax p^T != l
    beta  = (min(1, p^T_l + tau) - p^T_l) / (1 - p^T_l)  where argmax p^T == l

alpha moves just enough mass to the label that it beats the old argmax by tau; beta raises a
label the teacher already got right by tau (capped at 1). At tau = 1 both are exactly 1,
which makes MFT plain finetuning.

Only tensor methods are used, so importing an objective does not import torch (the registry
imports every objective to validate a YAML; see :mod:`mft_plugin.strategy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mft_plugin.strategy import StrategyParams

if TYPE_CHECKING:
    import torch

    from mft_plugin.strategy import TeacherStats


class CorrectionParams(StrategyParams):
    """The parameter of the corrective objectives (``mft``, ``singly_corrective``)."""

    tau: float = Field(0.25, ge=0.0, le=1.0, description="target margin / probability gain of the label")


def alpha_weight(stats: TeacherStats, tau: float) -> torch.Tensor:
    """alpha per token, ``[batch, seq]``; meaningful where the teacher is wrong."""
    gap = stats.p_max - stats.p_label
    return (gap + tau) / (1.0 + gap)


def beta_weight(stats: TeacherStats, tau: float) -> torch.Tensor:
    """beta per token, ``[batch, seq]``; meaningful where the teacher is right.

    At p^T_l = 1 the formula is 0/0, but then p^T is already 1_l and any beta gives the same
    target; 1 is used so that the result stays finite.
    """
    headroom = 1.0 - stats.p_label
    raised = (stats.p_label + tau).clamp(max=1.0) - stats.p_label
    saturated = headroom <= 0
    return (raised / headroom.masked_fill(saturated, 1.0)).masked_fill(saturated, 1.0)
