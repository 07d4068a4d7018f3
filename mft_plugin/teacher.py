"""The teacher: the unfinetuned model whose predictions p^T anchor the student (paper Sec. 2).

Two ways to hold it, chosen by the core from the student's form, never by the objective:

- with an adapter (peft) the teacher *is* the student's base: the forward runs under
  ``disable_adapter()``, so no second copy of the (possibly quantized) weights exists;
- for full finetuning it is a frozen copy loaded once from the same checkpoint.

Either way the teacher runs in eval mode (no dropout) with no autograd graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from transformers import PreTrainedModel


class Teacher(Protocol):
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Teacher logits ``[batch, seq, vocab]`` for the same inputs the student sees."""


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then back to whatever mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class FrozenCopyTeacher:
    """A separately loaded, frozen copy of the base model (full finetuning)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval().requires_grad_(False)

    def to(self, device: torch.device | str) -> FrozenCopyTeacher:
        if not getattr(self.model, "is_loaded_in_4bit", False) and not getattr(self.model, "is_loaded_in_8bit", False):
            self.model.to(device)
        return self

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class SharedBaseTeacher:
    """The student's own base with its adapters switched off: no second copy of the weights."""

    def __init__(self, peft_model: torch.nn.Module) -> None:
        self.model = peft_model

    def to(self, device: torch.device | str) -> SharedBaseTeacher:
        return self  # it lives wherever the student lives

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        with eval_mode(self.model), self.model.disable_adapter():
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def has_adapters(model: torch.nn.Module) -> bool:
    """A peft model whose adapters can be disabled to recover the base."""
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


def build_teacher(
    needs_teacher: bool, student: torch.nn.Module, load_frozen_copy: Callable[[], PreTrainedModel]
) -> FrozenCopyTeacher | SharedBaseTeacher | None:
    """The cheapest teacher that gives the base model's exact predictions, or None if not needed."""
    if not needs_teacher:
        return None
    if has_adapters(student):
        return SharedBaseTeacher(student)
    return FrozenCopyTeacher(load_frozen_copy())
