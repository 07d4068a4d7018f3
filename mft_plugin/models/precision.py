"""The run's precision context, outside the Trainer: the same autocast the Trainer's loss runs under.

Under ``bf16``/``fp16`` the Trainer computes the loss in accelerate's autocast (weights stay float32, unless
Axolotl's ``bfloat16``/``float16`` hold them in half precision: :func:`weight_dtype`).
Whatever else runs a model for the loss or a metric (the teacher cache's build, the base perplexities)
must run in the same context, or S, DG and p^T would carry a precision offset.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mft_plugin.config.schema import MFTConfigBase


def run_autocast(bf16: bool, fp16: bool, device_type: str) -> contextlib.AbstractContextManager[None]:
    """``torch.autocast`` as accelerate enters it for ``mixed_precision`` bf16/fp16; a no-op otherwise."""
    if not (bf16 or fp16):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if bf16 else torch.float16)


def precision_name(bf16: bool, fp16: bool) -> str:
    """The run's compute precision as cache keys record it."""
    return "bf16" if bf16 else "fp16" if fp16 else "float32"


def weight_dtype(config: MFTConfigBase) -> torch.dtype:
    """The dtype the weights are held in: float32, the master weights under mixed
    precision, unless Axolotl's ``bfloat16``/``float16`` ask for pure half-precision training."""
    return torch.bfloat16 if config.bfloat16 else torch.float16 if config.float16 else torch.float32
