"""The degeneralization budget: when to stop, and which evaluations may become the final model.

The paper (Sec. 2, after Algorithm 1) trains "until achieving the desired level of specialization or
exceeding the maximum level of degeneralization permitted". ``max_degeneralization`` (a fraction:
0.01 is 1 %) stops training at the first evaluation whose DG is past it, and an evaluation past it is
never chosen as the final checkpoint, even with a lower specialized perplexity: the run keeps the
best checkpoint *within* the budget. ``target_specialization`` stops at the first evaluation whose S
reaches it.

The stop is a ``TrainerCallback`` (like transformers' ``EarlyStoppingCallback``); the choice is
:meth:`Budget.admits`, which ``MFTTrainer`` consults before the Trainer records a new best metric,
and which the recipe uses to say in ``metrics.json`` why training stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from mft_plugin.config.schema import MFTConfigBase

logger = logging.getLogger(__name__)
MAX_DEGENERALIZATION, TARGET_SPECIALIZATION = "max_degeneralization", "target_specialization"


@dataclass(frozen=True)
class Budget:
    """Limits on an evaluation's DG and S (fractions, as logged); ``None`` means no limit."""

    max_degeneralization: float | None = None
    target_specialization: float | None = None

    @classmethod
    def from_config(cls, config: MFTConfigBase) -> Budget:
        return cls(config.max_degeneralization, config.target_specialization)

    @property
    def active(self) -> bool:
        return self.max_degeneralization is not None or self.target_specialization is not None

    def admits(self, metrics: Mapping[str, Any], prefix: str = "eval") -> bool:
        """Whether this evaluation is within the DG budget (a candidate for the final checkpoint)."""
        if self.max_degeneralization is None:
            return True
        return metrics[f"{prefix}_DG"] <= self.max_degeneralization

    def stop_reason(self, metrics: Mapping[str, Any], prefix: str = "eval") -> str | None:
        """The config key that ends training at this evaluation, or None to go on."""
        if not self.admits(metrics, prefix):
            return MAX_DEGENERALIZATION
        target = self.target_specialization
        if target is not None and metrics[f"{prefix}_S"] >= target:
            return TARGET_SPECIALIZATION
        return None


class BudgetStop(TrainerCallback):
    """Stops training at the first evaluation past the DG budget or at the S target.

    Every process computes the same (gathered) metrics, so all of a launched run stop at one step.
    """

    def __init__(self, budget: Budget) -> None:
        self.budget = budget

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        reason = self.budget.stop_reason(metrics) if metrics else None
        if reason is not None:
            measured = f"DG {metrics['eval_DG']:.4g} >" if reason == MAX_DEGENERALIZATION else f"S {metrics['eval_S']:.4g} >="
            logger.warning("step %d: %s %s %s: stopping training", state.global_step, measured, reason, getattr(self.budget, reason))
            control.should_training_stop = True
        return control
