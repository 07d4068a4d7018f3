"""Numerics of a run: non-finite losses and gradients stop it (or are skipped and counted), and the
edge cases of the loss stay finite in the Trainer: p^T_l = 1, all-ignored batches, padded short
blocks, bf16 mixed precision.

Faults are injected by strategies registered as inline plugins (``pm.register``), exactly as a
third-party objective or mitigation would produce them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from mft_plugin import get_objective
from mft_plugin.cli import main
from mft_plugin.config.errors import load_config
from mft_plugin.data.batches import PaddingCollator
from mft_plugin.config.schema import DatasetConfig
from mft_plugin.data.packing import raw_text_blocks
from mft_plugin.hookspecs import hookimpl
from mft_plugin.data.labels import shift_for_causal_lm
from mft_plugin.loss.corrected import nll_token_losses
from mft_plugin.train.recipe import run
from mft_plugin.registry import Registry, collect_strategies, make_plugin_manager
from mft_plugin.train.safety import NonFiniteError, describe_nonfinite_loss
from mft_plugin.strategies import formats as builtin_formats
from mft_plugin.strategies import objectives as builtin_objectives
from mft_plugin.strategies.objectives.mft import MinifinetuningObjective
from mft_plugin.strategy import Mitigation, Objective, StrategyParams
from mft_plugin.teacher.sources import FrozenCopyTeacher
from mft_plugin.train.trainer import MFTTrainer
from tests.tiny import write_yaml

OBJECTIVES = ["ft", "distill_ft", "singly_corrective", "mft"]


# ---------------------------------------------------------------- fault-injecting strategies


class FaultParams(StrategyParams):
    steps: list[int] = Field(description="1-based optimizer steps at which the fault happens")


class NanTokenObjective(Objective):
    """Plain finetuning whose loss is NaN at (row 1, position 5) on the chosen steps (gradient finite)."""

    name = "nan_token"
    needs_teacher = False
    Params = FaultParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0  # one per optimizer step here: no accumulation, evaluation does not call it

    def token_losses(self, student_logits: torch.Tensor, teacher_logits: Any, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        losses = nll_token_losses(student_logits, labels)
        if self.calls not in self.params.steps:
            return losses
        fault = torch.zeros_like(losses, dtype=torch.bool)
        fault[1, 5] = True
        return losses.masked_fill(fault, math.nan)


class PenaltyFaultParams(FaultParams):
    fault: str = Field(description="inf_value or nan_gradient")


class FaultyPenalty(Mitigation):
    """A penalty that is infinite, or finite (0) with a NaN gradient, on the chosen steps."""

    name = "faulty_penalty"
    Params = PenaltyFaultParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        self.calls += 1
        if self.calls not in self.params.steps:
            return None
        weight = next(p for p in model.parameters() if p.requires_grad)
        if self.params.fault == "inf_value":
            return (weight * 0).sum() + math.inf
        return (weight * 0).sum().sqrt()  # value 0, gradient inf * 0 = NaN


class FaultPlugin:
    @hookimpl
    def mft_register_objectives(self) -> list[type]:
        return [NanTokenObjective]

    @hookimpl
    def mft_register_mitigations(self) -> list[type]:
        return [FaultyPenalty]


@pytest.fixture(scope="module")
def registry() -> Registry:
    manager = make_plugin_manager()
    manager.register(builtin_objectives, name="mft-plugin")
    manager.register(builtin_formats, name="mft-plugin-formats")
    manager.register(FaultPlugin(), name="fault-plugin")
    return collect_strategies(manager)


@pytest.fixture
def short_run(two_step_config: dict[str, Any]) -> dict[str, Any]:
    return {**two_step_config, "max_steps": 4, "save_steps": 1}


def config_file(tmp_path: Path, config: dict[str, Any]) -> str:
    return str(write_yaml(tmp_path / "config.yml", config))


# ---------------------------------------------------------------- stop, naming the step and positions


def test_nan_loss_from_the_objective_stops_with_step_and_token_positions(
    short_run: dict[str, Any], registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short_run["objective"] = {"name": "nan_token", "steps": [2]}
    assert main([config_file(tmp_path, short_run)], registry=registry) == 1
    expected = (
        "error: non-finite loss (nan) at step 2: objective 'nan_token' gave a non-finite loss at 1 token "
        "position(s) (batch row, position): (1, 5). Set skip_nonfinite_batches: true to skip such steps "
        "instead of stopping\n"
    )
    assert f"\n{expected}" in capsys.readouterr().err  # a line of its own among the progress bars
    assert not (tmp_path / "out" / "checkpoint-2").exists()  # stopped before the bad step was applied


def test_nonfinite_penalty_names_the_mitigation(short_run: dict[str, Any], registry: Registry, tmp_path: Path) -> None:
    short_run["objective"] = "ft"
    short_run["mitigations"] = [{"name": "faulty_penalty", "steps": [3], "fault": "inf_value"}]
    config = load_config(config_file(tmp_path, short_run), registry=registry)
    with pytest.raises(NonFiniteError, match=r"^non-finite loss \(inf\) at step 3: mitigation 'faulty_penalty' "
                                             r"gave a non-finite penalty \(inf\)\. "):  # fmt: skip
        run(config, registry)


def test_nonfinite_gradient_with_a_finite_loss_stops_the_run(
    short_run: dict[str, Any], registry: Registry, tmp_path: Path
) -> None:
    short_run["objective"] = "ft"
    short_run["mitigations"] = [{"name": "faulty_penalty", "steps": [2], "fault": "nan_gradient"}]
    config = load_config(config_file(tmp_path, short_run), registry=registry)
    with pytest.raises(
        NonFiniteError, match=r"^non-finite gradient norm \(nan\) at step 2 although the loss was finite"
    ):
        run(config, registry)


def test_many_bad_positions_are_counted_and_the_list_is_cut() -> None:
    token_losses = torch.zeros(2, 10)
    token_losses[0, 1:] = math.inf
    message = describe_nonfinite_loss("mft", token_losses, {"ewc": torch.tensor(1.0)})
    assert message == (
        "objective 'mft' gave a non-finite loss at 9 token position(s) (batch row, position): "
        "(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 7), (0, 8), ..."
    )


# ---------------------------------------------------------------- skip and count


def weights(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(output_dir / f"checkpoint-{step}" / "model.safetensors")


@pytest.mark.parametrize(
    ("objective", "mitigations"),
    [
        ({"name": "nan_token", "steps": [2, 4]}, []),
        ("ft", [{"name": "faulty_penalty", "steps": [2, 4], "fault": "nan_gradient"}]),
    ],
    ids=["nan-loss", "nan-gradient"],
)
def test_skip_nonfinite_batches_leaves_the_weights_and_counts_the_steps(
    short_run: dict[str, Any], registry: Registry, tmp_path: Path, objective: Any, mitigations: list[Any]
) -> None:
    short_run.update(objective=objective, mitigations=mitigations, skip_nonfinite_batches=True)
    metrics = run(load_config(config_file(tmp_path, short_run), registry=registry), registry)
    assert metrics["nonfinite_skipped_steps"] == 2
    output_dir = tmp_path / "out"
    before, skipped, after = weights(output_dir, 1), weights(output_dir, 2), weights(output_dir, 3)
    for name, tensor in skipped.items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, before[name]), name  # step 2 applied nothing
    assert any(not torch.equal(after[name], skipped[name]) for name in after)  # step 3 trained


# ---------------------------------------------------------------- edge cases in the Trainer's loss


class CertainTeacher:
    """A teacher with p^T = 1_l exactly: the next token's logit 1e4 above the rest."""

    def __init__(self, vocab_size: int, dtype: torch.dtype) -> None:
        self.vocab_size, self.dtype = vocab_size, dtype

    def to(self, device: Any) -> CertainTeacher:
        return self

    def logits(self, batch: dict[str, torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
        input_ids = batch["input_ids"] if rows is None else batch["input_ids"][rows]
        labels = shift_for_causal_lm(input_ids).clamp(min=0)
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        return logits.scatter(-1, labels.unsqueeze(-1), 1e4).to(self.dtype)


def make_trainer(tiny_model: Path, tmp_path: Path, objective: str, teacher: Any = "frozen") -> MFTTrainer:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if teacher == "frozen":
        teacher = FrozenCopyTeacher(AutoModelForCausalLM.from_pretrained(tiny_model))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    return MFTTrainer(model=model, args=args, objective=get_objective(objective), teacher=teacher)


def batch(tiny_model: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return PaddingCollator(tokenizer.eos_token_id)([{"input_ids": tokenizer(t)["input_ids"]} for t in texts])


def loss_and_gradients(trainer: MFTTrainer, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss, [p.grad for p in trainer.model.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", OBJECTIVES)
def test_all_ignored_batch_is_zero_with_finite_gradients(name: str, tiny_model: Path, tmp_path: Path) -> None:
    inputs = batch(tiny_model, ["Section 1. The tenant shall pay rent.", "Short."])
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    loss, gradients = loss_and_gradients(make_trainer(tiny_model, tmp_path, name), inputs)
    assert loss.item() == 0.0
    assert all(torch.isfinite(g).all() and not g.any() for g in gradients)


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["distill_ft", "singly_corrective", "mft"])
def test_teacher_certain_of_every_label_gives_the_finetuning_loss(
    name: str, teacher_dtype: torch.dtype, tiny_model: Path, tmp_path: Path
) -> None:
    """p^T_l = 1: beta's 0/0 case. Then p^C = 1_l for every objective, i.e. the plain NLL."""
    inputs = batch(tiny_model, ["Section 1. The tenant shall pay rent.", "Short."])
    vocab = AutoModelForCausalLM.from_pretrained(tiny_model).config.vocab_size
    trainer = make_trainer(tiny_model, tmp_path, name, CertainTeacher(vocab, teacher_dtype))
    loss, gradients = loss_and_gradients(trainer, inputs)
    reference, reference_gradients = loss_and_gradients(make_trainer(tiny_model, tmp_path, "ft", None), inputs)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in gradients)
    torch.testing.assert_close(loss, reference)
    for ours, theirs in zip(gradients, reference_gradients, strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("name", ["ft", "mft"])
def test_a_padded_short_block_counts_only_its_real_tokens(name: str, tiny_model: Path, tmp_path: Path) -> None:
    """A block shorter than the others (the packer's remainder) is padded; the loss is the token mean
    over both rows' real tokens, as if each row had been computed alone."""
    texts = ["Section 1. The tenant shall pay the rent on the first day of each month.", "Short one."]
    trainer = make_trainer(tiny_model, tmp_path, name)
    trainer.model.eval()
    padded = trainer.compute_loss(trainer.model, batch(tiny_model, texts)).item()
    rows = [batch(tiny_model, [text]) for text in texts]
    counts = [row["input_ids"].shape[1] - 1 for row in rows]  # predicted tokens per row
    losses = [trainer.compute_loss(trainer.model, row).item() for row in rows]
    weighted = sum(count * loss for count, loss in zip(counts, losses, strict=True))
    assert padded == pytest.approx(weighted / sum(counts), rel=1e-5)


def test_a_corpus_shorter_than_one_block_trains(
    two_step_config: dict[str, Any], tiny_model: Path, tmp_path: Path
) -> None:
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text('{"text": "The court held."}\n{"text": "Appeal dismissed."}\n')
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    blocks = raw_text_blocks([DatasetConfig(path=str(corpus))], tokenizer, sequence_len=32)
    assert len(blocks) == 1 and 2 <= len(blocks[0]["input_ids"]) < 32
    two_step_config["datasets"] = [{"path": str(corpus)}]
    metrics = run(load_config(config_file(tmp_path, two_step_config)))
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    assert metrics["nonfinite_skipped_steps"] == 0


NEEDS_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs CUDA")]


@pytest.mark.parametrize(
    ("key", "dtype"), [("bf16", torch.bfloat16), pytest.param("fp16", torch.float16, marks=NEEDS_CUDA)]
)
def test_mixed_precision_run_computes_the_correction_and_loss_in_float32(
    key: str, dtype: torch.dtype, two_step_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The student's forward runs under bf16/fp16 autocast; the objective computes in float32."""
    seen: list[str] = []
    compute_loss, token_losses = MFTTrainer.compute_loss, MinifinetuningObjective.token_losses

    def recording_compute_loss(self: MFTTrainer, model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        lm_head = self.accelerator.unwrap_model(model).lm_head
        hook = lm_head.register_forward_hook(lambda module, inputs, output: seen.append(f"logits {output.dtype}"))
        try:
            loss = compute_loss(self, model, *args, **kwargs)
        finally:
            hook.remove()
        seen.append(f"loss {loss.dtype}")
        return loss

    def recording_token_losses(self: Objective, *args: Any) -> torch.Tensor:
        losses = token_losses(self, *args)
        seen.append(f"token losses {losses.dtype}, autocast {torch.is_autocast_enabled('cpu')}")
        return losses

    monkeypatch.setattr(MFTTrainer, "compute_loss", recording_compute_loss)
    monkeypatch.setattr(MinifinetuningObjective, "token_losses", recording_token_losses)
    metrics = run(load_config(config_file(tmp_path, {**two_step_config, key: True})))
    step = [f"logits {dtype}", "token losses torch.float32, autocast False", "loss torch.float32"]
    assert seen == step * 2
    assert math.isfinite(metrics["train_loss"])
