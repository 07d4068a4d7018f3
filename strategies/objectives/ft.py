"""``ft``: plain finetuning, cross-entropy on the labels (the paper's FT baseline; MFT at tau = 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mft_plugin.strategy import Objective

if TYPE_CHECKING:
    import torch

    from mft_plugin.strategy import TeacherStats


class FinetuningObjective(Objective):
    """Target 1_l at every token: w = 1. Needs no teacher, so none is loaded."""

    name = "ft"
    needs_teacher = False

    def label_weight(self, stats: TeacherStats) -> torch.Tensor:
        return stats.p_label.new_ones(stats.p_label.shape)
