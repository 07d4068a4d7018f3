"""The two correction weights of the paper's DC(p^T) (Section 2), shared by the objectives.

With d = p^T_argmax - p^T_l (0 where the teacher is right):

    alpha = (d + tau) / (1 + d)                      where argmax p^T != l
    beta  = (min(1, p^T_l + tau) - p^T_l) / (1 - p^T_l)  where argmax p^T == l

alpha moves just enough mass to the label that it beats the old argmax by tau; beta raises a
label the teacher already got right by tau (capped at 1). At tau = 1 both are exactly 1,
which makes MFT plain finetuning.
"""

from __future__ import annotations

import torch

from mft_plugin.losses import TeacherStats


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
    raised = torch.clamp(stats.p_label + tau, max=1.0) - stats.p_label
    safe_headroom = torch.where(headroom > 0, headroom, torch.ones_like(headroom))
    return torch.where(headroom > 0, raised / safe_headroom, torch.ones_like(headroom))


def where_teacher_right(
    stats: TeacherStats, if_right: torch.Tensor | float, if_wrong: torch.Tensor | float
) -> torch.Tensor:
    """Pick a per-token weight by whether the label is a maximizer of p^T (ties count as right)."""
    right = stats.teacher_right
    return torch.where(
        right,
        torch.as_tensor(if_right, dtype=stats.p_label.dtype, device=right.device),
        torch.as_tensor(if_wrong, dtype=stats.p_label.dtype, device=right.device),
    )
