"""The corrected cross-entropy fused with the LM head, chunk by chunk over tokens (README "Performance").

The plain path (:mod:`mft_plugin.loss.plain`) holds several ``[tokens, vocab]`` tensors at once: the
student's logits, the teacher's logits, p^T, log p^S and, in the backward pass, the gradient. At the
paper's scale (16 x 2048 tokens, a 128k vocabulary) each is 16.8 GB in float32. Here, as in
Liger-Kernel's fused linear cross-entropy, the loss starts from the student's final hidden states
h ``[N, H]`` and the head weight W ``[V, H]`` and, for one chunk of tokens at a time, computes

    z^S = h W^T,  p^T (from the teacher's hidden states and head, or the teacher cache),
    w = objective.label_weight(p^T_l, p^T_max)                      (paper Sec. 2 and 4)
    loss = (1 - w) CE(p^T, p^S) + w NLL_l(p^S)
    dloss/dz^S = softmax(z^S) - p^C,   p^C = (1 - w) p^T + w 1_l
    dloss/dh = (dloss/dz^S) W,   dloss/dW += (dloss/dz^S)^T h

all in the forward pass; the backward pass only scales the saved gradients. Only a few
``[chunk, V]`` buffers live at a time, plus dloss/dh ``[N, H]`` and dloss/dW ``[V, H]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.data.batches import RowRouting
from mft_plugin.data.labels import valid_mask
from mft_plugin.models.heads import UnfusableError, default_chunk_size, forward_hidden, output_head
from mft_plugin.strategy import Objective
from mft_plugin.teacher.sources import Teacher
from mft_plugin.teacher.views import TeacherView, matmul_into

@dataclass(frozen=True)
class _Problem:
    """The fixed inputs of one fused loss: what every chunk reads."""

    objective: Objective
    teacher: TeacherView | None
    labels: torch.Tensor  # [N], ignored ones replaced by 0
    valid: torch.Tensor  # [N] bool
    nll_rows: torch.Tensor | None  # [N] bool: tokens trained on plain NLL (w = 1), e.g. replay rows
    compute_dtype: torch.dtype  # of the matmuls (the autocast dtype under mixed precision)


class _Buffers:
    """The ``[chunk, V]`` buffers every chunk reuses: log p^S (then the gradient), p^T, a product."""

    def __init__(self, chunk_size: int, vocab: int, dtype: torch.dtype, device: torch.device, teacher: bool) -> None:
        make = lambda: torch.empty((chunk_size, vocab), dtype=dtype, device=device)  # noqa: E731
        self.student = make()
        self.teacher, self.product = (make(), make()) if teacher else (None, None)


def _chunk_losses(
    problem: _Problem, rows: slice, log_p_student: torch.Tensor, buffers: _Buffers
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token losses ``[n]``, w ``[n]`` and p^T ``[n, V]`` (None without a teacher) of one chunk."""
    labels = problem.labels[rows]
    nll = -log_p_student.gather(1, labels.unsqueeze(1)).squeeze(1)
    if problem.teacher is None:
        return nll, torch.ones_like(nll), None
    n = labels.shape[0]
    p_teacher = buffers.teacher[:n]
    w = problem.objective.label_weight(problem.teacher.chunk(rows, labels, p_teacher, log_p_student)).to(nll.dtype)
    if problem.nll_rows is not None:
        w = w.masked_fill(problem.nll_rows[rows], 1.0)
    distill = -torch.mul(p_teacher, log_p_student, out=buffers.product[:n]).sum(dim=1)  # CE(p^T, p^S)
    return (1.0 - w) * distill + w * nll, w, p_teacher


def _softmax_minus_target_(
    p_student: torch.Tensor, p_teacher: torch.Tensor | None, w: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """softmax(z^S) - p^C ``[n, V]``, written over ``p_student``; 0 at ignored tokens."""
    if p_teacher is not None:
        p_student.sub_(p_teacher.mul_((1.0 - w).unsqueeze(1)))
    p_student.scatter_add_(1, labels.unsqueeze(1), -w.unsqueeze(1))
    return p_student.masked_fill_(~valid.unsqueeze(1), 0.0)


class _FusedCorrectedCrossEntropy(torch.autograd.Function):
    """Per-token losses ``[N]`` with their gradients computed in the forward pass.

    The backward pass is exact for dloss/dh with any upstream per-token gradient (a token's loss
    depends only on its own hidden state) and for dloss/dW when that gradient is the same for every
    labelled token (a sum or a mean, which is how the trainer reduces them).
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, problem: _Problem, chunk_size: int):
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        accumulate = torch.promote_types(hidden.dtype, torch.float32)
        head = weight.to(problem.compute_dtype)
        rows_per_chunk = min(chunk_size, hidden.shape[0])
        buffers = _Buffers(rows_per_chunk, weight.shape[0], accumulate, hidden.device, problem.teacher is not None)
        token_losses = hidden.new_zeros(hidden.shape[0], dtype=accumulate)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None
        if want_weight:
            grad_weight = weight.new_zeros(weight.shape, dtype=torch.promote_types(weight.dtype, accumulate))
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes here are explicit
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                h = hidden[rows].to(problem.compute_dtype)
                log_p_student = matmul_into(buffers.student[: h.shape[0]], h, head.T)  # z^S [n, V]
                torch.log_softmax(log_p_student, dim=1, out=log_p_student)
                losses, w, p_teacher = _chunk_losses(problem, rows, log_p_student, buffers)
                token_losses[rows] = losses.masked_fill(~problem.valid[rows], 0.0)
                if grad_hidden is None and grad_weight is None:
                    continue
                grad = _softmax_minus_target_(log_p_student.exp_(), p_teacher, w, problem.labels[rows], problem.valid[rows])
                if grad_hidden is not None:
                    matmul_into(grad_hidden[rows], grad.to(head.dtype), head)
                if grad_weight is not None:
                    grad_weight.addmm_(grad.T, hidden[rows].to(grad_weight.dtype))
        ctx.save_for_backward(grad_hidden, grad_weight, problem.valid)
        ctx.weight_dtype = weight.dtype
        return token_losses

    @staticmethod
    def backward(ctx: Any, grad_tokens: torch.Tensor):
        grad_hidden, grad_weight, valid = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_tokens.unsqueeze(1).to(grad_hidden.dtype)
        if grad_weight is not None:
            scale = _uniform_scale(grad_tokens, valid)
            if bool(scale != 1):  # in place: a [V, H] copy would cost more than all the chunks; no double backward
                grad_weight.mul_(scale)
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def _uniform_scale(grad_tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The one upstream gradient all labelled tokens share (dW was summed over them unweighted)."""
    labelled = grad_tokens[valid]
    if labelled.numel() == 0:
        return grad_tokens.new_zeros(())
    if not bool((labelled == labelled[0]).all()):
        raise RuntimeError(
            "the chunked loss computes the head's gradient for the sum or mean of its token losses; they were "
            "weighted per token here: use loss_impl: naive for such a loss"
        )
    return labelled[0]


def chunked_token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    objective: Objective,
    teacher: TeacherView | None,
    chunk_size: int | None = None,
    nll_rows: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-token CE(p^C, p^S) ``[N]`` float32, 0 at ignored labels, as ``objective.token_losses`` gives
    for logits ``hidden @ weight.T``, without ever holding ``[N, V]`` logits.

    ``hidden`` ``[N, H]``: the student's final hidden states; ``weight`` ``[V, H]``: its head;
    ``labels`` ``[N]`` aligned with ``hidden`` (already shifted); ``teacher``: p^T chunk by chunk
    (None for an objective that needs no teacher); ``nll_rows`` ``[N]`` bool: tokens whose weight is
    w = 1 whatever the objective (plain NLL, e.g. replayed data); ``compute_dtype``: of the matmuls
    (default ``hidden``'s; softmaxes and gradients are float32 whatever it is). Differentiable w.r.t.
    ``hidden`` and ``weight``; reduce the result with a sum or a mean over labelled tokens.
    """
    if teacher is None and objective.needs_teacher:
        raise ValueError(f"objective {objective.name!r} needs a teacher")
    valid = valid_mask(labels)
    problem = _Problem(
        objective, teacher, labels.masked_fill(~valid, 0), valid, nll_rows, compute_dtype or hidden.dtype
    )
    chunk_size = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0], teacher is not None)
    return _FusedCorrectedCrossEntropy.apply(hidden, weight, problem, chunk_size)


def is_label_weight_objective(objective: Objective) -> bool:
    """An objective of the family p^C = (1 - w) p^T + w 1_l: it states ``label_weight`` and keeps
    the shared ``token_losses``. Others (e.g. a plugin's own loss) take the plain path."""
    cls = type(objective)
    return cls.token_losses is Objective.token_losses and cls.label_weight is not Objective.label_weight


class ChunkedLoss:
    """The fused path of ``MFTTrainer.compute_loss``: student forward without logits, then the loss."""

    def __init__(self, objective: Objective, head: torch.nn.Linear, chunk_size: int | None = None) -> None:
        self.objective, self.head, self.chunk_size = objective, head, chunk_size

    def __call__(
        self, model: torch.nn.Module, teacher: Teacher | None, batch: Mapping[str, torch.Tensor], labels: torch.Tensor
    ) -> torch.Tensor:
        """Per-token losses ``[batch, seq]``, as :func:`mft_plugin.loss.plain.plain_token_losses` gives.

        ``batch``: the collated batch (model inputs and routing columns); ``labels`` are already
        shifted. Rows routed to the plain FT loss (:class:`mft_plugin.data.batches.RowRouting`) get
        w = 1; the teacher runs only on the other rows.
        """
        captured = forward_hidden(model, self.head, batch)
        nll_rows = RowRouting.of(batch).ft_rows
        view = None
        if teacher is not None:
            view = teacher.targets(batch, None if nll_rows is None else ~nll_rows)
        token_nll = nll_rows.unsqueeze(1).expand_as(labels).flatten() if nll_rows is not None else None
        losses = chunked_token_losses(
            captured.hidden.flatten(0, -2), self.head.weight, labels.flatten(), self.objective, view,
            self.chunk_size, token_nll, captured.compute_dtype,
        )
        return losses.view_as(labels)


def select_loss_impl(config: MFTConfigBase, objective: Objective, model: torch.nn.Module) -> ChunkedLoss | None:
    """The chunked loss where ``loss_impl`` (``auto``: wherever it applies) and ``teacher_cache`` ask
    for it, None for the plain one; UnfusableError where they require it and it cannot apply.

    It does not apply under fsdp/deepspeed (the head weight is sharded outside its module's
    forward), to objectives outside the label-weight family, or to models whose logits are not
    ``hidden @ head.weight.T``.
    """
    if config.loss_impl == "naive":
        return None
    try:
        if config.engine_name != "ddp":
            raise UnfusableError(f"the run shards parameters ({config.engine_name})")
        if not is_label_weight_objective(objective):
            raise UnfusableError(f"objective {objective.name!r} overrides token_losses (not a label-weight objective)")
        return ChunkedLoss(objective, output_head(model))
    except UnfusableError as error:
        if config.teacher_cache is not None and objective.needs_teacher:
            raise UnfusableError(f"teacher_cache needs the chunked loss, which cannot be used: {error}") from None
        if config.loss_impl == "chunked":
            raise UnfusableError(f"loss_impl: chunked cannot be used: {error}; use loss_impl: auto or naive") from None
        return None
