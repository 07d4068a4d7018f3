"""Never train on garbage: a non-finite loss or gradient stops the run, or (if asked) skips the step.

The Trainer on its own hides a NaN loss from the logs (``logging_nan_inf_filter``) and lets the
optimizer apply NaN gradients, after which every weight is NaN and the rest of the run is wasted.
:class:`NonFiniteGuard` checks each micro-batch's loss and each step's gradient norm. By default it
raises :class:`NonFiniteError` naming the step and, when the objective produced the NaN, the token
positions; with ``skip_nonfinite_batches: true`` it drops that optimizer step's gradients instead
(the optimizer then leaves every weight as it was) and counts the skipped steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)
SKIPPED_KEY = "nonfinite_skipped_steps"
SHOWN_POSITIONS = 8


class NonFiniteError(FloatingPointError):
    """A NaN or infinite loss or gradient, with where it came from."""


def nonfinite_positions(token_losses: torch.Tensor) -> list[tuple[int, int]]:
    """``(batch row, token position)`` of every non-finite entry of ``token_losses`` ``[batch, seq]``."""
    return [tuple(index) for index in (~torch.isfinite(token_losses)).nonzero().tolist()]  # type: ignore[misc]


def describe_nonfinite_loss(objective: str, token_losses: torch.Tensor, penalties: Mapping[str, torch.Tensor]) -> str:
    """Where a non-finite loss comes from: the objective's token positions, or the mitigations' penalties.

    A position is that of the predicting token in the block (position t predicts token t + 1).
    """
    positions = nonfinite_positions(token_losses.detach())
    sources = []
    if positions:
        shown = ", ".join(map(str, positions[:SHOWN_POSITIONS])) + (", ..." if len(positions) > SHOWN_POSITIONS else "")
        sources.append(
            f"objective {objective!r} gave a non-finite loss at {len(positions)} token position(s) "
            f"(batch row, position): {shown}"
        )
    sources += [
        f"mitigation {name!r} gave a non-finite penalty ({value.item()})"
        for name, value in penalties.items()
        if not torch.isfinite(value.detach()).all()
    ]
    return "; ".join(sources) or "the sum of finite terms overflowed"


class NonFiniteGuard:
    """Checks of one run: :meth:`check_loss` per micro-batch, :meth:`check_gradients` per optimizer step."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self._pending: str | None = None  # why the current optimizer step is to be skipped

    def check_loss(
        self,
        step: int,
        loss: torch.Tensor,
        objective: str,
        token_losses: torch.Tensor,
        penalties: Mapping[str, torch.Tensor],
    ) -> None:
        """Raise (or, when skipping, remember) a non-finite ``loss`` of optimizer step ``step`` (1-based)."""
        if bool(torch.isfinite(loss.detach()).all()):
            return
        source = describe_nonfinite_loss(objective, token_losses, penalties)
        where = f"non-finite loss ({loss.item()}) at step {step}: {source}"
        if not self.skip:
            raise NonFiniteError(f"{where}. Set skip_nonfinite_batches: true to skip such steps instead of stopping")
        self._pending = self._pending or where

    def check_gradients(self, step: int, grad_norm: Any, scaled: bool) -> str | None:
        """Why step ``step``'s gradients must be dropped (None: apply them); raises when not skipping.

        ``scaled``: an fp16 gradient scaler owns overflow (it skips the step and lowers its scale), so an
        infinite norm is its business there, while a non-finite *loss* still counts.
        """
        reason, self._pending = self._pending, None
        norm = float(grad_norm) if grad_norm is not None else 0.0
        if reason is None and not scaled and not math.isfinite(norm):
            reason = f"non-finite gradient norm ({norm}) at step {step} although the loss was finite"
            if not self.skip:
                raise NonFiniteError(
                    f"{reason}. Lower learning_rate, keep max_grad_norm > 0, or set skip_nonfinite_batches: true"
                )
        if reason is not None:
            logger.warning("skipping optimizer step: %s", reason)
        return reason


def skipped_steps(log_history: list[dict[str, Any]]) -> int:
    """How many optimizer steps were skipped (one log entry each; the log survives a resume)."""
    return sum(1 for entry in log_history if SKIPPED_KEY in entry)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP2 parameter (a DTensor); the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def check_finite_weights(model: torch.nn.Module) -> None:
    """Raise :class:`NonFiniteError` naming the trained parameters that hold NaN/inf at the end of a run.

    Skipped steps keep the weights as they were, but a step can still write non-finite weights from
    finite gradients (an infinite learning rate, an overflow in the optimizer): such a model must
    never be saved as the run's result.
    """
    broken = [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and not bool(torch.isfinite(_local(parameter.detach())).all())
    ]
    if broken:
        shown = ", ".join(broken[:SHOWN_POSITIONS]) + (", ..." if len(broken) > SHOWN_POSITIONS else "")
        raise NonFiniteError(
            f"training ended with non-finite weights in {len(broken)} parameter(s): {shown}; the model was not "
            "saved. Lower learning_rate, or check the skipped steps (skip_nonfinite_batches)"
        )
