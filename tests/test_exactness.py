"""Exactness under real precision (issue 13): a head with a bias, a probe that refuses to fuse a model
whose logits are not its head's, -inf vocabulary entries and NaN at ignored positions, the chunk size,
the loss as a mean over the tokens of a whole step, one precision for the base, the teacher and every
evaluation, and evaluation through the chunked head. Each against a plain reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM, TrainingArguments

from mft_plugin import get_objective, run
from mft_plugin.config.errors import validate_config
from mft_plugin.data.batches import PaddingCollator
from mft_plugin.data.labels import shift_for_causal_lm
from mft_plugin.eval.metrics import SPEC, perplexity
from mft_plugin.loss.chunked import ChunkedLoss, chunked_token_losses, select_loss_impl
from mft_plugin.loss.corrected import masked_mean
from mft_plugin.models.heads import LogitTransform, UnfusableError, default_chunk_size, fusable_head, output_head
from mft_plugin.teacher.sources import FrozenCopyTeacher, SharedBaseTeacher
from mft_plugin.teacher.views import TeacherHead
from mft_plugin.train.outputs import base_key
from tests.tiny import evaluation_rows
from mft_plugin.train.trainer import MFTTrainer
from tests.test_chunked_loss import VOCAB, assert_fused_matches_plain, batch, random_problem, tiny_llama
from tests.test_objectives import CASES, IGNORE, objective


def with_bias_head(model: LlamaForCausalLM, seed: int = 0) -> LlamaForCausalLM:
    """``model`` with an untied LM head that carries a bias (the paper's Phi models have one)."""
    generator = torch.Generator().manual_seed(seed)
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.copy_(torch.randn(old.out_features, generator=generator))
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(head)
    return model


def transformed(logits: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    """The naive reference of a model's transform after its head, as Gemma 2 and Granite write it."""
    logits = logits * transform.scale
    if transform.softcap is not None:
        logits = torch.tanh(logits / transform.softcap) * transform.softcap
    return logits


def losses_and_grads(
    problem: dict[str, torch.Tensor], name: str, tau: float | None, bias: torch.Tensor, fused: bool,
    transform: LogitTransform = LogitTransform(),
):
    hidden, weight = problem["hidden"].clone().requires_grad_(), problem["weight"].clone().requires_grad_()
    bias = bias.clone().requires_grad_()
    chosen, labels = objective(name, tau), problem["labels"]
    teacher_bias = problem.get("teacher_bias")
    if fused:
        teacher = TeacherHead(problem["teacher_hidden"], problem["teacher_weight"], teacher_bias, transform)
        teacher = teacher if chosen.needs_teacher else None
        losses = chunked_token_losses(hidden, weight, labels, chosen, teacher, 5, bias=bias, transform=transform)
    else:
        teacher_logits = transformed(torch.nn.functional.linear(problem["teacher_hidden"], problem["teacher_weight"], teacher_bias), transform)[None]
        student_logits = transformed(torch.nn.functional.linear(hidden, weight, bias), transform)[None]
        losses = chosen.token_losses(student_logits, teacher_logits if chosen.needs_teacher else None, labels[None])[0]
    masked_mean(losses, labels).backward()
    return losses.detach(), hidden.grad, weight.grad, bias.grad


@pytest.mark.parametrize(("name", "tau"), CASES)
def test_a_head_with_a_bias_is_fused_exactly(name: str, tau: float | None) -> None:
    problem = random_problem(seed=11)
    problem["teacher_bias"] = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(VOCAB, generator=torch.Generator().manual_seed(2))
    for got, expected in zip(losses_and_grads(problem, name, tau, bias, True), losses_and_grads(problem, name, tau, bias, False)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


TRANSFORMS = {
    "Granite's logits_scaling": LogitTransform(scale=1 / 4),
    "Cohere's logit_scale": LogitTransform(scale=3.0),
    "Gemma's softcap": LogitTransform(softcap=2.0),
    "a scale and a softcap": LogitTransform(scale=2.0, softcap=3.0),
}


@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize(("name", "tau"), [("ft", None), ("mft", 0.25), ("mft", 0.6)])
def test_a_scaled_or_softcapped_head_is_fused_exactly(name: str, tau: float | None, transform: LogitTransform) -> None:
    problem = random_problem(seed=14)
    problem["teacher_bias"] = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(VOCAB, generator=torch.Generator().manual_seed(2))
    if transform.softcap is not None:  # the cap bites: most logits lie beyond it
        assert (transform.scale * problem["hidden"] @ problem["weight"].T).abs().gt(transform.softcap).float().mean() > 0.3
    fused = losses_and_grads(problem, name, tau, bias, True, transform)
    for got, expected in zip(fused, losses_and_grads(problem, name, tau, bias, False, transform)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    untransformed = losses_and_grads(problem, name, tau, bias, False)
    assert not torch.allclose(fused[0], untransformed[0], rtol=1e-2)


def test_a_model_with_a_biased_head_trains_fused_as_it_does_plain() -> None:
    student = with_bias_head(tiny_llama(0))
    assert "lm_head.bias" in dict(student.named_parameters())
    assert_fused_matches_plain(student, FrozenCopyTeacher(with_bias_head(tiny_llama(1), seed=1)))


class SecretlyScaledLlama(LlamaForCausalLM):
    """Scales its logits after the head under a config key the code does not know (as Falcon-H1's
    ``lm_head_multiplier`` does)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = super().forward(*args, **kwargs)
        outputs.logits = outputs.logits * self.config.my_head_multiplier
        return outputs


def scaled_llama(multiplier: float) -> SecretlyScaledLlama:
    model = tiny_llama(0)
    model.config.my_head_multiplier = multiplier
    scaled = SecretlyScaledLlama(model.config)
    scaled.load_state_dict(model.state_dict())
    return scaled


def test_the_probe_refuses_a_model_that_changes_its_logits_after_the_head(base_config: dict[str, Any]) -> None:
    assert output_head(scaled_llama(0.5)) is not None  # no known key says so: only the probe can tell
    with pytest.raises(UnfusableError, match="not its head applied to its final hidden states"):
        fusable_head(scaled_llama(0.5))
    fusable_head(scaled_llama(1.0))  # the identity passes
    fusable_head(with_bias_head(tiny_llama(0)))
    mft = get_objective("mft")
    assert select_loss_impl(validate_config(base_config), mft, scaled_llama(0.5)) is None  # auto: the plain loss
    with pytest.raises(UnfusableError, match="loss_impl: chunked cannot be used: its logits are not its head"):
        select_loss_impl(validate_config({**base_config, "loss_impl": "chunked"}), mft, scaled_llama(0.5))


def test_a_softcap_and_a_scale_in_a_nested_text_config_are_read() -> None:
    model = tiny_llama(0)
    text_config = type(model.config)(**model.config.to_dict())
    text_config.final_logit_softcapping, text_config.logits_scaling = 30.0, 4.0
    model.config.get_text_config = lambda *args, **kwargs: text_config
    assert LogitTransform.of(model) == LogitTransform(scale=0.25, softcap=30.0)
    text_config.output_multiplier_scale = 2.0
    with pytest.raises(UnfusableError, match="output_multiplier_scale"):
        output_head(model)


# ---------------------------------------------------------------- -inf entries, NaN at ignored positions


def masked_entry_problem() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A problem whose vocabulary entry 3 both models give -inf (no label is 3); its reference without entry 3."""
    problem = random_problem(seed=12)
    problem["labels"] = torch.where(problem["labels"] == 3, 4, problem["labels"])
    bias = torch.zeros(VOCAB)
    bias[3] = -torch.inf
    problem["teacher_bias"] = bias
    keep = torch.arange(VOCAB) != 3
    reference = {**problem, "weight": problem["weight"][keep], "teacher_weight": problem["teacher_weight"][keep],
                 "teacher_bias": bias[keep], "labels": torch.where(problem["labels"] > 3, problem["labels"] - 1, problem["labels"])}
    return problem, bias, reference


@pytest.mark.parametrize("fused", [True, False])
def test_an_entry_both_models_mask_with_minus_inf_gives_the_loss_without_it(fused: bool) -> None:
    problem, bias, reference = masked_entry_problem()
    losses, grad_hidden, grad_weight, _ = losses_and_grads(problem, "mft", 0.25, bias, fused)
    expected, expected_hidden, expected_weight, _ = losses_and_grads(reference, "mft", 0.25, bias[bias.isfinite()], False)
    assert losses.isfinite().all()
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_hidden, expected_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_weight[torch.arange(VOCAB) != 3], expected_weight, rtol=1e-5, atol=1e-6)
    assert not grad_weight[3].any()


@pytest.mark.parametrize("fused", [True, False])
def test_nan_at_ignored_positions_gives_the_loss_without_them(fused: bool) -> None:
    problem = random_problem(seed=13)
    ignored = problem["labels"] == IGNORE
    poisoned = {**problem, "hidden": problem["hidden"].masked_fill(ignored.unsqueeze(1), torch.nan),
                "teacher_hidden": problem["teacher_hidden"].masked_fill(ignored.unsqueeze(1), torch.nan)}
    clean = {**problem, "hidden": problem["hidden"].masked_fill(ignored.unsqueeze(1), 0.0)}
    zero_bias = torch.zeros(VOCAB)
    losses, grad_hidden, grad_weight, _ = losses_and_grads(poisoned, "mft", 0.25, zero_bias, fused)
    expected, expected_hidden, expected_weight, _ = losses_and_grads(clean, "mft", 0.25, zero_bias, False)
    assert losses.isfinite().all() and not losses[ignored].any()
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_hidden[~ignored], expected_hidden[~ignored], rtol=1e-5, atol=1e-6)
    if fused:  # the plain path's autograd carries the NaN logits' 0 * NaN into dW; the fused path does not
        assert grad_hidden.isfinite().all() and grad_weight.isfinite().all()
        torch.testing.assert_close(grad_weight, expected_weight, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- chunk size


def test_chunks_follow_the_vocabulary_to_hidden_ratio_above_the_floor() -> None:
    """Liger-Kernel's rule: next_power_of_2(N / ceil(V / H)) buffer rows, so a buffer weighs about what
    the hidden states do; never below the floor the CPU benchmarks were measured with."""
    tokens, vocab, hidden = 16 * 2048, 131072, 4096
    rows = default_chunk_size(tokens, vocab, False, hidden)
    assert rows == 1024 and rows * vocab <= 4 * tokens * hidden
    assert default_chunk_size(tokens, vocab, True, hidden) == 342
    for tokens, vocab in [(1024, 4096), (1024, 32768), (100, 32768)]:  # small N: the floor, as before
        assert default_chunk_size(tokens, vocab, True, 256) == default_chunk_size(tokens, vocab, True)


# ---------------------------------------------------------------- the trainer: a step's mean, one precision


def uneven_rows() -> Dataset:
    """Rows of very different lengths: after padding, very different label counts."""
    generator = torch.Generator().manual_seed(0)
    lengths = [30, 3, 17, 5]
    return Dataset.from_dict({"input_ids": [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]})


def trainer_for(model: torch.nn.Module, tmp_path: Path, teacher: Any = None, objective: str = "ft", **args: Any) -> MFTTrainer:
    arguments = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
        max_steps=1, save_strategy="no", logging_steps=1, seed=0, **args,
    )
    return MFTTrainer(
        model=model, args=arguments, train_dataset=uneven_rows(), data_collator=PaddingCollator(pad_token_id=0),
        objective=get_objective(objective), teacher=teacher,
    )


@pytest.mark.parametrize("fused", [True, False])
def test_one_micro_batch_of_four_equals_two_of_two_with_accumulation(tmp_path: Path, fused: bool) -> None:
    """The loss is the mean over the labelled tokens of the whole step (num_items_in_batch), not a mean
    of micro-batch means, which would weigh the tokens of short rows up."""
    weights = []
    for micro, accumulation in [(4, 1), (2, 2)]:
        model = tiny_llama(0)
        trainer = trainer_for(model, tmp_path / f"{micro}", per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation)
        trainer.chunked_loss = ChunkedLoss(trainer.objective, output_head(model)) if fused else None
        trainer.train()
        weights.append({name: p.detach().clone() for name, p in model.named_parameters()})
    reference = tiny_llama(0)
    rows = PaddingCollator(pad_token_id=0)(list(uneven_rows()))
    labels = shift_for_causal_lm(rows["labels"])
    logits = reference(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    masked_mean(get_objective("ft").token_losses(logits, None, labels), labels).backward()
    for name, p in reference.named_parameters():
        expected = p.detach() - 0.1 * p.grad
        for got in weights:
            torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-6, msg=name)


def autocast_seen(model: torch.nn.Module) -> list[bool]:
    """Records, at each forward of ``model``'s first linear layer, whether CPU autocast is on."""
    seen: list[bool] = []
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    layer.register_forward_pre_hook(lambda module, args: seen.append(torch.is_autocast_enabled("cpu")))
    return seen


def test_both_teachers_run_in_the_students_autocast(tmp_path: Path) -> None:
    inputs = batch()
    frozen = FrozenCopyTeacher(tiny_llama(1))
    lora = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    seen = {}
    for name, model, teacher in [("frozen copy", tiny_llama(0), frozen), ("shared base", lora, SharedBaseTeacher(lora))]:
        trainer = trainer_for(model, tmp_path / name, teacher, "mft", bf16=True)
        seen[name] = autocast_seen(teacher.model)
        trainer.compute_loss(model, inputs)
    assert seen["frozen copy"] == [True] and seen["shared base"][-1:] == [True]
    own = FrozenCopyTeacher(tiny_llama(1).to(torch.bfloat16), own_dtype=True)  # teacher: {dtype: bfloat16}
    trainer = trainer_for(tiny_llama(0), tmp_path / "own", own, "mft", bf16=True)
    seen_own = autocast_seen(own.model)
    trainer.compute_loss(trainer.model, inputs)
    assert seen_own == [False]


def test_a_bf16_run_measures_its_base_as_it_measures_its_evaluations(base_config: dict[str, Any]) -> None:
    """An unchanged model evaluated through the normal path of a bf16 run: S = DG = 0 exactly. (A learning rate
    of 1e-30 moves no float32 weight: each AdamW update is ~1e-30, far below the weights' rounding step.)"""
    metrics = run(validate_config({**base_config, "bf16": True, "learning_rate": 1e-30, "max_steps": 2, "eval_steps": 2}))
    assert metrics["eval_S"] == 0.0 and metrics["eval_DG"] == 0.0
    assert metrics["eval_spec_ppl"] == metrics["base_spec_ppl"]


def test_the_base_cache_key_holds_precision_quantization_and_attention(base_config: dict[str, Any], tmp_path: Path) -> None:
    rows = evaluation_rows(base_config, tmp_path)
    plain = base_key(validate_config(base_config), rows)
    assert plain == base_key(validate_config(base_config), rows)
    for changed in ({"bf16": True}, {"fp16": True}, {"attn_implementation": "eager"}, {"sdp_attention": True}):
        assert plain != base_key(validate_config({**base_config, **changed}), rows), changed
    lora = {**base_config, "mitigations": [{"name": "lora", "r": 2}]}
    assert base_key(validate_config(lora), rows) != base_key(validate_config({**lora, "load_in_4bit": True}), rows)


def test_evaluation_through_the_chunked_head_equals_the_logits_path(tiny_model: Path, tmp_path: Path) -> None:
    model = with_bias_head(LlamaForCausalLM.from_pretrained(tiny_model))
    rows = PaddingCollator(pad_token_id=2)(list(uneven_rows()))
    trainer = trainer_for(model, tmp_path)
    plain = perplexity(model, [rows], trainer.accelerator)
    chunked = perplexity(model, [rows], trainer.accelerator, fusable_head(model))
    assert chunked == pytest.approx(plain, rel=1e-6) and chunked != plain * (1 + 1e-3)
    trainer.chunked_loss, trainer.eval_sets = ChunkedLoss(trainer.objective, fusable_head(model)), {SPEC: uneven_rows()}
    logits_made = []
    model.lm_head.register_forward_hook(lambda module, args, out: logits_made.append(out.shape[-2]))
    assert trainer.perplexities()[SPEC] == pytest.approx(plain, rel=1e-6)
    assert logits_made and not any(logits_made)  # the head computed logits for zero positions


# ---------------------------------------------------------------- evaluation does no gradient work


def test_under_no_grad_the_fused_loss_does_no_head_gradient_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation (``torch.no_grad``) of a trainable head: the same losses, and neither the [V, H]
    gradient buffer nor any chunk's gradient (``ctx.needs_input_grad`` alone ignores grad mode)."""
    import mft_plugin.loss.chunked as chunked

    problem = random_problem(seed=15)
    hidden, weight = problem["hidden"].requires_grad_(), problem["weight"].requires_grad_()
    teacher = TeacherHead(problem["teacher_hidden"], problem["teacher_weight"])
    expected = chunked_token_losses(hidden, weight, problem["labels"], objective("mft", 0.25), teacher, 5).detach()
    calls: list[str] = []
    for name in ("_logit_gradient_", "_accumulate_product"):
        original = getattr(chunked, name)
        monkeypatch.setattr(chunked, name, lambda *args, _name=name, _original=original: calls.append(_name) or _original(*args))
    with torch.no_grad():
        got = chunked_token_losses(hidden, weight, problem["labels"], objective("mft", 0.25), teacher, 5)
    assert torch.equal(got, expected) and calls == []
    chunked_token_losses(hidden, weight, problem["labels"], objective("mft", 0.25), teacher, 5)  # with grad: it does
    assert "_accumulate_product" in calls


# ---------------------------------------------------------------- fp16: the loss scale before the cast


def tail_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states, a head (weight and bias) and labels where the last 8 vocabulary entries get p^S
    below fp16's smallest subnormal (6e-8) at every token."""
    problem = random_problem(seed=16)
    weight, bias = problem["weight"].clone(), torch.zeros(VOCAB)
    weight[-8:] *= 0.01
    bias[-8:] = -14.0
    return problem["hidden"], weight, bias, torch.where(problem["labels"] >= VOCAB - 8, 0, problem["labels"])


@pytest.mark.parametrize("token_gradient", [2.0**11, 1.0 / 17])
def test_fp16_scales_the_gradient_before_casting_it(token_gradient: float) -> None:
    """An fp16 run's loss scale S: the trainer passes S / tokens as ``grad_scale``, the gradient each token
    loss gets. The head's gradient on tail entries then survives the fp16 products, as in float32;
    without the scale (S = 1, the old behaviour, whatever S was) it is 0."""
    hidden, weight, bias, labels = tail_problem()
    count = int((labels != IGNORE).sum())
    assert count == 17

    def grads(compute_dtype: torch.dtype, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        losses = chunked_token_losses(h, w, labels, None, None, 5, compute_dtype=compute_dtype, bias=bias, grad_scale=scale / count)
        (masked_mean(losses, labels) * scale).backward()  # what a GradScaler's backward does
        return h.grad / scale, w.grad / scale

    tail_p = torch.softmax(hidden @ weight.T + bias, dim=1)[:, -8:]
    assert tail_p.max() < 6e-8 and tail_p.min() > 0
    expected_hidden, expected_weight = grads(torch.float32, 1.0)
    got_hidden, got_weight = grads(torch.float16, token_gradient * count)
    torch.testing.assert_close(got_hidden, expected_hidden, rtol=2e-2, atol=1e-4)
    if token_gradient * count == 1.0:
        assert not got_weight[-8:].any()  # flushed to zero in the fp16 product
    else:
        error = (got_weight[-8:] - expected_weight[-8:]).norm() / expected_weight[-8:].norm()
        assert error < 1e-2  # fp16's own rounding of h and of the subnormal products, nothing lost
