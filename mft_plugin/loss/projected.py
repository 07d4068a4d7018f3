"""The corrected cross-entropy against a projected teacher: no ``[chunk, V]`` teacher buffer (issue 24).

When teacher and student share one frozen head (an adapter run: the teacher is the student's base,
paper Sec. 2 / README "Teacher cache"), with z^S = s (W h^S + b) and sum_v p^T_v = 1,

    CE(p^T, p^S) = logsumexp(z^S) - sum_v p^T_v z^S_v = logsumexp(z^S) - h^S . u - s b . p^T,
    u = s W^T p^T                                              ([H] per token)
    dloss/dh^S = s W^T (p^S - p^C) = s W^T (p^S - w 1_l) - (1 - w) u,

with w the objective's label weight and s a constant logit scale (1 for most models). So the
teacher side of the loss and of its gradient is one ``H``-dot product per token, and the student's
chunk softmax is all that the fused loss computes over the vocabulary, as for plain finetuning.
logsumexp(z^S) is read off the student's chunk as z^S_l - log p^S_l (z^S_l gathered before the
in-place log-softmax), so it is the very logsumexp the fused loss's softmax used.

The identity needs the head to be frozen (dloss/dW would need p^T itself) and the logits to be
linear in the head's output (a softcap is not): :mod:`mft_plugin.teacher.projected` refuses the
others before anything is built.
"""

from __future__ import annotations

import torch

from mft_plugin.teacher.views import ProjectedTeacher


def projected_cross_entropy(
    teacher: ProjectedTeacher, rows: slice, h: torch.Tensor, z_label: torch.Tensor, nll: torch.Tensor
) -> torch.Tensor:
    """CE(p^T, p^S) ``[n]`` of the tokens ``rows`` from the student's hidden states ``h`` ``[n, H]``, its
    logit at the label ``z_label`` ``[n]`` and -log p^S_l ``nll`` ``[n]`` (logsumexp(z^S) = z^S_l + nll)."""
    u = teacher.u[rows]
    distill = (z_label.to(nll.dtype) + nll) - (h.to(u.dtype) * u).sum(dim=1).to(nll.dtype)
    if teacher.bias_dot is not None:
        distill = distill - teacher.bias_dot[rows].to(nll.dtype)
    return distill


def subtract_teacher_gradient_(
    teacher: ProjectedTeacher, grad_hidden: torch.Tensor, rows: slice, w: torch.Tensor, valid: torch.Tensor
) -> None:
    """``grad_hidden`` ``[n, H]`` (s W^T (p^S - w 1_l) of the tokens ``rows``) -= (1 - w) u, except at
    ignored tokens (``valid`` ``[n]`` False), whose gradient stays 0."""
    coefficient = (1.0 - w).masked_fill(~valid, 0.0).to(teacher.u.dtype)
    grad_hidden.sub_((coefficient.unsqueeze(1) * teacher.u[rows]).to(grad_hidden.dtype))


def projected(teacher: object) -> ProjectedTeacher | None:
    """``teacher`` if the fused loss is to take its projected branch, else None."""
    return teacher if isinstance(teacher, ProjectedTeacher) else None
