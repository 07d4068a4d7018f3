"""The teacher: the unfinetuned model whose predictions p^T anchor the student (paper Sec. 2).

Two ways to hold it, chosen by the core from the student's form, never by the objective:

- with an adapter (peft) the teacher *is* the student's base: the forward runs under
  ``disable_adapter()``, so no second copy of the (possibly quantized) weights exists;
- for full finetuning it is a frozen copy loaded once from the same checkpoint.

Either way the teacher runs in eval mode (no dropout) with no autograd graph. Under an engine that
shards the student (FSDP2, DeepSpeed ZeRO-3) the frozen copy is sharded the same way by
:func:`place_teacher`, never replicated whole on every rank (README "Scaling out").
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import PreTrainedModel

from mft_plugin.chunked_loss import TeacherHead, teacher_head


class Teacher(Protocol):
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Teacher logits ``[batch, seq, vocab]`` for the same inputs the student sees."""

    def targets(self, inputs: Mapping[str, torch.Tensor], rows: torch.Tensor | None = None) -> TeacherHead:
        """The same predictions for the chunked loss (:mod:`mft_plugin.chunked_loss`): the teacher's
        final hidden states and head, its ``[batch, seq, vocab]`` logits never materialized; run on
        the ``rows`` ``[batch]`` bool only (None: all)."""


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
        if not is_quantized(self.model):
            self.model.to(device)
        return self

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def targets(self, inputs: Mapping[str, torch.Tensor], rows: torch.Tensor | None = None) -> TeacherHead:
        return teacher_head(self.model, inputs, rows)


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

    def targets(self, inputs: Mapping[str, torch.Tensor], rows: torch.Tensor | None = None) -> TeacherHead:
        with eval_mode(self.model), self.model.disable_adapter():
            return teacher_head(self.model, inputs, rows)


def is_quantized(model: torch.nn.Module) -> bool:
    """Loaded in 4 or 8 bits by bitsandbytes: placed at load time, and never sharded."""
    return getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)


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


def place_teacher(
    teacher: FrozenCopyTeacher | SharedBaseTeacher | None, accelerator: Accelerator
) -> FrozenCopyTeacher | SharedBaseTeacher | None:
    """The teacher on the student's device; a frozen copy sharded like the student where it is.

    A shared base needs nothing: it is the student. A frozen copy under FSDP2 is ``fully_shard``-ed
    with the student's own wrap policy (accelerate's ``fsdp2_prepare_model``), so a rank holds
    1/N of it plus one gathered layer at a time. Under DeepSpeed it runs in an inference engine of
    the run's config (as TRL does for its reference model): ZeRO-3 partitions it (it was loaded
    partitioned already, since ``TrainingArguments`` exist before ``from_pretrained``); ZeRO-1/2
    keep parameters whole on every rank, the student's as well, so the teacher is whole there too.
    A quantized teacher (``teacher: {load_in_4bit: true}``) is small already and stays whole.
    """
    if teacher is None:
        return None
    if isinstance(teacher, FrozenCopyTeacher) and not is_quantized(teacher.model):
        if accelerator.distributed_type == DistributedType.FSDP:
            from accelerate.utils import fsdp2_prepare_model

            teacher.model = fsdp2_prepare_model(accelerator, teacher.model).eval()
            return teacher
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            teacher.model = deepspeed_inference_engine(teacher.model, accelerator)
            return teacher
    return teacher.to(accelerator.device)


def deepspeed_inference_engine(model: PreTrainedModel, accelerator: Accelerator) -> torch.nn.Module:
    """A DeepSpeed engine without optimizer that runs ``model``'s forward, ZeRO-3 partitioned or not."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    if config["zero_optimization"]["stage"] == 3:
        hidden = model.config.hidden_size  # the sizes TRL uses for a frozen reference model
        config["zero_optimization"].update(
            reduce_bucket_size=hidden * hidden,
            stage3_param_persistence_threshold=10 * hidden,
            stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
        )
    else:
        config["zero_optimization"]["stage"] = 0
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeedEngine.eval() returns None, not the engine
    return engine

