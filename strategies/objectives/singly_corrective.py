"""``singly_corrective``: distillation where the teacher is right, alpha-correction where wrong.

Paper Section 4, "Distillation & corrective distillation on incorrect tokens": MFT's DC(p^T)
with beta fixed to 0, so only the incorrect predictions are corrected (by margin ``tau``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mft_plugin.strategies.objectives._targets import CorrectionParams, alpha_weight
from mft_plugin.strategy import Objective

if TYPE_CHECKING:
    import torch

    from mft_plugin.strategy import TeacherStats


class SinglyCorrectiveObjective(Objective):
    name = "singly_corrective"
    Params = CorrectionParams

    def label_weight(self, stats: TeacherStats) -> torch.Tensor:
        return stats.where_right(if_right=0.0, if_wrong=alpha_weight(stats, self.params.tau))
