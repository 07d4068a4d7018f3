"""The forms a loaded model can take, as the teacher, the trainer and the evaluation ask about them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then back to whatever mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def is_quantized(model: torch.nn.Module) -> bool:
    """Loaded in 4 or 8 bits by bitsandbytes: placed at load time, and never sharded."""
    return getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)


def has_adapters(model: torch.nn.Module) -> bool:
    """A peft model whose adapters can be disabled to recover the base."""
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")
