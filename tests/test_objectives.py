"""The four objectives against a naive per-token reference written straight from the paper.

The reference (Sections 2 and 4) builds p^T = softmax(z^T), decides whether the teacher is right
(the label is a maximizer of p^T; on a tie the teacher counts as right), computes alpha or beta,
builds the corrected target p^C as an explicit vector, and sums -p^C log p^S in a Python loop over
tokens, in float64. The implementation never builds p^C; these tests check that it need not.
"""

from __future__ import annotations

import math

import pytest
import torch

from mft_plugin import get_objective

IGNORE = -100
OBJECTIVES = ["ft", "distill_ft", "singly_corrective", "mft"]
TAUS = {"ft": [None], "distill_ft": [None], "singly_corrective": [0.0, 0.25, 1.0], "mft": [0.0, 0.25, 0.6, 1.0]}
CASES = [(name, tau) for name in OBJECTIVES for tau in TAUS[name]]
SHAPES = [(2, 3, 1), (2, 3, 2), (1, 5, 7), (3, 4, 97)]  # [batch, seq, vocab]: vocab 1, 2 and larger


def objective(name: str, tau: float | None):
    return get_objective(name) if tau is None else get_objective(name, tau=tau)


# ---------------------------------------------------------------- the reference, from the paper


def reference_label_weight(name: str, tau: float | None, p_teacher: torch.Tensor, label: int) -> float:
    """The weight w of 1_l in p^C = (1 - w) p^T + w 1_l, per the paper's case analysis."""
    p_label, p_max = p_teacher[label].item(), p_teacher.max().item()
    teacher_right = p_label >= p_max  # "argmax p^T = l"; a tie at the top counts as right
    alpha = (p_max - p_label + (tau or 0.0)) / (1 + p_max - p_label)
    beta = 1.0 if p_label == 1.0 else (min(1.0, p_label + (tau or 0.0)) - p_label) / (1 - p_label)
    return {
        "ft": 1.0,
        "distill_ft": 0.0 if teacher_right else 1.0,
        "singly_corrective": 0.0 if teacher_right else alpha,  # beta fixed to 0 (Section 4)
        "mft": beta if teacher_right else alpha,  # DC(p^T) (Section 2)
    }[name]


def reference_target(name: str, tau: float | None, teacher_logits: torch.Tensor, label: int) -> torch.Tensor:
    """p^C for one token as an explicit ``[vocab]`` float64 vector."""
    p_teacher = torch.softmax(teacher_logits.double(), dim=-1)
    one_hot = torch.zeros_like(p_teacher)
    one_hot[label] = 1.0
    w = reference_label_weight(name, tau, p_teacher, label)
    return (1 - w) * p_teacher + w * one_hot


def reference_loss(name, tau, student_logits, teacher_logits, labels) -> float:
    """Mean over labelled tokens of -sum_v p^C_v log p^S_v, token by token (0 if none labelled)."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            label = int(labels[b, t])
            if label == IGNORE:
                continue
            p_corrected = reference_target(name, tau, teacher_logits[b, t], label)
            log_p_student = torch.log_softmax(student_logits[b, t].double(), dim=-1)
            total += -sum(p_corrected[v].item() * log_p_student[v].item() for v in range(len(p_corrected)))
            count += 1
    return total / count if count else 0.0


def random_batch(shape: tuple[int, int, int], seed: int = 0, ignored: float = 0.25):
    generator = torch.Generator().manual_seed(seed)
    batch, seq, vocab = shape
    student = torch.randn(shape, generator=generator) * 3
    teacher = torch.randn(shape, generator=generator) * 3
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    teacher_right = torch.rand((batch, seq), generator=generator) < 0.5  # else right only 1/vocab of the time
    labels = torch.where(teacher_right, teacher.argmax(-1), labels)
    labels[torch.rand((batch, seq), generator=generator) < ignored] = IGNORE
    return student, teacher, labels


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("name", "tau"), CASES)
def test_matches_reference_on_random_logits(name: str, tau: float | None, shape: tuple[int, int, int]) -> None:
    student, teacher, labels = random_batch(shape, seed=sum(shape))
    loss = objective(name, tau).loss(student, teacher, labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_loss(name, tau, student, teacher, labels), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_random_batches_exercise_both_teacher_cases(shape: tuple[int, int, int]) -> None:
    """Guard for the test above: its batches hold right and wrong teacher predictions and ignored labels."""
    _, teacher, labels = random_batch(shape, seed=sum(shape))
    right = teacher.argmax(-1) == labels
    assert right.any() and ((~right) & (labels != IGNORE)).any() and (labels == IGNORE).any()


def teacher_with_right_and_wrong_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits where the first token's label is the argmax and the second's is not."""
    teacher = torch.tensor([[[3.0, 1.0, 0.0, -1.0, 0.5], [0.2, 2.5, 0.1, 0.0, -0.3]]])
    return teacher, torch.tensor([[0, 3]])


@pytest.mark.parametrize(("name", "tau"), CASES)
def test_matches_reference_on_one_right_and_one_wrong_token(name: str, tau: float | None) -> None:
    teacher, labels = teacher_with_right_and_wrong_tokens()
    student = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(1))
    loss = objective(name, tau).loss(student, teacher, labels)
    assert loss.item() == pytest.approx(reference_loss(name, tau, student, teacher, labels), rel=1e-6)


def test_ft_needs_no_teacher() -> None:
    student, teacher, labels = random_batch((2, 4, 11))
    ft = get_objective("ft")
    expected = reference_loss("ft", None, student, teacher, labels)
    assert ft.loss(student, None, labels).item() == pytest.approx(expected, rel=1e-6)
    assert ft.loss(student, teacher, labels).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["distill_ft", "singly_corrective", "mft"])
def test_teacher_objectives_refuse_missing_teacher(name: str) -> None:
    student, _, labels = random_batch((1, 2, 3))
    with pytest.raises(ValueError, match="needs teacher logits"):
        get_objective(name).loss(student, None, labels)


# ---------------------------------------------------------------- tau = 1 and tau = 0


@pytest.mark.parametrize("shape", SHAPES)
def test_mft_at_tau_1_is_plain_finetuning(shape: tuple[int, int, int]) -> None:
    """Paper Section 2: "if tau = 1 then alpha, beta = 1 and MFT reduces to finetuning"."""
    student, teacher, labels = random_batch(shape, seed=3)
    mft = get_objective("mft", tau=1.0).loss(student, teacher, labels)
    ft = get_objective("ft").loss(student, None, labels)
    torch.testing.assert_close(mft, ft, rtol=1e-6, atol=1e-7)


def test_singly_corrective_at_tau_1_is_distill_ft() -> None:
    """With tau = 1, alpha = 1: wrong tokens get the one-hot label, right ones p^T (beta = 0)."""
    student, teacher, labels = random_batch((3, 4, 97), seed=4)
    singly = get_objective("singly_corrective", tau=1.0).loss(student, teacher, labels)
    distill_ft = get_objective("distill_ft").loss(student, teacher, labels)
    torch.testing.assert_close(singly, distill_ft, rtol=1e-6, atol=1e-7)


def test_mft_at_tau_0_on_a_wrong_token_ties_label_and_old_argmax() -> None:
    """tau = 0: the minimal correction makes p^C_l equal to p^C of the teacher's argmax."""
    teacher, labels = teacher_with_right_and_wrong_tokens()
    p_corrected = reference_target("mft", 0.0, teacher[0, 1], int(labels[0, 1]))
    assert p_corrected[3].item() == pytest.approx(p_corrected[1].item())
    student = torch.zeros_like(teacher, requires_grad=True)
    get_objective("mft", tau=0.0).token_losses(student, teacher, labels).sum().backward()
    p_from_grad = torch.softmax(student.detach(), -1)[0, 1] - student.grad[0, 1]  # p^C = p^S - grad
    assert p_from_grad[3].item() == pytest.approx(p_from_grad[1].item(), abs=1e-6)


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize(("name", "tau"), CASES)
def test_teacher_certain_of_the_label(name: str, tau: float | None) -> None:
    """p^T_l = 1 (one huge logit at the label): beta is 0/0 in the paper; the loss stays finite."""
    student, teacher, labels = random_batch((2, 3, 6), seed=5, ignored=0.0)
    teacher.scatter_(-1, labels.unsqueeze(-1), 1e4)
    assert (torch.softmax(teacher, -1).gather(-1, labels.unsqueeze(-1)) == 1.0).all()
    student.requires_grad_(True)
    loss = objective(name, tau).loss(student, teacher, labels)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert loss.item() == pytest.approx(reference_loss(name, tau, student.detach(), teacher, labels), rel=1e-6)
    assert loss.item() == pytest.approx(reference_loss("ft", None, student.detach(), teacher, labels), rel=1e-6)


def tied_teacher() -> tuple[torch.Tensor, torch.Tensor]:
    """One token whose label (index 2) shares the top teacher logit with index 0."""
    return torch.tensor([[[2.0, -1.0, 2.0, 0.5]]]), torch.tensor([[2]])


@pytest.mark.parametrize(("name", "tau"), CASES)
def test_tie_at_the_argmax_counts_as_teacher_right(name: str, tau: float | None) -> None:
    """Our rule: the teacher is right when the label is *a* maximizer, p_l >= p_max."""
    teacher, labels = tied_teacher()
    p_teacher = torch.softmax(teacher[0, 0], -1)
    assert p_teacher[2] == p_teacher[0] == p_teacher.max()
    student = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(6))
    loss = objective(name, tau).loss(student, teacher, labels).item()
    assert loss == pytest.approx(reference_loss(name, tau, student, teacher, labels), rel=1e-6)


def test_tie_picks_beta_not_alpha() -> None:
    """On the tie MFT uses beta (teacher right), which differs from alpha here, and distill_ft distills."""
    teacher, labels = tied_teacher()
    student = torch.zeros_like(teacher)
    p_teacher = torch.softmax(teacher[0, 0].double(), -1)
    p_label, tau = p_teacher[2].item(), 0.25
    beta = (min(1.0, p_label + tau) - p_label) / (1 - p_label)
    alpha = tau  # (p_max - p_l + tau) / (1 + p_max - p_l) with p_max = p_l
    assert abs(alpha - beta) > 0.05
    for name, w in (("mft", beta), ("distill_ft", 0.0), ("singly_corrective", 0.0)):
        p_corrected = (1 - w) * p_teacher + w * torch.nn.functional.one_hot(torch.tensor(2), 4).double()
        expected = -(p_corrected * torch.log_softmax(student[0, 0].double(), -1)).sum().item()
        assert get_objective(name).loss(student, teacher, labels).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("name", "tau"), CASES)
def test_ignored_labels_do_not_count(name: str, tau: float | None) -> None:
    student, teacher, labels = random_batch((2, 5, 9), seed=7, ignored=0.0)
    labels[0, :3] = IGNORE
    changed = student.clone()
    changed[0, :3] += 100 * torch.randn(3, 9)  # anything at ignored positions
    loss = objective(name, tau).loss(student, teacher, labels)
    torch.testing.assert_close(objective(name, tau).loss(changed, teacher, labels), loss)
    kept = labels != IGNORE
    expected = objective(name, tau).token_losses(student, teacher, labels)[kept].mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(("name", "tau"), CASES)
def test_all_ignored_batch_is_zero_with_finite_gradient(name: str, tau: float | None) -> None:
    student, teacher, _ = random_batch((2, 3, 5))
    labels = torch.full((2, 3), IGNORE)
    student.requires_grad_(True)
    loss = objective(name, tau).loss(student, teacher, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(student.grad).all() and (student.grad == 0).all()


@pytest.mark.parametrize(("name", "tau"), CASES)
def test_bfloat16_logits_are_computed_in_float32(name: str, tau: float | None) -> None:
    student, teacher, labels = random_batch((2, 6, 97), seed=8)
    student, teacher = student.bfloat16(), teacher.bfloat16()
    loss = objective(name, tau).loss(student, teacher, labels)
    assert loss.dtype == torch.float32
    # the reference sees the same bf16-rounded values, exactly upcast: float32 accuracy is expected
    expected = reference_loss(name, tau, student.float(), teacher.float(), labels)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize(("name", "tau"), CASES)
def test_gradcheck_float64(name: str, tau: float | None) -> None:
    student, teacher, labels = random_batch((2, 3, 5), seed=9)
    student = student.double().requires_grad_(True)
    teacher = teacher.double()
    loss_fn = objective(name, tau).loss
    assert torch.autograd.gradcheck(lambda s: loss_fn(s, teacher, labels), (student,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 3, 2), (2, 4, 13)])
@pytest.mark.parametrize(("name", "tau"), CASES)
def test_gradient_is_p_student_minus_p_corrected(name: str, tau: float | None, shape: tuple[int, int, int]) -> None:
    """d/dz^S of CE(p^C, softmax(z^S)) = softmax(z^S) - p^C, per token (0 at ignored ones)."""
    student, teacher, labels = random_batch(shape, seed=10)
    student = student.double().requires_grad_(True)
    objective(name, tau).token_losses(student, teacher.double(), labels).sum().backward()
    p_student = torch.softmax(student.detach(), dim=-1)
    for b in range(shape[0]):
        for t in range(shape[1]):
            label = int(labels[b, t])
            expected = (
                torch.zeros(shape[2], dtype=torch.float64)
                if label == IGNORE
                else p_student[b, t] - reference_target(name, tau, teacher[b, t], label)
            )
            torch.testing.assert_close(student.grad[b, t], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "tau"), CASES)
def test_teacher_receives_no_gradient(name: str, tau: float | None) -> None:
    student, teacher, labels = random_batch((2, 3, 5), seed=11)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    objective(name, tau).loss(student, teacher, labels).backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_tau_is_validated() -> None:
    from pydantic import ValidationError

    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValidationError):
            get_objective("mft", tau=bad)
    with pytest.raises(ValidationError):
        get_objective("mft", taux=0.5)
