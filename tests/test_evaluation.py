"""The paper's metrics during training (Sec. 3.1): perplexity, S, DG, DG/S, the final checkpoint, the budget.

Perplexity and S/DG are checked against a plain loop over tokens; the checkpoint choice and the
degeneralization budget against hand-made evaluations (``MFTTrainer.perplexities`` scripted) on a
real few-step run of the tiny model, so the Trainer's own best-model bookkeeping is what is tested.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from mft_plugin import get_objective
from mft_plugin.train.budget import Budget, MAX_DEGENERALIZATION, TARGET_SPECIALIZATION
from mft_plugin.config.schema import DatasetConfig
from mft_plugin.config.errors import ConfigError, validate_config
from mft_plugin.data.batches import PaddingCollator
from mft_plugin.data.packing import raw_text_blocks
from mft_plugin.eval.metrics import GENERAL, perplexity, SPEC
from mft_plugin.train.recipe import run
from mft_plugin.train.trainer import MFTTrainer

REL = 1e-4  # a batched float32 forward against one row at a time


def packed(model_dir: Path, corpus: Path, sequence_len: int) -> Dataset:
    """The corpus in ``sequence_len`` blocks, exactly as a run packs its evaluation sets."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return raw_text_blocks([DatasetConfig(path=str(corpus))], tokenizer, sequence_len)


def packed_blocks(model_dir: Path, corpus: Path, sequence_len: int) -> list[list[int]]:
    return packed(model_dir, corpus, sequence_len)["input_ids"]


@torch.no_grad()
def naive_perplexity(model: torch.nn.Module, blocks: list[list[int]]) -> float:
    """exp(mean NLL of every predicted token), one block and one position at a time."""
    model.eval()
    total_nll, tokens = 0.0, 0
    for ids in blocks:
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        for t in range(len(ids) - 1):
            total_nll -= torch.log_softmax(logits[t], dim=-1)[ids[t + 1]].item()
            tokens += 1
    return math.exp(total_nll / tokens)


def load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder)


def test_perplexity_is_token_level_over_padded_batches(tiny_model: Path, corpora: dict[str, Path]) -> None:
    blocks = packed_blocks(tiny_model, corpora["spec_val"], 32)
    assert len(blocks[-1]) < 32  # a short last block: padding must not count
    collate = PaddingCollator(pad_token_id=2)
    batches = [collate([{"input_ids": ids} for ids in blocks[i : i + 3]]) for i in range(0, len(blocks), 3)]
    model = load(tiny_model)
    assert perplexity(model, batches, Accelerator(cpu=True)) == pytest.approx(naive_perplexity(model, blocks), rel=REL)


def test_logged_s_and_dg_match_a_hand_computation(
    base_config: dict[str, Any], tiny_model: Path, corpora: dict[str, Path]
) -> None:
    metrics = run(validate_config(base_config))
    output_dir = Path(base_config["output_dir"])
    spec_blocks = packed_blocks(tiny_model, corpora["spec_val"], base_config["sequence_len"])
    general_blocks = packed_blocks(tiny_model, corpora["general_val"], base_config["sequence_len"])
    base, final = load(tiny_model), load(output_dir)
    base_spec, base_general = naive_perplexity(base, spec_blocks), naive_perplexity(base, general_blocks)
    spec, general = naive_perplexity(final, spec_blocks), naive_perplexity(final, general_blocks)
    s, dg = (base_spec - spec) / base_spec, (general - base_general) / base_general

    assert json.loads((output_dir / "metrics.json").read_text()) == metrics
    assert metrics["base_spec_ppl"] == pytest.approx(base_spec, rel=REL)
    assert metrics["base_general_ppl"] == pytest.approx(base_general, rel=REL)
    assert (metrics["eval_spec_ppl"], metrics["eval_general_ppl"]) == pytest.approx((spec, general), rel=REL)
    assert metrics["eval_S"] == pytest.approx(s, rel=1e-3, abs=1e-6)
    assert metrics["eval_DG"] == pytest.approx(dg, rel=1e-3, abs=1e-6)
    assert metrics["eval_DG/S"] == pytest.approx(metrics["eval_DG"] / metrics["eval_S"])
    # every evaluation is logged through the Trainer (console, tensorboard, wandb); the final one is the least spec ppl
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in history if "eval_S" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    assert {"eval_spec_ppl", "eval_general_ppl", "eval_S", "eval_DG", "eval_DG/S"} <= set(evaluations[0])
    best = min(evaluations, key=lambda entry: entry["eval_spec_ppl"])
    assert metrics["step"] == best["step"] and metrics["eval_S"] == best["eval_S"]


# ---------------------------------------------------------------- the final checkpoint and the budget


def scripted(base: tuple[float, float], evaluations: list[tuple[float, float]]) -> Callable[..., dict[str, float]]:
    """Stands in for ``MFTTrainer.perplexities``: (spec, general) of the base, then of each evaluation."""
    values = iter([base, *evaluations])

    def perplexities(self: MFTTrainer, base: bool = False) -> dict[str, float]:
        spec, general = next(values)
        return {SPEC: spec, GENERAL: general}

    return perplexities


def scripted_run(
    monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], evaluations: list[tuple[float, float]], **keys: Any
) -> tuple[dict[str, Any], Path]:
    monkeypatch.setattr(MFTTrainer, "perplexities", scripted((100.0, 50.0), evaluations))
    metrics = run(validate_config({**config, "eval_steps": 1, "sequence_len": 32, **keys}))
    return metrics, Path(config["output_dir"])


def same_weights(first: Path, second: Path) -> bool:
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def trained_steps(output_dir: Path) -> int:
    return json.loads((output_dir / "trainer_state.json").read_text())["global_step"]


def test_the_least_specialized_perplexity_is_the_saved_model(
    monkeypatch: pytest.MonkeyPatch, base_config: dict[str, Any]
) -> None:
    metrics, out = scripted_run(monkeypatch, base_config, [(90, 50.1), (70, 50.2), (80, 50.3), (75, 50.4)])
    assert trained_steps(out) == 4
    assert metrics["step"] == 2 and metrics["eval_spec_ppl"] == 70
    assert metrics["eval_S"] == pytest.approx(0.3) and metrics["eval_DG"] == pytest.approx(0.004)
    assert metrics["eval_DG/S"] == pytest.approx(0.004 / 0.3)
    assert same_weights(out, out / "checkpoint-2") and not same_weights(out, out / "checkpoint-4")
    assert "stopped_by" not in metrics and "within_budget" not in metrics


def test_degeneralization_budget_stops_and_keeps_the_best_checkpoint_within_it(
    monkeypatch: pytest.MonkeyPatch, base_config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    # step 3 has the least spec perplexity but DG = 2 % > 1 %: training stops there and step 2 is kept
    evaluations = [(90, 50.2), (80, 50.4), (60, 51.0), (50, 50.0)]
    metrics, out = scripted_run(monkeypatch, base_config, evaluations, max_steps=6, max_degeneralization=0.01)
    assert trained_steps(out) == 3
    assert (metrics["step"], metrics["eval_spec_ppl"]) == (2, 80)
    assert metrics["eval_DG"] == pytest.approx(0.008)
    assert (metrics["stopped_by"], metrics["within_budget"]) == (MAX_DEGENERALIZATION, True)
    assert same_weights(out, out / "checkpoint-2") and not same_weights(out, out / "checkpoint-3")
    assert "step 3: DG 0.02 > max_degeneralization 0.01: stopping training" in caplog.text


def test_target_specialization_stops_at_the_first_evaluation_reaching_it(
    monkeypatch: pytest.MonkeyPatch, base_config: dict[str, Any]
) -> None:
    evaluations = [(90, 50.0), (84, 50.0), (70, 50.0)]
    metrics, out = scripted_run(monkeypatch, base_config, evaluations, max_steps=6, target_specialization=0.15)
    assert trained_steps(out) == 2
    assert (metrics["step"], metrics["eval_S"], metrics["stopped_by"]) == (2, pytest.approx(0.16), TARGET_SPECIALIZATION)


def test_no_evaluation_within_budget_reports_the_final_model_as_over_it(
    monkeypatch: pytest.MonkeyPatch, base_config: dict[str, Any]
) -> None:
    # the fourth value is the final model measured again, since no checkpoint could be selected
    metrics, out = scripted_run(monkeypatch, base_config, [(90, 55.0), (90, 55.0)], max_degeneralization=0.01)
    assert trained_steps(out) == 1
    assert (metrics["stopped_by"], metrics["within_budget"]) == (MAX_DEGENERALIZATION, False)
    assert metrics["eval_DG"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("budget", "dg", "s", "admitted", "reason"),
    [
        (Budget(), 5.0, 0.9, True, None),
        (Budget(max_degeneralization=0.01), 0.01, 0.1, True, None),  # at the limit is within it
        (Budget(max_degeneralization=0.01), 0.0101, 0.1, False, MAX_DEGENERALIZATION),
        (Budget(target_specialization=0.2), 0.5, 0.2, True, TARGET_SPECIALIZATION),
        (Budget(0.01, 0.2), 0.02, 0.3, False, MAX_DEGENERALIZATION),  # over budget wins over the target
    ],
)
def test_budget_rules(budget: Budget, dg: float, s: float, admitted: bool, reason: str | None) -> None:
    metrics = {"eval_DG": dg, "eval_S": s}
    assert (budget.admits(metrics), budget.stop_reason(metrics)) == (admitted, reason)


def test_budget_keys_need_the_sets_they_are_measured_on(base_config: dict[str, Any]) -> None:
    config = {k: v for k, v in base_config.items() if k != "general_eval_datasets"}
    with pytest.raises(ConfigError) as caught:
        validate_config({**config, "max_degeneralization": 0.01})
    assert caught.value.problems == ["<config>: max_degeneralization: 0.01 needs general_eval_datasets: DG is measured on them"]
    no_spec = {k: v for k, v in base_config.items() if k != "test_datasets"}
    with pytest.raises(ConfigError, match="target_specialization: 0.1 needs a specialized validation set"):
        validate_config({**no_spec, "target_specialization": 0.1})


def test_base_perplexity_with_adapters_is_the_adapters_switched_off(
    tiny_model: Path, corpora: dict[str, Path], tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    blocks = packed_blocks(tiny_model, corpora["spec_val"], 32)
    base_ppl = naive_perplexity(load(tiny_model), blocks)
    # init_lora_weights=False: B is random, so the adapted model differs from its base from the start (on
    # lm_head, since a random model's logits hardly depend on its other layers)
    lora = LoraConfig(r=4, lora_alpha=256, target_modules=["lm_head"], init_lora_weights=False)
    adapted = get_peft_model(load(tiny_model), lora)
    trainer = MFTTrainer(
        model=adapted,
        args=TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[]),
        data_collator=PaddingCollator(pad_token_id=2),
        objective=get_objective("ft"),
        teacher=None,
        eval_sets={SPEC: packed(tiny_model, corpora["spec_val"], 32)},
    )
    assert trainer.perplexities(base=True)[SPEC] == pytest.approx(base_ppl, rel=REL)
    assert trainer.perplexities()[SPEC] > 2 * base_ppl  # the adapted model itself is far from it
