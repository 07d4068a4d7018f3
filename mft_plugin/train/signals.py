"""SIGINT/SIGTERM: finish the current optimizer step, save a checkpoint, stop.

A scheduler's SIGTERM (preemption, a job's time limit) or a Ctrl-C would otherwise kill the run
wherever it is and lose everything since the last scheduled checkpoint. While training, the first
signal only sets a flag; :class:`StopOnSignal` turns it into the Trainer's own ``should_save`` and
``should_training_stop`` at the end of the step, so the checkpoint is written by the Trainer's
usual code and resuming (``resume_from_checkpoint: true``) continues from exactly that step. A second
signal gives up waiting: the previous handler runs (Ctrl-C twice raises ``KeyboardInterrupt``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; rerun with ``resume_from_checkpoint: true``."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum  # the shell's convention for "killed by this signal"
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in {checkpoint}. "
            "Run the same config with resume_from_checkpoint: true to continue from it"
        )


def _any_process(flag: bool) -> bool:
    """Whether any process of a launched run has the flag: all must stop at the same step, or they hang."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces GPU tensors only
    value = torch.tensor([float(flag)], device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


class StopOnSignal(TrainerCallback):
    """Asks the Trainer to save and stop at the end of the step during which a signal arrived."""

    def __init__(self) -> None:
        self.received: int | None = None  # the signal this process got
        self.stopped = False  # whether training was told to stop (on every process, if any got one)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if _any_process(self.received is not None):
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        """Catch SIGINT/SIGTERM for the duration (main thread only), then restore the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: SIGINT/SIGTERM will not save a checkpoint before stopping")
            yield self
            return
        # A signal ignored on purpose (SIGINT of a background job) stays ignored; None: set outside Python.
        previous = {
            signum: handler or signal.SIG_DFL
            for signum in STOP_SIGNALS
            if (handler := signal.getsignal(signum)) is not signal.SIG_IGN
        }

        def handle(signum: int, frame: FrameType | None) -> None:
            if self.received is not None:  # a second signal: stop waiting for the step to end
                signal.signal(signum, previous[signum])
                signal.raise_signal(signum)
                return
            self.received = signum
            logger.warning(
                "%s received: saving a checkpoint after this step, then stopping (send it again to stop at once)",
                signal.Signals(signum).name,
            )

        for signum in previous:
            signal.signal(signum, handle)
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
