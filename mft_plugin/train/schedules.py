"""Learning-rate schedules of Axolotl's that transformers does not name (``lr_quadratic_warmup``)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_quadratic_warmup(optimizer: torch.optim.Optimizer, num_warmup_steps: int, num_training_steps: int) -> LambdaLR:
    """Axolotl's ``lr_scheduler: cosine`` with ``lr_quadratic_warmup: true`` (``utils/schedulers.py``):
    transformers' half-cosine decay to 0, after a warmup whose linear ramp is squared, (step / warmup)^2."""

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return (step / max(1, num_warmup_steps)) ** 2
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return LambdaLR(optimizer, factor)
