"""What the loss reads of the teacher: p^T chunk by chunk, and the statistics a correction needs.

Every teacher source (:mod:`mft_plugin.teacher.sources`: a frozen copy or the shared base;
:mod:`mft_plugin.teacher.cache`: outputs read from disk) yields a :class:`TeacherView` for a batch.
The fused loss (:mod:`mft_plugin.loss.chunked`) asks it for p^T of a few tokens at a time, so the
teacher's ``[tokens, vocab]`` distribution is never held whole. :class:`TeacherStats` is what a
correction weight (alpha, beta; paper Sec. 2 and 4) may depend on, part of the strategy contract.
A :class:`ProjectedTeacher` (the projected cache of adapter runs) gives no p^T at all, only what the
loss needs of it when the head is frozen and shared (:mod:`mft_plugin.loss.projected`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from mft_plugin.models.heads import IDENTITY, LogitTransform
from mft_plugin.strategy import TeacherStats


class TeacherView(Protocol):
    def chunk(
        self, rows: slice, labels: torch.Tensor, out: torch.Tensor, log_p_student: torch.Tensor | None
    ) -> TeacherStats:
        """Write p^T of the tokens ``rows`` into ``out`` ``[n, V]`` (float32+) and return its stats;
        ``labels`` ``[n]`` are those tokens' labels, ignored ones replaced by 0; ``log_p_student``
        ``[n, V]`` is the student's log p^S there (the teacher cache shapes its tail after it)."""


def stats_of(p_teacher: torch.Tensor, labels: torch.Tensor) -> TeacherStats:
    """p^T_l and max_v p^T_v of ``p_teacher`` ``[n, V]`` at ``labels`` ``[n]``."""
    return TeacherStats(p_label=p_teacher.gather(1, labels.unsqueeze(1)).squeeze(1), p_max=p_teacher.amax(dim=1))


def matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out = a @ b``, in ``out``'s memory when the dtypes allow (a fresh big tensor on CPU costs
    page faults on every chunk), else through ``a.dtype`` (bf16 compute into float32 buffers)."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    return out.copy_(a @ b)


@dataclass(frozen=True)
class TeacherLogits:
    """An online teacher given as logits ``[N, V]`` (the reference; tests and benchmarks)."""

    logits: torch.Tensor

    def chunk(
        self, rows: slice, labels: torch.Tensor, out: torch.Tensor, log_p_student: torch.Tensor | None = None
    ) -> TeacherStats:
        p_teacher = torch.softmax(out.copy_(self.logits[rows]), dim=1, out=out)
        return stats_of(p_teacher, labels)


@dataclass(frozen=True)
class TeacherHead:
    """A teacher given as its final hidden states ``[N, H]``, head weight ``[V, H]`` and bias ``[V]``
    (all in the dtype of the head's matmul) and the model's transform after its head: online, or read
    from the hidden-state cache. Its ``[N, V]`` logits are never materialized, only one chunk at a time."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    transform: LogitTransform = IDENTITY

    def chunk(
        self, rows: slice, labels: torch.Tensor, out: torch.Tensor, log_p_student: torch.Tensor | None = None
    ) -> TeacherStats:
        logits = matmul_into(out, self.hidden[rows], self.weight.T)
        if self.bias is not None:
            logits.add_(self.bias)
        p_teacher = torch.softmax(self.transform.apply_(logits), dim=1, out=out)
        return stats_of(p_teacher, labels)


@dataclass(frozen=True)
class ProjectedTeacher:
    """One batch's projected teacher, per token: ``u`` ``[N, H]`` float32 (s W^T p^T for the shared frozen
    head W and logit scale s), ``p_label`` and ``p_max`` ``[N]`` float32 (p^T_l, max_v p^T_v: every
    objective's w is rebuilt from them), and ``bias_dot`` ``[N]`` float32 (s b . p^T) where the head has
    a bias, else None."""

    u: torch.Tensor
    p_label: torch.Tensor
    p_max: torch.Tensor
    bias_dot: torch.Tensor | None = None

    def stats(self, rows: slice) -> TeacherStats:
        return TeacherStats(p_label=self.p_label[rows], p_max=self.p_max[rows])
