"""The loss every objective shares: cross-entropy against a label-corrected teacher distribution.

All four objectives of the paper (Sections 2 and 4) build their target the same way,

    p^C = (1 - w) p^T + w 1_l,

and differ only in the per-token weight ``w`` they put on the one-hot label ``l``
(``ft``: w = 1; ``mft``: w = alpha or beta; ...). Expanding the cross-entropy of that
target against the student's distribution p^S gives

    CE(p^C, p^S) = (1 - w) CE(p^T, p^S) + w NLL_l(p^S),

so the loss never needs p^C itself, and its gradient w.r.t. the student logits is
softmax(z^S) - p^C. This module holds that expansion once, in float32 whatever the model
dtype (float64 inputs stay float64, e.g. for gradcheck), so each objective module only states
its ``w``. Masks select (``torch.where``), never multiply: 0 * log p^S is 0 where both models give
a vocabulary entry -inf (p^T = 0), and a NaN or inf at an ignored position gives a loss of exactly 0.
"""

from __future__ import annotations

import torch

from mft_plugin.data.labels import safe_labels, valid_mask


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32 at least: bf16/fp16 lose too much in a softmax; float64 is kept."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def label_and_max_probabilities(
    teacher_logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """p^T_l and max_v p^T_v ``[batch, seq]`` (the fields of ``TeacherStats``). Logits ``[batch, seq, vocab]``."""
    p_teacher = torch.softmax(upcast(teacher_logits.detach()), dim=-1)
    p_label = p_teacher.gather(-1, safe_labels(labels).unsqueeze(-1)).squeeze(-1)
    return p_label, p_teacher.amax(dim=-1)


def nll_token_losses(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain finetuning loss per token, ``[batch, seq]`` float32, 0 where the label is ignored."""
    log_p_student = torch.log_softmax(upcast(student_logits), dim=-1)
    nll = -log_p_student.gather(-1, safe_labels(labels).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid_mask(labels), nll, 0.0)


def corrected_token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    label_weight: torch.Tensor,
) -> torch.Tensor:
    """Per-token CE(p^C, p^S) with p^C = (1 - w) p^T + w 1_l, ``[batch, seq]`` float32.

    ``label_weight`` is w, ``[batch, seq]``. The teacher is treated as a constant (no gradient).
    Ignored positions contribute 0.
    """
    log_p_student = torch.log_softmax(upcast(student_logits), dim=-1)
    p_teacher = torch.softmax(upcast(teacher_logits.detach()), dim=-1)
    distill = -torch.where(p_teacher > 0, p_teacher * log_p_student, 0.0).sum(dim=-1)  # CE(p^T, p^S), [batch, seq]
    nll = -log_p_student.gather(-1, safe_labels(labels).unsqueeze(-1)).squeeze(-1)
    w = label_weight.detach().to(log_p_student.dtype)
    return torch.where(valid_mask(labels), (1.0 - w) * distill + w * nll, 0.0)


def masked_mean(token_losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over labelled tokens; 0 (not NaN) when every label is ignored."""
    count = valid_mask(labels).sum().clamp(min=1)
    return token_losses.sum() / count
