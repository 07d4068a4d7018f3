"""``distill_ft``: distillation where the teacher is right, finetuning where it is wrong.

Paper Section 4, "Distillation & corrective finetuning on incorrect tokens": the target is p^T
where argmax p^T = l and the one-hot label 1_l elsewhere, i.e. w = 0 or 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mft_plugin.strategy import Objective

if TYPE_CHECKING:
    import torch

    from mft_plugin.strategy import TeacherStats


class DistillFinetuningObjective(Objective):
    name = "distill_ft"

    def label_weight(self, stats: TeacherStats) -> torch.Tensor:
        return stats.where_right(if_right=0.0, if_wrong=1.0)
