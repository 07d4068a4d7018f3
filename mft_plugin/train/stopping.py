"""Axolotl's early-stop keys: ``loss_watchdog_threshold``/``_patience`` and ``early_stopping_patience``.

Both stop training as Axolotl's callbacks do; the final model is then chosen as always, the best
evaluated checkpoint (``load_best_model_at_end``). The degeneralization budget, the paper's own
stopping rule, is :mod:`mft_plugin.train.budget`.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import EarlyStoppingCallback, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from mft_plugin.config.schema import MFTConfigBase

logger = logging.getLogger(__name__)

WATCHDOG_PATIENCE = 3  # Axolotl's default for loss_watchdog_patience


class LossWatchdog(TrainerCallback):
    """Stop when the logged training loss is above ``threshold`` at ``patience`` logged steps in a row
    (``axolotl.utils.callbacks.LossWatchDogCallback``: a diverging run is not trained to the end).

    It watches each training log as it is written; Axolotl's reads the last log at the end of a step,
    before that step's own log, so an evaluation logged in between hides the loss from it.
    """

    def __init__(self, threshold: float, patience: int = WATCHDOG_PATIENCE) -> None:
        self.threshold = threshold
        self.patience = patience
        self.violations = 0

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        if logs is None or "loss" not in logs:
            return control
        self.violations = self.violations + 1 if logs["loss"] > self.threshold else 0
        if self.violations >= self.patience:
            logger.warning("Loss is too high, stopping training (loss_watchdog_threshold %s)", self.threshold)
            control.should_training_stop = True
        return control


def stopping_callbacks(config: MFTConfigBase) -> list[TrainerCallback]:
    """The callbacks the YAML's early-stop keys ask for (none by default)."""
    callbacks: list[TrainerCallback] = []
    if config.loss_watchdog_threshold is not None:
        callbacks.append(LossWatchdog(config.loss_watchdog_threshold, config.loss_watchdog_patience or WATCHDOG_PATIENCE))
    if config.early_stopping_patience is not None:  # on eval_spec_ppl, the metric_for_best_model
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    return callbacks
