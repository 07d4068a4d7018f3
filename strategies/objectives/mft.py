"""``mft``: minifinetuning, the paper's full distribution correction DC(p^T) (Section 2).

    p^C = (1 - alpha) p^T + alpha 1_l   if argmax p^T != l
    p^C = (1 - beta)  p^T + beta  1_l   otherwise

    alpha = (p^T_argmax - p^T_l + tau) / (1 + p^T_argmax - p^T_l)
    beta  = (min(1, p^T_l + tau) - p^T_l) / (1 - p^T_l)

and the student trains on CE(p^C, p^S). tau = 1 is plain finetuning; the paper uses 0.25.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mft_plugin.strategies.objectives._targets import CorrectionParams, alpha_weight, beta_weight
from mft_plugin.strategy import Objective

if TYPE_CHECKING:
    import torch

    from mft_plugin.strategy import TeacherStats


class MinifinetuningObjective(Objective):
    name = "mft"
    Params = CorrectionParams

    def label_weight(self, stats: TeacherStats) -> torch.Tensor:
        tau = self.params.tau
        return stats.where_right(if_right=beta_weight(stats, tau), if_wrong=alpha_weight(stats, tau))
