"""``label_smoothed_ft``: finetuning on the label-smoothed target (1 - epsilon) 1_l + epsilon / V.

An objective outside the paper's p^C family (its target mixes in the uniform distribution, not the
teacher's), so it overrides ``token_losses`` and needs no teacher. Like the built-ins it imports
no torch at import time, so that ``mft-run`` validates a YAML before torch is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mft_plugin.strategy import Objective, StrategyParams

if TYPE_CHECKING:
    import torch


class LabelSmoothedFinetuningParams(StrategyParams):
    epsilon: float = Field(0.1, ge=0.0, lt=1.0, description="probability mass spread evenly over the vocabulary")


class LabelSmoothedFinetuningObjective(Objective):
    name = "label_smoothed_ft"
    Params = LabelSmoothedFinetuningParams
    needs_teacher = False

    def token_losses(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor
    ) -> torch.Tensor:
        """(1 - epsilon) NLL_l + epsilon CE(uniform, p^S) per token, ``[batch, seq]``; 0 at ignored labels."""
        from mft_plugin.loss import corrected as losses

        uniform_ce = -losses.upcast(student_logits).log_softmax(dim=-1).mean(dim=-1)  # [batch, seq]
        epsilon = self.params.epsilon
        nll = losses.nll_token_losses(student_logits, labels)
        return (1.0 - epsilon) * nll + epsilon * uniform_ce * losses.valid_mask(labels)
