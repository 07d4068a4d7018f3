"""The approximate teacher cache (``teacher_cache: {top_k: k}``): a few numbers per token.

Per token it keeps p^T_l and p^T_max exactly, so the correction weight w (alpha, beta; Sec. 2) is
exact, and the k largest probabilities with their indices. The distillation target is then

- the top-k probabilities at their tokens and p^T_l at the label (also when the label is outside
  the top k);
- the remaining mass, 1 - top-k - p^T_l, over the other tokens in the proportions of the student's
  own p^S there.

Its bias: on those tail tokens the gradient softmax(z^S) - p^C is proportional to the student's own
p^S, so nothing pulls the tail's *shape* back toward the teacher's (only its total mass is kept),
and the tail is where MFT keeps general knowledge: DG rises (README "Performance"). Its use: a cache
of a few hundred bytes per token where the exact one (:mod:`.hidden_states`, 2 x hidden_size bytes
in bfloat16) would not fit the disk, and no teacher head at training time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from mft_plugin.strategy import TeacherStats
from mft_plugin.teacher.stored import Field, PerTokenCache, teacher_chunks, write_tokens
from mft_plugin.teacher.views import TeacherHead

SCALARS = ("p_label", "p_max", "rest")
RANKED = ("top_probs", "top_ids")


@dataclass(frozen=True)
class CachedTeacherChunks:
    """One batch's cached teacher outputs, per token (``[N]`` and ``[N, k]``), as the chunked loss reads them."""

    p_label: torch.Tensor
    p_max: torch.Tensor
    rest: torch.Tensor
    top_probs: torch.Tensor
    top_ids: torch.Tensor

    def chunk(self, rows: slice, labels: torch.Tensor, out: torch.Tensor, log_p_student: torch.Tensor) -> TeacherStats:
        """p~^T into ``out`` ``[n, V]``: the top-k probabilities, p^T_l at the label, and the rest of the
        mass over the other tokens in the proportions of the student's own p^S there (a constant target)."""
        top_ids, p_label = self.top_ids[rows], self.p_label[rows]
        label = labels.unsqueeze(1)
        outside = ~(top_ids == label).any(dim=1)  # the label's exact p^T_l is not among the top k
        label_mass = torch.where(outside, p_label, 0.0).to(out.dtype)
        rest = (self.rest[rows].to(out.dtype) - label_mass).clamp(min=0.0)
        tail = torch.exp(log_p_student, out=out).scatter_(1, top_ids, 0.0).scatter_(1, label, 0.0)
        tail.mul_((rest / tail.sum(dim=1).clamp(min=torch.finfo(out.dtype).tiny)).unsqueeze(1))
        out.scatter_(1, label, label_mass.unsqueeze(1))
        out.scatter_(1, top_ids, self.top_probs[rows].to(out.dtype))
        return TeacherStats(p_label=p_label, p_max=self.p_max[rows])


class TopK:
    """The layout of the top-k cache: ``p_label``, ``p_max``, ``rest`` ``[blocks, width]`` float32,
    ``top_probs`` float32 and ``top_ids`` int32 ``[blocks, width, k]``."""

    kind: ClassVar[str] = "top_k"

    def __init__(self, k: int) -> None:
        self.k = k

    def settings(self) -> dict[str, object]:
        return {"top_k": self.k}

    def fields(self, view: TeacherHead, blocks: int, width: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        k = min(self.k, view.weight.shape[0])
        fields: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {name: (torch.float32, (blocks, width)) for name in SCALARS}
        fields["top_probs"] = (torch.float32, (blocks, width, k))
        fields["top_ids"] = (torch.int32, (blocks, width, k))
        return fields

    def write_batch(self, arrays: dict[str, np.ndarray], start: int, view: TeacherHead, labels: torch.Tensor) -> None:
        """The outputs of one batch of blocks (``labels`` ``[batch, seq]``, shifted), chunk by chunk."""
        k = arrays["top_ids"].shape[2]
        out: dict[str, list[torch.Tensor]] = {name: [] for name in (*SCALARS, *RANKED)}
        for p_teacher, stats in teacher_chunks(view, labels):
            top = p_teacher.topk(k, dim=1)
            out["p_label"].append(stats.p_label.float())
            out["p_max"].append(stats.p_max.float())
            out["top_probs"].append(top.values.float())
            out["top_ids"].append(top.indices.int())
            out["rest"].append((1.0 - top.values.float().sum(dim=1)).clamp(min=0.0))
        write_tokens(arrays, start, labels, out)

    def open(self, fields: dict[str, Field], student: torch.nn.Module) -> TopKCache:
        return TopKCache(fields)


class TopKCache(PerTokenCache):
    """The top-k cache of one base model and training set, read batch by batch (a teacher for ``MFTTrainer``)."""

    def targets(self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor | None = None) -> CachedTeacherChunks:
        """The cached outputs of the batch's blocks, all rows (reading is free)."""
        read = self.read(batch)
        read["top_ids"] = read["top_ids"].long()
        return CachedTeacherChunks(**read)
