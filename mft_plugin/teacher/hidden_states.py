"""The exact teacher cache (``teacher_cache: {}``): the teacher's final hidden states, one per token.

p^T = softmax(h^T W^T + b) is recomputed from the stored h^T inside the chunked loss, chunk by chunk,
through the same :class:`mft_plugin.teacher.views.TeacherHead` the online teacher yields: the target
is the online teacher's, bit for bit where the same kernels run (the hidden states are stored in the
dtype of the head's matmul, bfloat16 under bf16 autocast). With an adapter the head is the student's
own frozen base head (under FSDP2 and DeepSpeed the copy in the cache: see :class:`HiddenStates`); for
full finetuning the cache holds one frozen copy of the head (V x H), and no other teacher weight is held
during training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch

from mft_plugin.models.forms import has_adapters
from mft_plugin.models.heads import LogitTransform, output_head
from mft_plugin.teacher.sources import frozen_head_view
from mft_plugin.teacher.stored import Field, as_stored, no_logits, stored_at
from mft_plugin.teacher.views import TeacherHead


class HiddenStates:
    """The layout of the exact cache: ``hidden`` ``[blocks, width, H]`` and the frozen ``head_weight``
    ``[V, H]`` (and ``head_bias`` ``[V]``), in the teacher's compute dtype.

    ``student_head``: an adapter run reads its frozen head from the student (no second copy); False where
    an engine shards the student's head (FSDP2, DeepSpeed), whose weight is whole only inside the head's
    own forward, after the teacher's view is made: the stored copy (the same values) is read instead."""

    kind: ClassVar[str] = "hidden_states"

    def __init__(self, student_head: bool = True) -> None:
        self.student_head = student_head

    def settings(self) -> dict[str, object]:
        return {}

    def fields(self, view: TeacherHead, blocks: int, width: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        fields = {
            "hidden": (view.hidden.dtype, (blocks, width, view.hidden.shape[1])),
            "head_weight": (view.weight.dtype, tuple(view.weight.shape)),
        }
        if view.bias is not None:
            fields["head_bias"] = (view.bias.dtype, tuple(view.bias.shape))
        return fields

    def write_batch(self, arrays: dict[str, np.ndarray], start: int, view: TeacherHead, labels: torch.Tensor) -> None:
        batch, seq = labels.shape
        arrays["hidden"][start : start + batch, :seq] = as_stored(view.hidden.reshape(batch, seq, -1))
        if start == 0:
            arrays["head_weight"][:] = as_stored(view.weight)
            if view.bias is not None:
                arrays["head_bias"][:] = as_stored(view.bias)

    def open(self, fields: dict[str, Field], student: torch.nn.Module) -> HiddenStateCache:
        shared_head = output_head(student) if self.student_head and has_adapters(student) else None
        return HiddenStateCache(fields, shared_head, LogitTransform.of(student))


class HiddenStateCache:
    """The exact cache, read batch by batch (a teacher for ``MFTTrainer``).

    ``shared_head``: the adapter run's base head (the student's, frozen); None: the frozen copy stored
    in the cache (full finetuning, where the student's own head trains). ``transform``: the model's
    after its head (a finetuning run does not change its config).
    """

    def __init__(self, fields: dict[str, Field], shared_head: torch.nn.Linear | None, transform: LogitTransform) -> None:
        self.hidden = fields["hidden"]
        self.shared_head, self.transform = shared_head, transform
        self.device = torch.device("cpu")
        self.weight = self.bias = None
        if shared_head is None:
            self.weight = fields["head_weight"].whole()
            self.bias = fields["head_bias"].whole() if "head_bias" in fields else None

    def to(self, device: torch.device | str) -> HiddenStateCache:
        self.device = torch.device(device)
        if self.weight is not None:
            self.weight = self.weight.to(self.device)
            self.bias = None if self.bias is None else self.bias.to(self.device)
        return self

    def targets(self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor | None = None) -> TeacherHead:
        """The stored hidden states of the batch's blocks, all rows (reading is free), with the frozen head."""
        hidden = stored_at(self.hidden, batch).to(self.device).flatten(0, 1)
        if self.shared_head is not None:
            return frozen_head_view(hidden, self.shared_head.weight, self.shared_head.bias, self.transform)
        return TeacherHead(hidden, self.weight, self.bias, self.transform)

    def logits(self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
        no_logits()
