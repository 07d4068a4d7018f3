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


def missing_untied_keys(model: torch.nn.Module, missing: list[str]) -> list[str]:
    """The ``missing`` state-dict keys that really are missing: not a parameter tied to one that was loaded.

    With tied embeddings (``tie_word_embeddings``) ``lm_head.weight`` *is* the input embedding, and
    transformers saves it once, under the embedding's name; a checkpoint without it loses nothing.
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(tensor) for name, tensor in tensors.items() if name not in missing}
    return [key for key in missing if key not in tensors or id(tensors[key]) not in loaded]
