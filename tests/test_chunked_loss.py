"""The chunked loss fused with the LM head against the plain objective (``Objective.token_losses``).

The reference is the naive path: logits ``hidden @ weight.T`` materialized, the objective's own
``token_losses`` (itself tested against the paper's formulas in ``test_objectives``), autograd for
the gradients. The chunked path must give the same per-token losses and the same gradients w.r.t.
the hidden states and the head weight, for every objective, chunk size and dtype.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from mft_plugin import get_objective
from mft_plugin.loss.chunked import ChunkedLoss, chunked_token_losses, is_label_weight_objective, select_loss_impl
from mft_plugin.models.heads import UnfusableError, default_chunk_size, head_inputs, output_head
from mft_plugin.teacher.views import TeacherHead, TeacherLogits
from mft_plugin.data.batches import FT_LOSS_COLUMN
from mft_plugin.loss.plain import plain_token_losses
from mft_plugin.config.errors import ConfigError, validate_config
from mft_plugin.data.labels import shift_for_causal_lm
from mft_plugin.loss.corrected import masked_mean, nll_token_losses
from mft_plugin.strategy import Objective
from mft_plugin.teacher.sources import FrozenCopyTeacher, SharedBaseTeacher
from tests.test_objectives import CASES, IGNORE, objective
from tests.tiny import REPO

TOKENS, HIDDEN, VOCAB = 23, 8, 37  # prime sizes: chunks never divide them evenly
CHUNK_SIZES = [1, 4, 7, TOKENS, TOKENS + 5]


def random_problem(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Student and teacher hidden states and heads; half the labels are the teacher's argmax, some ignored."""
    generator = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(shape, generator=generator)  # noqa: E731
    hidden, weight = make(TOKENS, HIDDEN), make(VOCAB, HIDDEN)
    teacher_hidden, teacher_weight = make(TOKENS, HIDDEN), make(VOCAB, HIDDEN)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    right = torch.rand(TOKENS, generator=generator) < 0.5
    labels = torch.where(right, (teacher_hidden @ teacher_weight.T).argmax(-1), labels)
    labels[torch.rand(TOKENS, generator=generator) < 0.25] = IGNORE
    tensors = {"hidden": hidden, "weight": weight, "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight}
    return {**{k: v.to(dtype) for k, v in tensors.items()}, "labels": labels}


def naive(problem: dict[str, torch.Tensor], name: str, tau: float | None) -> tuple[torch.Tensor, ...]:
    """Token losses and the gradients of their mean w.r.t. (hidden, weight), the plain way."""
    hidden = problem["hidden"].clone().requires_grad_()
    weight = problem["weight"].clone().requires_grad_()
    teacher_logits = (problem["teacher_hidden"] @ problem["teacher_weight"].T)[None]
    chosen = objective(name, tau)
    teacher_logits = teacher_logits if chosen.needs_teacher else None
    losses = chosen.token_losses((hidden @ weight.T)[None], teacher_logits, problem["labels"][None])
    masked_mean(losses, problem["labels"][None]).backward()
    return losses[0].detach(), hidden.grad, weight.grad


def chunked(problem: dict[str, torch.Tensor], name: str, tau: float | None, chunk_size: int | None, **kwargs: Any):
    hidden = problem["hidden"].clone().requires_grad_()
    weight = problem["weight"].clone().requires_grad_()
    chosen = objective(name, tau)
    teacher = TeacherHead(problem["teacher_hidden"], problem["teacher_weight"]) if chosen.needs_teacher else None
    losses = chunked_token_losses(hidden, weight, problem["labels"], chosen, teacher, chunk_size, **kwargs)
    masked_mean(losses, problem["labels"]).backward()
    return losses.detach(), hidden.grad, weight.grad


def test_problems_hold_right_wrong_and_ignored_tokens() -> None:
    """Guard for the tests below: the teacher is right on some labelled tokens, wrong on others."""
    problem = random_problem()
    labels = problem["labels"]
    right = (problem["teacher_hidden"] @ problem["teacher_weight"].T).argmax(-1) == labels
    assert right.any() and (~right & (labels != IGNORE)).any() and (labels == IGNORE).any()


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize(("name", "tau"), CASES)
def test_matches_the_plain_objective_in_float32(name: str, tau: float | None, chunk_size: int) -> None:
    problem = random_problem(seed=chunk_size)
    for got, expected in zip(chunked(problem, name, tau, chunk_size), naive(problem, name, tau)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "tau"), CASES)
def test_matches_the_plain_objective_in_bfloat16(name: str, tau: float | None) -> None:
    """bf16 hidden states and head: the same bf16 logits, float32 softmaxes, bf16 gradients."""
    problem = random_problem(torch.bfloat16, seed=5)
    got, expected = chunked(problem, name, tau, 5), naive(problem, name, tau)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)  # from identical bf16 logits
    for grad, reference in zip(got[1:], expected[1:]):  # bf16 rounding of the gradient: 2^-8 relative
        torch.testing.assert_close(grad.float(), reference.float(), rtol=2e-2, atol=2e-2 * reference.abs().max().item())


def test_gradients_pass_gradcheck_in_float64() -> None:
    problem = random_problem(torch.float64, seed=2)
    teacher = TeacherHead(problem["teacher_hidden"], problem["teacher_weight"])

    def loss(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return chunked_token_losses(hidden, weight, problem["labels"], get_objective("mft"), teacher, 6).sum()

    inputs = (problem["hidden"].requires_grad_(), problem["weight"].requires_grad_())
    assert torch.autograd.gradcheck(loss, inputs)


def test_teacher_as_logits_or_as_hidden_states_and_head_agree() -> None:
    problem = random_problem(seed=3)
    mft = get_objective("mft")
    head = TeacherHead(problem["teacher_hidden"], problem["teacher_weight"])
    logits = TeacherLogits(problem["teacher_hidden"] @ problem["teacher_weight"].T)
    by_head = chunked_token_losses(problem["hidden"], problem["weight"], problem["labels"], mft, head, 4)
    by_logits = chunked_token_losses(problem["hidden"], problem["weight"], problem["labels"], mft, logits, 9)
    torch.testing.assert_close(by_head, by_logits, rtol=1e-6, atol=1e-6)


def test_nll_rows_train_on_plain_nll() -> None:
    problem = random_problem(seed=4)
    nll_rows = torch.arange(TOKENS) % 3 == 0
    losses, *_ = chunked(problem, "mft", 0.25, 5, nll_rows=nll_rows)
    mft_losses, *_ = naive(problem, "mft", 0.25)
    nll = nll_token_losses((problem["hidden"] @ problem["weight"].T)[None], problem["labels"][None])[0]
    torch.testing.assert_close(losses, torch.where(nll_rows, nll, mft_losses), rtol=1e-5, atol=1e-6)


class CountingTeacher(TeacherHead):
    """A teacher head that records the chunks it computes p^T for."""

    def chunk(self, rows: slice, labels: torch.Tensor, out: torch.Tensor, log_p_student: torch.Tensor | None = None):
        self.read.append(rows.start)
        return super().chunk(rows, labels, out, log_p_student)


def test_chunks_of_nll_rows_only_skip_the_teacher_and_keep_the_gradient() -> None:
    """Replay rows (w = 1) do not read p^T: a chunk made of them alone skips the teacher's head product."""
    problem = random_problem(seed=5)
    nll_rows = torch.arange(TOKENS) < 10  # chunks of 5: the first two are all w = 1, the third is mixed
    teacher = CountingTeacher(problem["teacher_hidden"], problem["teacher_weight"])
    object.__setattr__(teacher, "read", [])
    hidden, weight = problem["hidden"].clone().requires_grad_(), problem["weight"].clone().requires_grad_()
    losses = chunked_token_losses(hidden, weight, problem["labels"], objective("mft", 0.25), teacher, 5, nll_rows=nll_rows)
    masked_mean(losses, problem["labels"]).backward()
    assert teacher.read == [10, 15, 20]
    expected_hidden, expected_weight = problem["hidden"].clone().requires_grad_(), problem["weight"].clone().requires_grad_()
    mft = objective("mft", 0.25)
    logits, teacher_logits = (expected_hidden @ expected_weight.T)[None], (problem["teacher_hidden"] @ problem["teacher_weight"].T)[None]
    labels = problem["labels"][None]
    expected = torch.where(nll_rows, nll_token_losses(logits, labels)[0], mft.token_losses(logits, teacher_logits, labels)[0])
    masked_mean(expected, problem["labels"]).backward()
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, expected_hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, expected_weight.grad, rtol=1e-5, atol=1e-6)


def test_all_labels_ignored_gives_zero_loss_and_gradient() -> None:
    problem = {**random_problem(seed=6), "labels": torch.full((TOKENS,), IGNORE)}
    losses, grad_hidden, grad_weight = chunked(problem, "mft", 0.25, 4)
    assert not losses.any() and not grad_hidden.any() and not grad_weight.any()


def test_a_frozen_head_gets_no_gradient_and_hidden_states_still_do() -> None:
    problem = random_problem(seed=7)
    hidden = problem["hidden"].clone().requires_grad_()
    teacher = TeacherHead(problem["teacher_hidden"], problem["teacher_weight"])
    losses = chunked_token_losses(hidden, problem["weight"], problem["labels"], get_objective("mft"), teacher, 5)
    masked_mean(losses, problem["labels"]).backward()
    torch.testing.assert_close(hidden.grad, naive(problem, "mft", 0.25)[1], rtol=1e-5, atol=1e-6)


def test_per_token_weights_are_refused_rather_than_given_a_wrong_head_gradient() -> None:
    problem = random_problem(seed=8)
    weight = problem["weight"].clone().requires_grad_()
    losses = chunked_token_losses(problem["hidden"], weight, problem["labels"], get_objective("ft"), None, 4)
    with pytest.raises(RuntimeError, match="loss_impl: naive"):
        (losses * torch.linspace(0.5, 1.5, TOKENS)).sum().backward()


def test_teacher_objectives_refuse_a_missing_teacher() -> None:
    problem = random_problem()
    with pytest.raises(ValueError, match="needs a teacher"):
        chunked_token_losses(problem["hidden"], problem["weight"], problem["labels"], get_objective("mft"), None)


def test_default_chunk_holds_the_same_bytes_with_or_without_a_teacher() -> None:
    """Chunked MFT's [chunk, V] buffers (three) weigh what fused cross-entropy's (one) do."""
    for tokens, vocab in [(10**6, 4096), (10**6, 32768), (10**6, 131072), (1024, 4096), (100, 32768)]:
        alone, with_teacher = default_chunk_size(tokens, vocab, False), default_chunk_size(tokens, vocab, True)
        assert alone <= 3 * with_teacher < alone + 3
        assert with_teacher >= min(128, tokens / 3)
    assert default_chunk_size(10, 32768, True) == 4 and default_chunk_size(10, 32768, False) == 10


# ---------------------------------------------------------------- on a model: the trainer's fused path


def tiny_llama(seed: int, tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 6:] = 0  # a padded row
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_fused_matches_plain(
    student: torch.nn.Module, teacher: Any, ft_rows: torch.Tensor | None = None, in_head: bool = False
) -> None:
    """``in_head``: the loss computed inside the head's forward (FSDP2, ZeRO-3), the teacher's head copied."""
    inputs, mft = batch(), get_objective("mft", tau=0.25)
    if ft_rows is not None:
        inputs[FT_LOSS_COLUMN] = ft_rows
    labels = shift_for_causal_lm(inputs["labels"])
    logits = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    plain = plain_token_losses(mft, teacher, logits, inputs, labels)
    masked_mean(plain, labels).backward()
    expected = gradients(student)
    student.zero_grad()
    if teacher is not None:
        teacher.copies_head = in_head
    fused = ChunkedLoss(mft, output_head(student), chunk_size=5, in_head=in_head)(student, teacher, inputs, labels)
    masked_mean(fused, labels).backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    got = gradients(student)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


IN_HEAD = pytest.mark.parametrize("in_head", [False, True], ids=["after_forward", "in_head"])


@IN_HEAD
@pytest.mark.parametrize("tied", [True, False])
def test_fused_path_matches_plain_path_with_a_frozen_copy_teacher(tied: bool, in_head: bool) -> None:
    student, teacher = tiny_llama(0, tied), FrozenCopyTeacher(tiny_llama(1, tied))
    assert_fused_matches_plain(student, teacher, in_head=in_head)


@IN_HEAD
def test_fused_path_keeps_plain_nll_rows_and_runs_the_teacher_on_the_others_only(in_head: bool) -> None:
    student, teacher = tiny_llama(0), FrozenCopyTeacher(tiny_llama(1))
    assert_fused_matches_plain(student, teacher, ft_rows=torch.tensor([0, 1, 0]), in_head=in_head)


@IN_HEAD
def test_fused_path_matches_plain_path_with_the_shared_base_teacher_of_lora(in_head: bool) -> None:
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # adapters != base
    student = get_peft_model(tiny_llama(0), lora)
    assert_fused_matches_plain(student, SharedBaseTeacher(student), in_head=in_head)


def test_in_head_the_teachers_view_outlives_a_head_weight_freed_after_its_forward() -> None:
    """As FSDP2 frees a gathered weight's storage after the head's forward (here: zeroed), the teacher's
    view keeps a copy of what the forward saw; without the copy it would read the freed weight."""
    inputs, frozen = batch(), tiny_llama(1)
    expected = FrozenCopyTeacher(tiny_llama(1)).logits(inputs).flatten(0, 1).softmax(-1)
    frozen.lm_head.register_forward_hook(lambda module, args, output: module.weight.data.zero_())
    teacher = FrozenCopyTeacher(frozen)
    teacher.copies_head = True
    view = teacher.targets(inputs)
    p_teacher = torch.empty_like(expected)
    view.chunk(slice(0, expected.shape[0]), torch.zeros(expected.shape[0], dtype=torch.long), p_teacher)
    torch.testing.assert_close(p_teacher, expected, rtol=1e-5, atol=1e-7)
    assert not view.weight.eq(0).all() and frozen.lm_head.weight.eq(0).all()


def test_in_head_a_model_that_changes_its_heads_output_is_refused() -> None:
    from tests.test_exactness import scaled_llama

    inputs, model = batch(), scaled_llama(0.5)
    labels = shift_for_causal_lm(inputs["labels"])
    fused = ChunkedLoss(get_objective("mft"), output_head(model), in_head=True)
    with pytest.raises(UnfusableError, match="its logits are not its head's output"):
        fused(model, FrozenCopyTeacher(scaled_llama(0.5)), inputs, labels)
    assert "forward" not in model.lm_head.__dict__  # the head's own forward is back


def test_under_bf16_autocast_the_chunks_use_the_heads_bf16_logits() -> None:
    """Mixed precision (``bf16: true``): the plain head makes bf16 logits, so must the chunks."""
    student, teacher, mft, inputs = tiny_llama(0), FrozenCopyTeacher(tiny_llama(1)), get_objective("mft"), batch()
    labels = shift_for_causal_lm(inputs["labels"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        plain = plain_token_losses(mft, teacher, logits, inputs, labels)
        fused = ChunkedLoss(mft, output_head(student), chunk_size=5)(student, teacher, inputs, labels)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=2e-2)
    for autocast, dtype in [(True, torch.bfloat16), (False, torch.float32)]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), head_inputs(output_head(student)) as captured:
            student(input_ids=inputs["input_ids"])
        assert captured.compute_dtype == dtype


def test_a_head_that_is_not_a_plain_linear_cannot_be_fused() -> None:
    adapted_head = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(UnfusableError, match="not a torch.nn.Linear"):
        output_head(adapted_head)
    scaled = tiny_llama(0)
    scaled.config.output_multiplier_scale = 2.0  # a known change of the logits that is not fused
    with pytest.raises(UnfusableError, match="output_multiplier_scale = 2.0"):
        output_head(scaled)


class OwnLossObjective(Objective):
    """A plugin objective outside the label-weight family."""

    name = "own_loss"

    def token_losses(self, student_logits: torch.Tensor, teacher_logits: Any, labels: torch.Tensor) -> torch.Tensor:
        return nll_token_losses(student_logits, labels) ** 2


def test_builtin_objectives_are_label_weight_objectives_and_an_own_loss_is_not() -> None:
    assert all(is_label_weight_objective(objective(name, tau)) for name, tau in CASES)
    assert not is_label_weight_objective(OwnLossObjective())


# ---------------------------------------------------------------- selection: loss_impl


def test_auto_picks_chunked_and_falls_back_to_naive_where_it_cannot_apply(base_config: dict[str, Any]) -> None:
    mft, model = get_objective("mft"), tiny_llama(0)
    assert isinstance(select_loss_impl(validate_config(base_config), mft, model), ChunkedLoss)
    assert select_loss_impl(validate_config({**base_config, "loss_impl": "naive"}), mft, model) is None
    assert select_loss_impl(validate_config(base_config), OwnLossObjective(), model) is None
    for engine in ({"fsdp": True}, {"deepspeed": str(REPO / "yaml_examples/deepspeed/zero3.json")}):
        for cache in ({}, {"teacher_cache": {}}):  # no engine refuses the fused loss or the teacher cache
            sharded = select_loss_impl(validate_config({**base_config, **engine, **cache}), mft, model)
            assert isinstance(sharded, ChunkedLoss) and sharded.in_head  # inside the head's forward, where it is gathered
    assert not select_loss_impl(validate_config(base_config), mft, model).in_head


def test_explicit_chunked_or_a_cache_fails_where_chunked_cannot_apply(base_config: dict[str, Any]) -> None:
    with pytest.raises(UnfusableError, match="loss_impl: chunked cannot be used: objective 'own_loss'"):
        select_loss_impl(validate_config({**base_config, "loss_impl": "chunked"}), OwnLossObjective(), tiny_llama(0))
    cached = validate_config({**base_config, "teacher_cache": {"top_k": 8}})
    with pytest.raises(UnfusableError, match="teacher_cache needs the chunked loss"):
        select_loss_impl(cached, get_objective("mft"), get_peft_model(tiny_llama(0), LoraConfig(target_modules=["lm_head"])))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"loss_impl": "fused"}, "loss_impl: Input should be 'auto', 'naive' or 'chunked'"),
        ({"loss_impl": "naive", "teacher_cache": {}}, "teacher_cache needs the chunked loss"),
        ({"teacher_cache": {"top_k": 0}}, "teacher_cache.top_k: Input should be greater than or equal to 1"),
        ({"teacher_cache": {"topk": 8}}, "teacher_cache.topk: unknown key"),
    ],
)
def test_loss_keys_are_validated(base_config: dict[str, Any], extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config({**base_config, **extra})
