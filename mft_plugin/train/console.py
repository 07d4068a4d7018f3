"""What a run prints: the import-time messages of libraries the run does not use are dropped.

peft imports bitsandbytes, and transformers imports DeepSpeed, whenever they are installed, whatever
the run does (we do not choose those imports). Each logs one message at import that concerns only
the runs that use it:

- DeepSpeed's "Setting accelerator to CPU ..." (it found no GPU for its engine), which matters to a
  run that trains with ``deepspeed:``;
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community ..." (its fast kernel
  for 4-bit weights on CPUs with AVX512-BF16 is not installed), which matters to a run holding
  4-bit weights (``load_in_4bit``, for the base or the teacher).

When no run of the command uses that library, exactly that record is dropped; every other message
of those libraries, and these two in runs they concern, still shows. No torch import here: the CLI
sets this up before anything heavy is imported.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mft_plugin.config.schema import MFTConfigBase

DEEPSPEED_CPU = ("DeepSpeed", "Setting accelerator to CPU")  # (logger, message start)
BNB_4BIT_KERNEL = ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward")
MESSAGES = (DEEPSPEED_CPU, BNB_4BIT_KERNEL)


class DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with ``start``."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def holds_4bit_weights(config: MFTConfigBase) -> bool:
    return config.load_in_4bit or (config.teacher is not None and config.teacher.load_in_4bit)


def unused_library_messages(configs: Sequence[MFTConfigBase]) -> list[tuple[str, str]]:
    """(logger, message start) of the import-time messages that concern none of ``configs``."""
    unused = []
    if not any(config.deepspeed for config in configs):
        unused.append(DEEPSPEED_CPU)
    if not any(holds_4bit_weights(config) for config in configs):
        unused.append(BNB_4BIT_KERNEL)
    return unused


def quiet_unused_libraries(configs: Sequence[MFTConfigBase]) -> None:
    """Drop the messages of :func:`unused_library_messages` from now on, in place of any earlier call's.

    Call it before transformers, peft or accelerate are imported: the messages come at import, once
    per process, so what counts is the command that imports them first.
    """
    for name, _ in MESSAGES:
        logger = logging.getLogger(name)
        for earlier in [f for f in logger.filters if isinstance(f, DropMessage)]:
            logger.removeFilter(earlier)
    for name, start in unused_library_messages(configs):
        logging.getLogger(name).addFilter(DropMessage(start))
