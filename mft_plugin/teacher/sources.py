"""Where p^T comes from online: the unfinetuned model whose predictions anchor the student (paper Sec. 2).

Two ways to hold it, chosen by the core from the student's form, never by the objective:

- with an adapter (peft) the teacher *is* the student's base: the forward runs under
  ``disable_adapter()``, so no second copy of the (possibly quantized) weights exists;
- for full finetuning it is a frozen copy loaded once from the same checkpoint.

Either way the teacher runs in eval mode (no dropout) with no autograd graph, on exactly the model
inputs the student sees (:func:`mft_plugin.data.batches.model_inputs`). The third source, outputs
read from disk, is :mod:`mft_plugin.teacher.cache`; all three implement :class:`Teacher`. How a
frozen copy is placed under a sharding engine is the engine's business (:mod:`mft_plugin.train.engine`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel

from mft_plugin.data.batches import model_inputs
from mft_plugin.models.forms import eval_mode, has_adapters, is_quantized
from mft_plugin.models.heads import LogitTransform, forward_hidden, output_head
from mft_plugin.teacher.views import TeacherHead, TeacherView

Batch = Mapping[str, torch.Tensor]


class Teacher(Protocol):
    """The one interface of every teacher source. ``batch`` is the collated batch (model inputs and
    routing columns); ``rows`` ``[batch]`` bool picks the rows the teacher runs on (None: all)."""

    def targets(self, batch: Batch, rows: torch.Tensor | None = None) -> TeacherView:
        """p^T of every token of the batch, chunk by chunk, for the fused loss
        (:mod:`mft_plugin.loss.chunked`); rows not picked get a uniform p^T (the loss weighs them 0)."""

    def logits(self, batch: Batch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits ``[rows, seq, vocab]`` of the picked rows, for the plain loss path."""

    def to(self, device: torch.device | str) -> Teacher:
        """The teacher on ``device`` (where the student's batches arrive)."""


def _picked(batch: Batch, rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
    inputs = model_inputs(batch)
    if rows is None:
        return inputs
    return {key: value[rows] if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}  # use_cache


@torch.no_grad()
def teacher_head(
    model: torch.nn.Module, batch: Batch, rows: torch.Tensor | None = None, copy_head: bool = False
) -> TeacherHead:
    """A teacher model's final hidden states ``[N, H]`` and head (its logits never made), in the dtype of
    the head's matmul in this forward (autocast's under mixed precision), as the hidden-state cache stores them.

    Rows not in ``rows`` get zero hidden states, i.e. a p^T from the bias alone, which the loss weighs
    by 1 - w = 0 (they train on plain NLL). The head's weight is the one its forward saw; ``copy_head``:
    a copy of it, where the engine frees the gathered weight after the head's forward (FSDP2, ZeRO-3)
    while the fused loss reads it later, in the student's head forward.
    """
    head, transform = output_head(model), LogitTransform.of(model)
    shape = (*batch["input_ids"].shape, head.in_features)
    if rows is not None and not rows.any():  # every row trains on plain NLL: p^T is never read
        return frozen_head_view(head.weight.new_zeros(shape).flatten(0, -2), head.weight, head.bias, transform)
    captured = forward_hidden(model, head, batch if rows is None else _picked(batch, rows), copy_head)
    hidden = captured.hidden if rows is None else captured.hidden.new_zeros(shape).index_put_((rows,), captured.hidden)
    return frozen_head_view(hidden.flatten(0, -2).to(captured.compute_dtype), captured.weight, captured.bias, transform)


def frozen_head_view(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transform: LogitTransform
) -> TeacherHead:
    """The teacher view of hidden states ``[N, H]`` through a head's ``weight`` ``[V, H]`` and ``bias``
    ``[V]`` (cast to the hidden states' dtype) and the model's ``transform`` after it."""
    bias = None if bias is None else bias.detach().to(hidden.dtype)
    return TeacherHead(hidden, weight.detach().to(hidden.dtype), bias, transform)


class _ModelTeacher:
    """A teacher that is a model run under a context of its own (:meth:`_forwarding`): the forwards
    of both model teachers, written once. ``copies_head``: its view keeps a copy of the head's weight,
    set by the engine where that weight is gathered only for the head's forward (FSDP2, ZeRO-3)."""

    model: torch.nn.Module
    copies_head: bool = False

    def _forwarding(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    @torch.no_grad()
    def logits(self, batch: Batch, rows: torch.Tensor | None = None) -> torch.Tensor:
        with self._forwarding():
            return self.model(**_picked(batch, rows)).logits

    def targets(self, batch: Batch, rows: torch.Tensor | None = None) -> TeacherHead:
        with self._forwarding():
            return teacher_head(self.model, batch, rows, self.copies_head)


class FrozenCopyTeacher(_ModelTeacher):
    """A separately loaded, frozen copy of the base model (full finetuning).

    It runs in the precision context of its caller, the student's (the trainer computes the loss
    under the run's autocast), like the shared base does; ``own_dtype`` (``teacher: {dtype: ...}``
    set in the YAML) turns autocast off for it, so that it computes in the dtype it was loaded in.
    """

    def __init__(self, model: PreTrainedModel, own_dtype: bool = False) -> None:
        self.model = model.eval().requires_grad_(False)
        self.own_dtype = own_dtype

    def to(self, device: torch.device | str) -> FrozenCopyTeacher:
        if not is_quantized(self.model):
            self.model.to(device)
        return self

    def _forwarding(self) -> contextlib.AbstractContextManager[None]:
        if not self.own_dtype:
            return contextlib.nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, enabled=False)


class SharedBaseTeacher(_ModelTeacher):
    """The student's own base with its adapters switched off: no second copy of the weights."""

    def __init__(self, peft_model: torch.nn.Module) -> None:
        self.model = peft_model

    def to(self, device: torch.device | str) -> SharedBaseTeacher:
        return self  # it lives wherever the student lives

    @contextlib.contextmanager
    def _forwarding(self) -> Iterator[None]:
        with eval_mode(self.model), self.model.disable_adapter():
            yield


@dataclass(frozen=True)
class InPrecision:
    """``teacher`` with its forwards in ``precision()`` (the run's autocast, from the trainer), so that
    every teacher, whatever holds it, computes p^T in the student's precision; the loss itself is
    computed outside it, in float32."""

    teacher: Teacher
    precision: Callable[[], contextlib.AbstractContextManager[None]]

    def targets(self, batch: Batch, rows: torch.Tensor | None = None) -> TeacherView:
        with self.precision():
            return self.teacher.targets(batch, rows)

    def logits(self, batch: Batch, rows: torch.Tensor | None = None) -> torch.Tensor:
        with self.precision():
            return self.teacher.logits(batch, rows)

    def to(self, device: torch.device | str) -> InPrecision:
        return InPrecision(self.teacher.to(device), self.precision)


def build_teacher(
    needs_teacher: bool,
    student: torch.nn.Module,
    load_frozen_copy: Callable[[], PreTrainedModel],
    own_dtype: bool = False,
) -> FrozenCopyTeacher | SharedBaseTeacher | None:
    """The cheapest teacher that gives the base model's exact predictions, or None if not needed.
    ``own_dtype``: the YAML sets the frozen copy's dtype (it then ignores the run's autocast)."""
    if not needs_teacher:
        return None
    if has_adapters(student):
        return SharedBaseTeacher(student)
    return FrozenCopyTeacher(load_frozen_copy(), own_dtype=own_dtype)
