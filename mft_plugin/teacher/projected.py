"""The exact projected teacher cache of adapter runs (``teacher_cache: {}`` with a frozen shared head).

With an adapter (LoRA, DoRA, IA3, QLoRA) the teacher is the student's own base and both share one
frozen head; then CE(p^T, p^S) and its gradient need p^T only through u = W^T p^T (one ``hidden_size``
vector per token), p^T_l, p^T_max and b . p^T (:mod:`mft_plugin.loss.projected` derives it). This
layout stores exactly those, so that training costs plain finetuning plus O(N x H): the fused loss
never recomputes the teacher's ``[chunk, V]`` logits, which the hidden-state cache
(:mod:`.hidden_states`) must. p^T_l and p^T_max rebuild w (alpha, beta, any tau, any label-weight
objective; paper Sec. 2 and 4), so one cache serves a whole sweep over tau and objectives.

u is built in float32 (p^T @ W with float32 accumulation, W upcast, whatever the run's dtype) and
stored in float32: 4 x hidden_size bytes per token, twice the bfloat16 hidden-state cache, the price
of not rounding the teacher's side of the gradient to bfloat16 (README "Teacher cache"). A constant
logit scale s (:class:`mft_plugin.models.heads.LogitTransform`: ``logit_scale``, ``lm_head_multiplier``,
1 / ``logits_scaling``) folds into u and b . p^T. Where the identity fails (a trainable head, a softcap), :func:`projection_problem` says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch

from mft_plugin.models.forms import has_adapters
from mft_plugin.models.heads import LogitTransform, UnfusableError, output_head
from mft_plugin.teacher.stored import Field, PerTokenCache, teacher_chunks, write_tokens
from mft_plugin.teacher.views import ProjectedTeacher, TeacherHead

TOKEN_FIELDS = ("p_label", "p_max")


def linearity_problem(source: object) -> str | None:
    """Why the logits of this model (or its config) are not linear in its head's output (a softcap, or a
    change the fused loss does not reproduce), or None; a constant scale is linear and folds into u."""
    try:
        softcap = LogitTransform.of(source).softcap
    except UnfusableError as error:
        return str(error)
    return None if softcap is None else f"the model softcaps its logits (final_logit_softcapping = {softcap}: not linear in p^T)"


def projection_problem(student: torch.nn.Module | None) -> str | None:
    """Why CE(p^T, p^S) = logsumexp(z^S) - h^S . u - b . p^T does not hold for this student (None: not
    known, as for full finetuning), or None: the teacher must be its base (an adapter run) and its head
    frozen and plain."""
    if student is None or not has_adapters(student):
        return "the run has no adapter (full finetuning): the head trains, and the teacher is a frozen copy"
    if (problem := linearity_problem(student)) is not None:
        return problem
    try:
        head = output_head(student)
    except UnfusableError as error:
        return f"the head is not the frozen base head: {error} (lora_modules_to_save with lm_head trains it)"
    if any(parameter.requires_grad for parameter in head.parameters()):
        return "the head trains (lora_modules_to_save with lm_head or embed_tokens under tied embeddings)"
    return None


def _require_projection(student: torch.nn.Module | None) -> None:
    if (problem := projection_problem(student)) is not None:
        raise UnfusableError(f"teacher_cache.layout: projected cannot serve this run: {problem}")


def project(p_teacher: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """u = s W^T p^T ``[n, H]`` and s b . p^T ``[n]`` (or None), float32, from p^T ``[n, V]`` and the head
    ``weight`` ``[V, H]``, ``bias`` ``[V]``: float32 products whatever the head's dtype, also under a bf16
    autocast (which would run a float32 matmul in bfloat16)."""
    with torch.autocast(p_teacher.device.type, enabled=False):
        u = (p_teacher.float() @ weight.float()).mul_(scale)
        bias_dot = None if bias is None else (p_teacher.float() @ bias.float()).mul_(scale)
    return u, bias_dot


class Projected:
    """The layout of the projected cache: ``u`` ``[blocks, width, H]``, ``p_label``, ``p_max`` (and
    ``bias_dot`` where the head has a bias) ``[blocks, width]``, all float32."""

    kind: ClassVar[str] = "projected"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    @classmethod
    def for_student(cls, student: torch.nn.Module | None) -> Projected:
        """The layout for ``student``'s frozen head and logit scale; UnfusableError where the identity fails."""
        _require_projection(student)
        return cls(LogitTransform.of(student).scale)

    def settings(self) -> dict[str, object]:
        return {"scale": self.scale}

    def fields(self, view: TeacherHead, blocks: int, width: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        fields = {"u": (torch.float32, (blocks, width, view.weight.shape[1]))}
        names = (*TOKEN_FIELDS, "bias_dot") if view.bias is not None else TOKEN_FIELDS
        return fields | {name: (torch.float32, (blocks, width)) for name in names}

    def write_batch(self, arrays: dict[str, np.ndarray], start: int, view: TeacherHead, labels: torch.Tensor) -> None:
        """u, p^T_l, p^T_max (and b . p^T) of one batch of blocks (``labels`` ``[batch, seq]``, shifted)."""
        out: dict[str, list[torch.Tensor]] = {name: [] for name in ("u", *TOKEN_FIELDS)}
        if view.bias is not None:
            out["bias_dot"] = []
        for p_teacher, stats in teacher_chunks(view, labels):
            u, bias_dot = project(p_teacher, view.weight, view.bias, self.scale)
            out["u"].append(u)
            out["p_label"].append(stats.p_label.float())
            out["p_max"].append(stats.p_max.float())
            if bias_dot is not None:
                out["bias_dot"].append(bias_dot)
        write_tokens(arrays, start, labels, out)

    def open(self, fields: dict[str, Field], student: torch.nn.Module) -> ProjectedCache:
        _require_projection(student)
        return ProjectedCache(fields)


class ProjectedCache(PerTokenCache):
    """The projected cache, read batch by batch (a teacher for ``MFTTrainer``); the head is the student's."""

    def targets(self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor | None = None) -> ProjectedTeacher:
        """The stored outputs of the batch's blocks, all rows (replay rows' are read and weighed 0)."""
        return ProjectedTeacher(**self.read(batch))
