"""The corrected cross-entropy fused with the LM head, chunk by chunk over tokens (README "Performance").

The plain path (:mod:`mft_plugin.loss.plain`) holds several ``[tokens, vocab]`` tensors at once: the
student's logits, the teacher's logits, p^T, log p^S and, in the backward pass, the gradient. At the
paper's scale (16 x 2048 tokens, a 128k vocabulary) each is 16.8 GB in float32. Here, as in
Liger-Kernel's fused linear cross-entropy, the loss starts from the student's final hidden states
h ``[N, H]`` and the head weight W ``[V, H]`` and, for one chunk of tokens at a time, computes

    y = h W^T (+ b),  z^S = T(y),  p^T (from the teacher's hidden states and head, or the teacher cache),
    w = objective.label_weight(p^T_l, p^T_max)                      (paper Sec. 2 and 4)
    loss = (1 - w) CE(p^T, p^S) + w NLL_l(p^S)
    dloss/dz^S = softmax(z^S) - p^C,   p^C = (1 - w) p^T + w 1_l,   g = dloss/dy = dloss/dz^S * T'(y)
    dloss/dh = g W,   dloss/dW += g^T h,   dloss/db += sum_tokens g

all in the forward pass; the backward pass only scales the saved gradients. T is the model's own
transform after its head (:class:`mft_plugin.models.heads.LogitTransform`: a constant scale, then a
softcap c tanh(x / c); the identity for most models), applied in float32 to each chunk, T'(y) =
scale (1 - (z / c)^2) read from one more ``[chunk, V]`` buffer where a softcap is set. Only a few
``[chunk, V]`` buffers live at a time, plus dloss/dh ``[N, H]`` and dloss/dW ``[V, H]``.

dW is accumulated in the head weight's dtype (float32 master weights under mixed precision), each
chunk's product g^T h computed in the compute dtype, as autocast's own backward of the head computes
it: rounding a sum over N / chunk products to bfloat16 (8 significant bits) at every addition would
lose the small updates of later chunks, while one rounding per chunk's product is what the plain path
does per micro-batch too.

Masking is ``where``-style (``masked_fill``, ``nansum``), never a multiplication by 0: a vocabulary
entry both models give -inf is 0 * (-inf) = NaN in CE(p^T, p^S), and a NaN at an ignored position
would survive a multiplication by the mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.data.batches import RowRouting
from mft_plugin.data.labels import valid_mask
from mft_plugin.loss.projected import projected, projected_cross_entropy, subtract_teacher_gradient_
from mft_plugin.models.heads import (
    IDENTITY,
    LogitTransform,
    UnfusableError,
    default_chunk_size,
    fusable_head,
    fused_forward,
    output_head,
)
from mft_plugin.strategy import Objective
from mft_plugin.teacher.sources import Teacher
from mft_plugin.teacher.views import ProjectedTeacher, TeacherView, matmul_into

@dataclass(frozen=True)
class _Problem:
    """The fixed inputs of one fused loss: what every chunk reads."""

    objective: Objective | None  # None: plain NLL (evaluation)
    teacher: TeacherView | ProjectedTeacher | None  # projected: no [chunk, V] teacher buffer (loss/projected.py)
    labels: torch.Tensor  # [N], ignored ones replaced by 0
    valid: torch.Tensor  # [N] bool
    nll_rows: torch.Tensor | None  # [N] bool: tokens trained on plain NLL (w = 1), e.g. replay rows
    compute_dtype: torch.dtype  # of the matmuls (the autocast dtype under mixed precision)
    transform: LogitTransform  # what the model does to its logits after the head
    grad_scale: float  # the upstream gradient the token losses will get (fp16: loss scale / tokens), else 1


class _Buffers:
    """The ``[chunk, V]`` buffers every chunk reuses: log p^S (then the gradient), p^T, a product, and
    the softcap's derivative T'(y) (only where the gradient goes through a softcap)."""

    def __init__(
        self, chunk_size: int, vocab: int, dtype: torch.dtype, device: torch.device, teacher: bool, derivative: bool
    ) -> None:
        make = lambda: torch.empty((chunk_size, vocab), dtype=dtype, device=device)  # noqa: E731
        self.student = make()
        self.teacher, self.product = (make(), make()) if teacher else (None, None)
        self.derivative = make() if derivative else None


def _chunk_losses(
    problem: _Problem,
    rows: slice,
    log_p_student: torch.Tensor,
    buffers: _Buffers,
    teacher_read: bool,
    h: torch.Tensor,
    z_label: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token losses ``[n]``, w ``[n]`` and p^T ``[n, V]`` (None without a teacher, or projected) of
    one chunk; ``teacher_read``: False where every token of the chunk has w = 1 (``nll_rows``, e.g.
    replay rows), whose loss and gradient p^T does not enter: the teacher's head product is then
    skipped. ``h`` ``[n, H]`` and ``z_label`` ``[n]`` (z^S_l) serve a projected teacher only."""
    labels = problem.labels[rows]
    nll = -log_p_student.gather(1, labels.unsqueeze(1)).squeeze(1)
    if problem.teacher is None or not teacher_read:
        return nll, torch.ones_like(nll), None
    n, target = labels.shape[0], projected(problem.teacher)
    p_teacher = None if target is not None else buffers.teacher[:n]
    stats = target.stats(rows) if target is not None else problem.teacher.chunk(rows, labels, p_teacher, log_p_student)
    w = problem.objective.label_weight(stats).to(nll.dtype)
    if problem.nll_rows is not None:
        w = w.masked_fill(problem.nll_rows[rows], 1.0)
    if target is not None:
        return (1.0 - w) * projected_cross_entropy(target, rows, h, z_label, nll) + w * nll, w, None
    # CE(p^T, p^S); nansum: 0 * log 0 = 0 where both models give an entry -inf (NaN only from that product)
    distill = -torch.mul(p_teacher, log_p_student, out=buffers.product[:n]).nansum(dim=1)
    return (1.0 - w) * distill + w * nll, w, p_teacher


def _logit_gradient_(
    p_student: torch.Tensor,
    p_teacher: torch.Tensor | None,
    w: torch.Tensor,
    labels: torch.Tensor,
    ignored: torch.Tensor,
    transform: LogitTransform,
    derivative: torch.Tensor | None,
) -> torch.Tensor:
    """g = (softmax(z^S) - p^C) T'(y) ``[n, V]``, written over ``p_student``; 0 at the ``ignored`` rows
    (their indices in the chunk: zeroing only them spares a pass over ``[n, V]`` when all are labelled),
    zeroed last so that a NaN of an ignored row's T'(y) does not survive."""
    if p_teacher is not None:
        p_student.addcmul_(p_teacher, (w - 1.0).unsqueeze(1))  # - (1 - w) p^T in one pass
    p_student.scatter_add_(1, labels.unsqueeze(1), -w.unsqueeze(1))
    if derivative is not None:  # a softcap: T'(y) = scale (1 - (z / c)^2)
        p_student.mul_(derivative)
    elif transform.scale != 1.0:
        p_student.mul_(transform.scale)
    return p_student.index_fill_(0, ignored, 0.0)


class _FusedCorrectedCrossEntropy(torch.autograd.Function):
    """Per-token losses ``[N]`` with their gradients computed in the forward pass.

    The backward pass is exact for dloss/dh with any upstream per-token gradient (a token's loss
    depends only on its own hidden state) and for dloss/dW, dloss/db when that gradient is the same
    for every labelled token (a sum or a mean, which is how the trainer reduces them).
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, problem: _Problem, chunk_size: int):
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        wants_grad = want_hidden or want_weight or want_bias
        accumulate = torch.promote_types(hidden.dtype, torch.float32)
        head, transform = weight.to(problem.compute_dtype), problem.transform
        scale = problem.grad_scale if problem.compute_dtype == torch.float16 else 1.0  # see _Problem.grad_scale
        rows_per_chunk = min(chunk_size, hidden.shape[0])
        target = projected(problem.teacher)
        buffers = _Buffers(
            rows_per_chunk, weight.shape[0], accumulate, hidden.device, problem.teacher is not None and target is None,
            derivative=wants_grad and transform.softcap is not None,
        )
        token_losses = hidden.new_zeros(hidden.shape[0], dtype=accumulate)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = weight.new_zeros(weight.shape, dtype=torch.promote_types(weight.dtype, accumulate)) if want_weight else None
        grad_bias = bias.new_zeros(bias.shape, dtype=torch.promote_types(bias.dtype, accumulate)) if want_bias else None
        ignored_tokens = (~problem.valid).nonzero().squeeze(1).cpu()  # once per batch (one device sync)
        teacher_tokens = None if problem.nll_rows is None else (~problem.nll_rows).nonzero().squeeze(1).cpu()
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes here are explicit
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                h = hidden[rows].to(problem.compute_dtype)
                log_p_student = matmul_into(buffers.student[: h.shape[0]], h, head.T)  # z^S [n, V]
                if bias is not None:
                    log_p_student.add_(bias)
                transform.apply_(log_p_student)
                derivative = None
                if buffers.derivative is not None:
                    derivative = transform.derivative(log_p_student, buffers.derivative[: h.shape[0]])
                z_label = None if target is None else log_p_student.gather(1, problem.labels[rows].unsqueeze(1)).squeeze(1)
                torch.log_softmax(log_p_student, dim=1, out=log_p_student)
                teacher_read = teacher_tokens is None or _count_within(teacher_tokens, start, start + h.shape[0]) > 0
                losses, w, p_teacher = _chunk_losses(problem, rows, log_p_student, buffers, teacher_read, h, z_label)
                valid = problem.valid[rows]
                token_losses[rows] = losses.masked_fill(~valid, 0.0)
                if not wants_grad:
                    continue
                ignored = _rows_within(ignored_tokens, start, start + h.shape[0], hidden.device)
                grad = _logit_gradient_(
                    log_p_student.exp_(), p_teacher, w, problem.labels[rows], ignored, transform, derivative
                )
                if scale != 1.0:  # fp16: before the casts of the products, as the naive path's autograd does
                    grad.mul_(scale)
                if grad_hidden is not None:
                    product = matmul_into(grad_hidden[rows], grad.to(head.dtype), head)
                    if scale != 1.0:
                        product.div_(scale)
                    if target is not None:
                        subtract_teacher_gradient_(target, grad_hidden[rows], rows, w, valid)
                if grad_weight is not None:  # h of ignored tokens zeroed: 0 * NaN there would poison all of dW
                    _accumulate_product(grad_weight, grad, h.masked_fill(~valid.unsqueeze(1), 0.0), scale)
                if grad_bias is not None:
                    grad_bias.add_(grad.sum(dim=0), alpha=1.0 / scale)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, problem.valid)
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return token_losses

    @staticmethod
    def backward(ctx: Any, grad_tokens: torch.Tensor):
        grad_hidden, grad_weight, grad_bias, valid = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_tokens.unsqueeze(1).to(grad_hidden.dtype)
        if grad_weight is not None or grad_bias is not None:
            scale = _uniform_scale(grad_tokens, valid)
            for grad in (grad_weight, grad_bias):  # in place: a [V, H] copy would cost more than all the chunks
                if grad is not None and bool(scale != 1):
                    grad.mul_(scale)
        weight_dtype, bias_dtype = ctx.dtypes
        grad_weight = None if grad_weight is None else grad_weight.to(weight_dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _count_within(indices: torch.Tensor, start: int, stop: int) -> int:
    """How many of the sorted token ``indices`` (on the CPU) fall in ``[start, stop)``."""
    first, last = torch.searchsorted(indices, torch.tensor([start, stop])).tolist()
    return last - first


def _rows_within(indices: torch.Tensor, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """The sorted token ``indices`` (on the CPU: no device sync per chunk) that fall in ``[start, stop)``,
    relative to ``start``, on ``device``."""
    first, last = torch.searchsorted(indices, torch.tensor([start, stop])).tolist()
    return (indices[first:last] - start).to(device, non_blocking=True)


def _accumulate_product(total: torch.Tensor, grad: torch.Tensor, h: torch.Tensor, scale: float = 1.0) -> None:
    """``total += grad^T h / scale``: the product in ``h``'s (the compute) dtype, the sum in ``total``'s
    (see the module docstring); ``grad`` comes scaled by ``scale``."""
    if h.dtype == total.dtype:
        total.addmm_(grad.T, h, alpha=1.0 / scale)
    else:
        total.add_(grad.T.to(h.dtype) @ h, alpha=1.0 / scale)


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
    objective: Objective | None,
    teacher: TeacherView | None,
    chunk_size: int | None = None,
    nll_rows: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
    transform: LogitTransform = IDENTITY,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Per-token CE(p^C, p^S) ``[N]`` float32, 0 at ignored labels, as ``objective.token_losses`` gives
    for logits ``transform(hidden @ weight.T + bias)``, without ever holding ``[N, V]`` logits.

    ``hidden`` ``[N, H]``: the student's final hidden states; ``weight`` ``[V, H]`` and ``bias`` ``[V]``
    (or None): its head; ``labels`` ``[N]`` aligned with ``hidden`` (already shifted); ``objective``:
    None for plain NLL; ``teacher``: p^T chunk by chunk (None for an objective that needs no teacher);
    ``nll_rows`` ``[N]`` bool: tokens whose weight is w = 1 whatever the objective (plain NLL, e.g.
    replayed data); ``compute_dtype``: of the matmuls (default ``hidden``'s; softmaxes and gradients
    are float32 whatever it is); ``transform``: the model's own after its head. Differentiable w.r.t.
    ``hidden``, ``weight`` and ``bias``; reduce the result with a sum or a mean over labelled tokens.
    ``grad_scale``: the gradient each token loss will receive (an fp16 run's loss scale over the step's
    tokens): in float16, p^S - p^C is multiplied by it before the cast of the products and divided
    after, as the naive path's autograd scales it before the head's fp16 backward, so tail
    probabilities below fp16's 6e-8 keep their gradient; ignored in float32 and bfloat16. Under ``torch.no_grad`` (every evaluation, the base measurement) no gradient is computed: no
    ``[V, H]`` buffer, no per-chunk head gradient.
    """
    if teacher is None and objective is not None and objective.needs_teacher:
        raise ValueError(f"objective {objective.name!r} needs a teacher")
    if projected(teacher) is not None and any(t is not None and t.requires_grad for t in (weight, bias)):
        raise ValueError("a projected teacher needs a frozen head (its gradient would need p^T itself)")
    valid = valid_mask(labels)
    problem = _Problem(
        objective, teacher, labels.masked_fill(~valid, 0), valid, nll_rows, compute_dtype or hidden.dtype, transform,
        grad_scale,
    )
    with_buffer = teacher is not None and projected(teacher) is None
    chunk_size = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0], with_buffer, weight.shape[1])
    if not torch.is_grad_enabled():  # evaluation: ctx.needs_input_grad ignores grad mode, requires_grad does not
        hidden, weight, bias = (None if t is None else t.detach() for t in (hidden, weight, bias))
    return _FusedCorrectedCrossEntropy.apply(hidden, weight, bias, problem, chunk_size)


@torch.no_grad()
def chunked_nll(
    model: torch.nn.Module,
    head: torch.nn.Linear,
    batch: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    in_head: bool = False,
) -> torch.Tensor:
    """Plain NLL per token ``[batch, seq]`` of ``model`` on ``batch`` (``labels`` already shifted) through
    the chunked head and the model's :class:`LogitTransform`: the evaluation never needs more memory
    than a training step. ``in_head``: computed inside the head's forward (FSDP2, ZeRO-3:
    :func:`mft_plugin.models.heads.fused_forward`)."""
    transform = LogitTransform.of(model)

    def nll(hidden: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        losses = chunked_token_losses(
            hidden.flatten(0, -2), head.weight, labels.flatten(), None, None,
            compute_dtype=compute_dtype, bias=head.bias, transform=transform,
        )  # fmt: skip
        return losses.view_as(labels)

    return fused_forward(model, head, batch, nll, in_head)


def is_label_weight_objective(objective: Objective) -> bool:
    """An objective of the family p^C = (1 - w) p^T + w 1_l: it states ``label_weight`` and keeps
    the shared ``token_losses``. Others (e.g. a plugin's own loss) take the plain path."""
    cls = type(objective)
    return cls.token_losses is Objective.token_losses and cls.label_weight is not Objective.label_weight


class ChunkedLoss:
    """The fused path of ``MFTTrainer.compute_loss``: student forward without logits, then the loss."""

    def __init__(
        self,
        objective: Objective,
        head: torch.nn.Linear,
        chunk_size: int | None = None,
        transform: LogitTransform = IDENTITY,
        in_head: bool = False,
    ) -> None:
        """``in_head``: the loss computed inside the head's forward, where FSDP2 and ZeRO-3 gather its weight
        (:func:`mft_plugin.models.heads.fused_forward`); else after the model's forward (whole weights)."""
        self.objective, self.head, self.chunk_size, self.transform = objective, head, chunk_size, transform
        self.in_head = in_head

    def __call__(
        self,
        model: torch.nn.Module,
        teacher: Teacher | None,
        batch: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        grad_scale: float = 1.0,
    ) -> torch.Tensor:
        """Per-token losses ``[batch, seq]``, as :func:`mft_plugin.loss.plain.plain_token_losses` gives.

        ``batch``: the collated batch (model inputs and routing columns); ``labels`` are already
        shifted; ``grad_scale``: see :func:`chunked_token_losses`. Rows routed to the plain FT loss
        (:class:`mft_plugin.data.batches.RowRouting`) get
        w = 1; the teacher runs only on the other rows.
        """
        nll_rows = RowRouting.of(batch).ft_rows
        view = None
        if teacher is not None:
            view = teacher.targets(batch, None if nll_rows is None else ~nll_rows)
        token_nll = nll_rows.unsqueeze(1).expand_as(labels).flatten() if nll_rows is not None else None

        def corrected(hidden: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
            losses = chunked_token_losses(
                hidden.flatten(0, -2), self.head.weight, labels.flatten(), self.objective, view,
                self.chunk_size, token_nll, compute_dtype, self.head.bias, self.transform, grad_scale,
            )  # fmt: skip
            return losses.view_as(labels)

        return fused_forward(model, self.head, batch, corrected, self.in_head)


def select_loss_impl(config: MFTConfigBase, objective: Objective, model: torch.nn.Module) -> ChunkedLoss | None:
    """The chunked loss where ``loss_impl`` (``auto``: wherever it applies) and ``teacher_cache`` ask
    for it, None for the plain one; UnfusableError where they require it and it cannot apply."""
    return loss_choice(config, objective, model)[0]


def loss_choice(config: MFTConfigBase, objective: Objective, model: torch.nn.Module) -> tuple[ChunkedLoss | None, str]:
    """:func:`select_loss_impl` and, in words for the startup line, which path it took and why.

    The fused path does not apply to objectives outside the label-weight family, or to models whose
    logits are not their :class:`LogitTransform` of ``hidden @ head.weight.T + head.bias``, which a probe
    forward measures (:func:`fusable_head`). Under fsdp/deepspeed it runs inside the head's forward, where
    the engine gathers the weight (:func:`mft_plugin.models.heads.fused_forward`): there no probe forward
    can run (ZeRO-3 weights are partitioned until the engine exists), every forward checks instead that the
    model returns its head's output unchanged, and a model that scales or caps its logits after the head
    keeps the plain loss.
    """
    if config.loss_impl == "naive":
        return None, "plain (loss_impl: naive)"
    in_head = config.engine_name != "ddp"
    try:
        if not is_label_weight_objective(objective):
            raise UnfusableError(f"objective {objective.name!r} overrides token_losses (not a label-weight objective)")
        transform = LogitTransform.of(model)
        if in_head and transform != IDENTITY:
            raise UnfusableError(
                f"under {config.engine_name} it is computed inside the LM head's forward, and this model changes its "
                f"logits after the head ({transform})"
            )
        head = output_head(model) if in_head else fusable_head(model)
        chunked = ChunkedLoss(objective, head, transform=transform, in_head=in_head)
    except UnfusableError as error:
        if config.teacher_cache is not None and objective.needs_teacher:
            raise UnfusableError(f"teacher_cache needs the chunked loss, which cannot be used: {error}") from None
        if config.loss_impl == "chunked":
            raise UnfusableError(f"loss_impl: chunked cannot be used: {error}; use loss_impl: auto or naive") from None
        return None, f"plain (loss_impl: auto: the fused loss does not apply: {error})"
    where = (
        f"inside the LM head's forward, where {config.engine_name} gathers its weight; every forward checks the "
        "model returns the head's output unchanged" if in_head else "a probe forward matched the model's own logits"
    )
    return chunked, f"chunked (loss_impl: {config.loss_impl}: fused with the LM head, no [tokens, vocab] logits; {where})"
