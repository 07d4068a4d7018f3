"""The projected teacher cache (issue 24): CE(p^T, p^S) = logsumexp(z^S) - h^S . u - b . p^T with
u = W^T p^T, and its gradient, against the naive loss on random tensors (bias, logit scale, ignored
labels, tau 0 and 1, ties at the top); on the shipped model, LoRA+MFT and QLoRA+MFT runs with the
projected cache against the online teacher; the layout chosen by ``teacher_cache: {}`` and the
refusals where the identity does not hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mft_plugin import get_objective, run
from mft_plugin.cli import main
from mft_plugin.config.errors import validate_config
from mft_plugin.data.batches import FT_LOSS_COLUMN
from mft_plugin.data.labels import shift_for_causal_lm
from mft_plugin.loss.chunked import ChunkedLoss, chunked_token_losses
from mft_plugin.loss.corrected import masked_mean
from mft_plugin.loss.projected import projected_cross_entropy, subtract_teacher_gradient_
from mft_plugin.models.heads import UnfusableError, output_head
from mft_plugin.teacher.cache import cache_layout, open_fields, teacher_cache_key, write_cache
from mft_plugin.teacher.hidden_states import HiddenStates
from mft_plugin.teacher.projected import Projected, project
from mft_plugin.teacher.sources import SharedBaseTeacher
from mft_plugin.teacher.views import ProjectedTeacher
from tests.test_chunked_loss import HIDDEN, TOKENS, VOCAB, tiny_llama
from tests.test_exactness import with_bias_head
from tests.test_objectives import IGNORE, objective
from tests.test_teacher_cache import COLLATOR, assert_trains_like_the_online_teacher, blocks, training_batch
from tests.tiny import DATA, REFERENCE_MODEL, write_corpus, write_yaml

CASES = [("mft", 0.0), ("mft", 0.25), ("mft", 1.0), ("singly_corrective", 0.25), ("distill_ft", None)]


def tied_problem(seed: int = 0) -> dict[str, torch.Tensor]:
    """Student hidden states, a head with a bias, teacher logits with ties at the top (the label tied
    with another token, and two other tokens tied above the label) and ignored labels, in float64."""
    generator = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(shape, generator=generator, dtype=torch.float64)  # noqa: E731
    teacher_logits = make(TOKENS, VOCAB) * 3
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    top = teacher_logits.argmax(1)
    labels[:8] = top[:8]  # right
    teacher_logits[:4, (top[:4] + 1) % VOCAB] = teacher_logits[:4].amax(1)  # right, tied with another token
    teacher_logits[8:10, (labels[8:10] + 1) % VOCAB] = teacher_logits[8:10].amax(1) + 1.0
    teacher_logits[8:10, (labels[8:10] + 2) % VOCAB] = teacher_logits[8:10].amax(1)  # wrong, a tie above it
    labels[-4:] = IGNORE
    return {"hidden": make(TOKENS, HIDDEN), "weight": make(VOCAB, HIDDEN), "bias": make(VOCAB), "teacher_logits": teacher_logits, "labels": labels}


def naive_projection(p_teacher: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: float, labels: torch.Tensor) -> ProjectedTeacher:
    """u = s sum_v p^T_v W_v and s sum_v p^T_v b_v, written out as sums; p^T_l and max_v p^T_v."""
    u = scale * torch.stack([sum(p[v] * weight[v] for v in range(VOCAB)) for p in p_teacher])
    bias_dot = scale * torch.stack([sum(p[v] * bias[v] for v in range(VOCAB)) for p in p_teacher])
    safe = labels.clamp(min=0)
    return ProjectedTeacher(u, p_teacher[torch.arange(len(safe)), safe], p_teacher.amax(1), bias_dot)


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_the_identity_gives_the_cross_entropy_and_its_gradient(scale: float) -> None:
    problem = tied_problem()
    hidden = problem["hidden"].clone().requires_grad_()
    p_teacher = torch.softmax(problem["teacher_logits"], dim=1)
    logits = scale * (hidden @ problem["weight"].T + problem["bias"])
    log_p_student = torch.log_softmax(logits, dim=1)
    expected = -(p_teacher * log_p_student).sum(1)  # CE(p^T, p^S), straight from the definition
    w = torch.rand(TOKENS, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    labels = problem["labels"].clamp(min=0)
    target = naive_projection(p_teacher, problem["weight"], problem["bias"], scale, labels)
    nll = -log_p_student[torch.arange(TOKENS), labels]
    got = projected_cross_entropy(target, slice(None), hidden.detach(), logits.detach()[torch.arange(TOKENS), labels], nll.detach())
    torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-10)
    ((1 - w) * expected + w * nll).sum().backward()  # autograd's dloss/dh of the corrected loss
    p_student = log_p_student.exp().detach()
    grad = scale * (p_student - w[:, None] * torch.nn.functional.one_hot(labels, VOCAB)) @ problem["weight"]
    subtract_teacher_gradient_(target, grad, slice(None), w, torch.ones(TOKENS, dtype=torch.bool))
    torch.testing.assert_close(grad, hidden.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("name", "tau"), CASES)
def test_the_fused_loss_with_a_projected_teacher_is_the_naive_loss(name: str, tau: float | None) -> None:
    """Every label-weight objective (w rebuilt from the stored p^T_l and p^T_max), ties, a bias, -100."""
    problem = {k: v.float() if v.is_floating_point() else v for k, v in tied_problem(seed=1).items()}
    chosen, labels = objective(name, tau), problem["labels"]
    p_teacher = torch.softmax(problem["teacher_logits"], dim=1)
    target = naive_projection(p_teacher, problem["weight"], problem["bias"], 1.0, labels)
    results = []
    for teacher in (target, None):
        hidden = problem["hidden"].clone().requires_grad_()
        if teacher is not None:
            losses = chunked_token_losses(hidden, problem["weight"], labels, chosen, teacher, 5, bias=problem["bias"])
        else:
            logits = torch.nn.functional.linear(hidden, problem["weight"], problem["bias"])[None]
            losses = chosen.token_losses(logits, problem["teacher_logits"][None], labels[None])[0]
        masked_mean(losses, labels).backward()
        results.append((losses.detach(), hidden.grad))
    (got, got_grad), (expected, expected_grad) = results
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(got[labels == IGNORE], torch.zeros(4)) and torch.equal(got_grad[labels == IGNORE], torch.zeros(4, HIDDEN))


def test_a_projected_teacher_refuses_a_head_that_trains() -> None:
    problem = tied_problem()
    target = naive_projection(torch.softmax(problem["teacher_logits"], 1), problem["weight"], problem["bias"], 1.0, problem["labels"])
    with pytest.raises(ValueError, match="needs a frozen head"):
        chunked_token_losses(problem["hidden"], problem["weight"].requires_grad_(), problem["labels"], get_objective("mft"), target)


@pytest.mark.parametrize(("biased", "replay"), [(False, False), (True, True)], ids=["plain", "bias_and_replay_row"])
def test_the_projected_cache_of_a_lora_student_trains_like_the_online_teacher(tmp_path: Path, biased: bool, replay: bool) -> None:
    """Replay rows (plain NLL, w = 1) never read their u."""
    base = with_bias_head(tiny_llama(0)) if biased else tiny_llama(0)
    student = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    teacher, data, layout = SharedBaseTeacher(student), blocks(), Projected()
    write_cache(teacher, data, COLLATOR, tmp_path / "cache", layout)
    cache = layout.open(open_fields(tmp_path / "cache", layout.kind), student)
    assert ("bias_dot" in cache.fields) == biased and cache.fields["u"].array.dtype.name == "float32"
    batch = training_batch(data, [4, 1, 2])
    if replay:
        batch[FT_LOSS_COLUMN] = torch.tensor([0, 1, 0])
    assert_trains_like_the_online_teacher(lambda: student, teacher, cache, batch, chunk_size=5)


def test_under_bf16_autocast_u_is_built_with_float32_products_and_the_loss_stays_the_online_teachers(tmp_path: Path) -> None:
    """Autocast would run the float32 p^T @ W in bfloat16 (and its bits be stored as float32 garbage)."""
    p_teacher = torch.softmax(torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(0)), dim=1)
    weight, bias = torch.randn(VOCAB, HIDDEN).bfloat16(), torch.randn(VOCAB).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = project(p_teacher, weight, bias, 1.0)
    assert under_autocast[0].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(under_autocast, project(p_teacher, weight, bias, 1.0)))
    student = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    teacher, data, layout = SharedBaseTeacher(student), blocks(), Projected()
    batch = training_batch(data, [0, 3])
    labels = shift_for_causal_lm(batch["labels"])
    fused = ChunkedLoss(get_objective("mft"), output_head(student))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        write_cache(teacher, data, COLLATOR, tmp_path / "cache", layout)
        cached = masked_mean(fused(student, layout.open(open_fields(tmp_path / "cache", layout.kind), student), batch, labels), labels)
        online = masked_mean(fused(student, teacher, batch, labels), labels)
    assert cached.item() == pytest.approx(online.item(), rel=1e-3)  # bf16's rounding of the online logits


def test_teacher_cache_picks_projected_for_a_frozen_shared_head_and_hidden_states_otherwise(base_config: dict[str, Any]) -> None:
    auto = validate_config({**base_config, "teacher_cache": {}})
    lora = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    assert isinstance(cache_layout(auto, lora), Projected)
    assert isinstance(cache_layout(auto, tiny_llama(0)), HiddenStates)  # full finetuning: the head trains
    saved = get_peft_model(tiny_llama(0, tied=False), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(cache_layout(auto, saved), HiddenStates)
    forced = validate_config({**base_config, "teacher_cache": {"layout": "hidden_states"}})
    assert isinstance(cache_layout(forced, lora), HiddenStates)
    asked = validate_config({**base_config, "teacher_cache": {"layout": "projected"}})
    with pytest.raises(UnfusableError, match="full finetuning"):
        cache_layout(asked, tiny_llama(0))
    projected, hidden = teacher_cache_key(auto, blocks(), cache_layout(auto, lora)), teacher_cache_key(auto, blocks(), HiddenStates())
    assert projected != hidden


def test_a_constant_logit_scale_folds_into_the_layout_and_a_softcap_is_refused() -> None:
    lora = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    assert Projected.for_student(lora).scale == 1.0
    lora.config.logits_scaling = 4.0  # Granite divides
    assert Projected.for_student(lora).scale == 0.25
    lora.config.final_logit_softcapping = 30.0  # Gemma 2
    with pytest.raises(UnfusableError, match="softcaps its logits"):
        Projected.for_student(lora)


def refusal(tmp_path: Path, config: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> str:
    """The one problem ``mft-run --validate`` prints (exit 2, no traceback), without its ``file:line:``."""
    code = main([str(write_yaml(tmp_path / "config.yml", config)), "--validate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[0] == "invalid config:" and len(err) == 2, err
    return err[1].strip().split(": ", 1)[1]


def test_layout_projected_is_refused_where_the_identity_does_not_hold(
    base_config: dict[str, Any], weightless_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asked = {**base_config, "base_model": str(weightless_model), "teacher_cache": {"layout": "projected"}}
    assert "there is no adapter (full finetuning trains the head)" in refusal(tmp_path, asked, capsys)
    saved = {**asked, "adapter": "lora", "lora_modules_to_save": ["embed_tokens"]}  # tied: the head trains with it
    assert "lora_modules_to_save trains embed_tokens" in refusal(tmp_path, saved, capsys)
    config = json.loads((weightless_model / "config.json").read_text())
    softcapped = tmp_path / "softcapped"
    softcapped.mkdir()
    for file in weightless_model.iterdir():
        (softcapped / file.name).write_bytes(file.read_bytes())
    (softcapped / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    line = refusal(tmp_path, {**asked, "base_model": str(softcapped), "adapter": "lora"}, capsys)
    assert line.startswith("teacher_cache.layout: 'projected' cannot be used: the model softcaps its logits (final_logit_softcapping = 30.0")
    assert main([str(write_yaml(tmp_path / "ok.yml", {**asked, "adapter": "lora"})), "--validate"]) == 0


# ---------------------------------------------------------------- whole runs on the shipped model


def step_losses(output_dir: str) -> list[float]:
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def shipped_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("shipped")
    return {
        "base_model": str(REFERENCE_MODEL),
        "datasets": [{"path": str(write_corpus(folder / "train.jsonl", DATA / "legal" / "train.jsonl", 16)), "type": "completion"}],
        "test_datasets": [{"path": str(write_corpus(folder / "val.jsonl", DATA / "legal" / "validation.jsonl", 4)), "type": "completion"}],
        "general_eval_datasets": [
            {"path": str(write_corpus(folder / "general.jsonl", DATA / "general" / "validation.jsonl", 4)), "type": "completion"}
        ],
        "sequence_len": 64, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 2, "eval_steps": 2,
        "learning_rate": 5e-3, "logging_steps": 1, "seed": 0, "objective": {"name": "mft", "tau": 0.25},
    }


@pytest.mark.skipif(not (REFERENCE_MODEL / "model.safetensors").exists(), reason="the shipped model is not built")
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_lora_and_qlora_mft_with_the_projected_cache_train_as_with_the_online_teacher(
    shipped_config: dict[str, Any], tmp_path: Path, quantized: bool
) -> None:
    config = {**shipped_config, "mitigations": [{"name": "lora", "r": 4, "target_modules": "all-linear"}]}
    if quantized:
        config = {**config, "load_in_4bit": True}
    online = run(validate_config({**config, "output_dir": str(tmp_path / "online")}))
    cached = run(validate_config({**config, "output_dir": str(tmp_path / "cached"), "teacher_cache": {"path": str(tmp_path / "caches")}}))
    (folder,) = (tmp_path / "caches").iterdir()
    assert json.loads((folder / "meta.json").read_text())["kind"] == "projected"
    expected, got = step_losses(str(tmp_path / "online")), step_losses(str(tmp_path / "cached"))
    assert len(got) == len(expected) == 2
    assert got == pytest.approx(expected, rel=1e-5)
    for key in ("eval_spec_ppl", "eval_general_ppl"):
        assert cached[key] == pytest.approx(online[key], rel=1e-6), key
    for key in ("eval_S", "eval_DG"):  # small differences of perplexities (2 steps): compared absolutely
        assert cached[key] == pytest.approx(online[key], abs=1e-6), key
    assert cached["eval_DG/S"] == pytest.approx(online["eval_DG/S"], rel=1e-3)  # a ratio of two such (S ~ 0.02)
