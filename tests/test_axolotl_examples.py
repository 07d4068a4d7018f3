"""Axolotl's keys where they act: precision, intervals, wandb, early stops, added tokens, attention,
starting from a saved adapter; and copies of Axolotl's own llama-3 examples, validated and trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import EarlyStoppingCallback, TrainerControl, TrainerState

from mft_plugin.config.errors import ConfigError, validate_config
from mft_plugin.models.loading import (
    load_frozen_teacher,
    load_model,
    load_tokenizer,
    mixed_precision,
    quantization_config,
)
from mft_plugin.registry import default_registry
from mft_plugin.train.context import RecipeContext
from mft_plugin.train.preflight import preflight
from mft_plugin.train.recipe import build_strategies, evaluation_intervals, training_arguments, wandb_environment
from mft_plugin.train.stopping import LossWatchdog, stopping_callbacks
from tests.tiny import REPO

EXAMPLES = Path(__file__).parent / "axolotl_examples"
COPIES = ["lora-1b.yml", "qlora-1b.yml", "fft-8b.yaml"]


# --- precision -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"bf16": "auto"}, "fp16"),  # Axolotl: no bf16 GPU, fp16 left empty -> fp16
        ({"bf16": "auto", "fp16": False}, None),
        ({"bf16": "auto", "fp16": True}, "fp16"),
        ({"bf16": True}, "bf16"),
        ({"fp16": True}, "fp16"),
        ({}, None),
    ],
)
def test_bf16_auto_resolves_as_axolotl(base_config: dict[str, Any], keys: dict[str, Any], expected: str | None) -> None:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        pytest.skip("on a bf16 GPU, bf16: auto is bf16; this table is the machine without one")
    assert mixed_precision(validate_config({**base_config, **keys})) == expected


def test_qlora_compute_dtype_is_the_models_unless_given(base_config: dict[str, Any]) -> None:
    qlora = {**base_config, "adapter": "qlora", "load_in_4bit": True}
    fp32 = validate_config({**qlora, "bf16": False})
    assert quantization_config(fp32, torch.float32).bnb_4bit_compute_dtype == torch.float32
    assert quantization_config(fp32, torch.bfloat16).bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(fp32).bnb_4bit_use_double_quant is True
    given = validate_config({**qlora, "bnb_4bit_compute_dtype": "float16", "bnb_4bit_use_double_quant": False})
    bnb = quantization_config(given, torch.bfloat16)
    assert (bnb.bnb_4bit_compute_dtype, bnb.bnb_4bit_use_double_quant) == (torch.float16, False)


def test_bnb_config_kwargs_are_the_4bit_keys(base_config: dict[str, Any]) -> None:
    """Axolotl updates its 4-bit ``BitsAndBytesConfig`` with ``bnb_config_kwargs`` (loaders/model.py)."""
    qlora = {**base_config, "adapter": "qlora", "load_in_4bit": True}
    config = validate_config({**qlora, "bnb_config_kwargs": {"bnb_4bit_use_double_quant": False, "bnb_4bit_quant_type": "fp4"}})
    bnb = quantization_config(config)
    assert (bnb.bnb_4bit_use_double_quant, bnb.bnb_4bit_quant_type) == (False, "fp4")
    for extra, message in [
        ({"bnb_config_kwargs": {"llm_int8_threshold": 5.0}}, "the 4-bit BitsAndBytesConfig keys read here are"),
        ({"bnb_config_kwargs": {"bnb_4bit_quant_type": "fp4"}, "bnb_4bit_quant_type": "nf4"}, "differ; keep one"),
        ({"bnb_config_kwargs": {"bnb_4bit_quant_type": "fp4"}, "load_in_4bit": False, "adapter": "lora"}, "a 4-bit base only"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate_config({**qlora, **extra})


def test_batch_size_is_accumulation_times_micro_batch(base_config: dict[str, Any]) -> None:
    """Axolotl's deprecated ``batch_size``: gradient_accumulation_steps = batch_size // micro_batch_size, per process."""
    data = {key: value for key, value in base_config.items() if key != "gradient_accumulation_steps"}
    assert validate_config({**data, "micro_batch_size": 4, "batch_size": 16}).gradient_accumulation_steps == 4
    with pytest.raises(ConfigError, match=r"batch_size: 10 must be a multiple of micro_batch_size \(4\)"):
        validate_config({**data, "micro_batch_size": 4, "batch_size": 10})
    with pytest.raises(ConfigError, match="batch_size and gradient_accumulation_steps both set the batch"):
        validate_config({**data, "batch_size": 8, "gradient_accumulation_steps": 2})


def test_tokens_as_a_mapping_is_the_old_spelling_of_special_tokens(base_config: dict[str, Any]) -> None:
    config = validate_config({**base_config, "tokens": {"pad_token": "<|padding|>", "eos_token": "</s>"}})
    assert (config.special_tokens.pad_token, config.special_tokens.eos_token, config.tokens) == ("<|padding|>", "</s>", None)
    assert len(load_tokenizer(config)) == len(load_tokenizer(validate_config(base_config))) + 1  # <|padding|> is new
    with pytest.raises(ConfigError, match="old spelling of special_tokens, which is set too"):
        validate_config({**base_config, "tokens": {"pad_token": "<p>"}, "special_tokens": {"pad_token": "<q>"}})


def test_auto_resume_is_resume_from_the_newest_checkpoint(base_config: dict[str, Any]) -> None:
    assert validate_config({**base_config, "auto_resume_from_checkpoints": True}).resume_from_checkpoint is True
    named = validate_config({**base_config, "auto_resume_from_checkpoints": True, "resume_from_checkpoint": "ckpt"})
    assert named.resume_from_checkpoint == "ckpt"  # Axolotl: a named checkpoint wins
    assert validate_config({**base_config, "auto_resume_from_checkpoints": False}).resume_from_checkpoint is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the notes on a machine without CUDA")
def test_keys_axolotl_drops_and_placement_switches_are_said_at_start(base_config: dict[str, Any]) -> None:
    config = validate_config({
        **base_config, "eta_min": 7e-7, "adam_eps": 1e-9, "gemma4_hybrid_attn_impl": True, "experimental_skip_move_to_device": True,
        "gptq_groupsize": None, "gptq_model_v1": False,
    })
    notes = "\n".join(config.start_notes)
    assert "eta_min: 7e-07 has no effect: not a key of Axolotl's schema, which drops it too" in notes
    assert "adam_eps: 1e-09 has no effect" in notes and "AdamW's epsilon is adam_epsilon" in notes
    assert "gemma4_hybrid_attn_impl: inactive here (speed only, same loss)" in notes
    assert "experimental_skip_move_to_device: inactive here" in notes
    assert not {"eta_min", "adam_eps"} & config.model_dump().keys()
    with pytest.raises(ConfigError, match="gptq_groupsize: 128 is not supported: a quantization scheme"):
        validate_config({**base_config, "gptq_groupsize": 128})


# --- TrainingArguments ---------------------------------------------------------------------------


def test_training_arguments_carry_axolotls_keys(base_config: dict[str, Any]) -> None:
    config = validate_config(
        {
            **base_config,
            "gradient_checkpointing": True,
            "gradient_checkpointing_kwargs": {"use_reentrant": False},
            "group_by_length": True,
            "adam_beta2": 0.95,
            "adam_epsilon": 1e-5,
            "tf32": False,
            "bf16": "auto",
            "fp16": False,
        }
    )
    args = training_arguments(config, train_blocks=40, evaluate=True)
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert args.train_sampling_strategy == "group_by_length"
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.tf32) == (0.9, 0.95, 1e-5, False)
    assert not args.bf16 and not args.fp16


def test_group_by_length_is_refused_with_replay(base_config: dict[str, Any], corpora: dict[str, Path]) -> None:
    replay = {"name": "replay", "datasets": [{"path": str(corpora["general_train"])}]}
    with pytest.raises(ConfigError, match="group_by_length: replay composes every micro-batch"):
        validate_config({**base_config, "group_by_length": True, "mitigations": [replay]})


@pytest.mark.parametrize(
    ("keys", "total", "evaluate", "expected"),
    [
        ({"evals_per_epoch": 4, "saves_per_epoch": 1}, 10, True, (3, 12)),  # Axolotl: ceil(10 / 4) = 3
        ({"evals_per_epoch": 4, "saves_per_epoch": 2}, 16, True, (4, 8)),
        ({"evals_per_epoch": 2, "num_epochs": 2}, 20, True, (5, 5)),  # 1 / (2 x 2) of the run
        ({"evals_per_epoch": 1}, 7, True, (7, 7)),
        ({"saves_per_epoch": 2}, 10, False, (1, 5)),
        ({"saves_per_epoch": 2}, 10, True, (5, 5)),  # alone: an evaluation at each save (qwen3/8b-lora-fused-attn)
        ({"eval_steps": 3, "save_steps": 6}, 10, True, (3, 6)),
    ],
)
def test_per_epoch_intervals(
    base_config: dict[str, Any], keys: dict[str, Any], total: int, evaluate: bool, expected: tuple[int, int]
) -> None:
    data = {key: value for key, value in base_config.items() if key not in ("eval_steps", "max_steps")}
    if not evaluate:
        data = {key: value for key, value in data.items() if key != "test_datasets"}
    config = validate_config({**data, **keys})
    assert evaluation_intervals(config, total, evaluate) == expected


def test_wandb_keys_reach_the_environment(base_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    keys = {"wandb_project": "p", "wandb_entity": "team", "wandb_watch": "gradients", "wandb_log_model": "end", "wandb_name": "n"}
    config = validate_config({**base_config, **keys})
    assert wandb_environment(config) == {
        "WANDB_PROJECT": "p", "WANDB_ENTITY": "team", "WANDB_WATCH": "gradients", "WANDB_LOG_MODEL": "end", "WANDB_NAME": "n",
    }  # fmt: skip
    assert wandb_environment(validate_config({**base_config, "wandb_project": "p", "use_wandb": False})) == {}
    with pytest.raises(ConfigError, match="wandb_entity: read only when reporting to wandb"):
        validate_config({**base_config, **keys, "use_wandb": False})  # never accepted and ignored
    assert wandb_environment(validate_config(base_config)) == {}


# --- early stops -----------------------------------------------------------------------------------


def test_loss_watchdog_stops_after_patience_steps_in_a_row() -> None:
    watchdog, stops = LossWatchdog(threshold=5.0, patience=2), []
    for logs in [{"loss": 6.0}, {"loss": 4.0}, {"loss": 6.0}, {"eval_spec_ppl": 9.0}, {"loss": 6.0}]:
        control = watchdog.on_log(None, TrainerState(), TrainerControl(), logs=logs)  # type: ignore[arg-type]
        stops.append(control.should_training_stop)
    assert stops == [False, False, False, False, True]  # the 4.0 reset the count; evaluations do not count


def test_early_stop_keys_become_callbacks(base_config: dict[str, Any]) -> None:
    config = validate_config({**base_config, "loss_watchdog_threshold": 5.0, "early_stopping_patience": 2})
    watchdog, early = stopping_callbacks(config)
    assert isinstance(watchdog, LossWatchdog) and (watchdog.threshold, watchdog.patience) == (5.0, 3)
    assert isinstance(early, EarlyStoppingCallback) and early.early_stopping_patience == 2
    assert stopping_callbacks(validate_config(base_config)) == []


def test_loss_watchdog_stops_a_run(base_config: dict[str, Any], tmp_path: Path) -> None:
    from mft_plugin import run

    watched = {"loss_watchdog_threshold": 0.5, "loss_watchdog_patience": 1, "early_stopping_patience": 3, "eval_steps": 1}
    metrics = run(validate_config({**base_config, **watched}))  # the Trainer accepts EarlyStoppingCallback's setup
    assert metrics["step"] == 1  # of max_steps 4: the first logged loss (> 0.5) stopped it


# --- models: added tokens, attention, model_type -------------------------------------------------------


def test_added_tokens_grow_student_and_teacher_alike(base_config: dict[str, Any]) -> None:
    config = validate_config({**base_config, "special_tokens": {"pad_token": "<|end_of_text|>"}, "tokens": ["<|x|>"]})
    tokenizer = load_tokenizer(config)
    assert tokenizer.pad_token == "<|end_of_text|>" and len(tokenizer) == 4098
    student, teacher = load_model(config), load_frozen_teacher(config)
    assert student.get_input_embeddings().weight.shape[0] == 4098
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    ids = torch.tensor([[5, 4096, 4097, 9]])
    assert torch.equal(student(input_ids=ids).logits, teacher(input_ids=ids).logits)  # the teacher is the start exactly
    plain = load_model(validate_config(base_config))
    assert torch.equal(plain.get_input_embeddings().weight, student.get_input_embeddings().weight[:4096])


def test_new_special_tokens_under_an_adapter_need_trained_embeddings(base_config: dict[str, Any]) -> None:
    lora = {**base_config, "adapter": "lora", "lora_target_modules": ["q_proj"]}
    preflight(validate_config({**lora, "special_tokens": {"pad_token": "<|pad|>"}}))  # padding is never learned
    with pytest.raises(ConfigError, match=r"set lora_modules_to_save: \[embed_tokens, lm_head\]"):
        preflight(validate_config({**lora, "special_tokens": {"eos_token": "<|im_end|>"}}))
    preflight(validate_config({**lora, "special_tokens": {"eos_token": "<|im_end|>"}, "lora_modules_to_save": ["embed_tokens", "lm_head"]}))


def test_attention_and_model_class_keys(base_config: dict[str, Any]) -> None:
    config = validate_config({**base_config, "sdp_attention": True, "model_type": "LlamaForCausalLM"})
    model = load_model(config)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config._attn_implementation == "sdpa"
    assert load_model(validate_config({**base_config, "attn_implementation": "eager"})).config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="attn_implementation: 'fast' is not an attention implementation"):
        preflight(validate_config({**base_config, "attn_implementation": "fast"}))
    with pytest.raises(ConfigError, match="model_type: 'NoSuchForCausalLM' is not a class of transformers"):
        preflight(validate_config({**base_config, "model_type": "NoSuchForCausalLM"}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the note on a machine without CUDA")
def test_tf32_off_a_gpu_is_said_inactive(base_config: dict[str, Any]) -> None:
    config = validate_config({**base_config, "tf32": True})
    preflight(config)  # a speed-only switch (issue 25): not an error
    assert config.start_notes == ["tf32: inactive here (speed only): TF32 is a matmul mode of Ampere or newer CUDA GPUs"]
    assert training_arguments(config, 40, True).tf32 is None


# --- lora_model_dir ----------------------------------------------------------------------------------------


def _adapter_model(config: Any, tmp_path: Path) -> torch.nn.Module:
    objective, mitigations = build_strategies(config, default_registry())
    context = RecipeContext(config=config, tokenizer=load_tokenizer(config), output_dir=tmp_path)
    return mitigations[0].prepare_model(load_model(config), context)


def test_lora_model_dir_starts_from_the_saved_adapter(base_config: dict[str, Any], tmp_path: Path) -> None:
    lora = {**base_config, "adapter": "lora", "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"]}
    saved = _adapter_model(validate_config(lora), tmp_path)
    with torch.no_grad():
        for name, parameter in saved.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a trained adapter: B is no longer zero
    saved.save_pretrained(tmp_path / "adapter")
    config = validate_config({**base_config, "adapter": "lora", "lora_model_dir": str(tmp_path / "adapter")})
    (entry,) = config.mitigations  # the saved settings, shown in the resolved config
    assert (entry.r, set(entry.target_modules)) == (4, {"q_proj", "v_proj"})
    again = validate_config(config.model_dump(mode="json")).mitigations  # a run's config.yml validates again
    assert [m.model_dump() for m in again] == [entry.model_dump()]
    resumed = _adapter_model(config, tmp_path)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    assert torch.equal(resumed(input_ids=ids).logits, saved(input_ids=ids).logits)
    assert any(p.requires_grad for n, p in resumed.named_parameters() if "lora_" in n)
    with pytest.raises(ConfigError, match=r"saved with other settings: r 8 \(saved: 4\)"):
        validate_config({**base_config, "adapter": "lora", "lora_r": 8, "lora_model_dir": str(tmp_path / "adapter")})
    with pytest.raises(ConfigError, match="is not a saved peft adapter"):
        validate_config({**base_config, "adapter": "lora", "lora_model_dir": str(tmp_path)})


def test_lora_target_linear_with_modules_is_their_union(base_config: dict[str, Any], tmp_path: Path) -> None:
    both = {**base_config, "adapter": "lora", "lora_target_linear": True, "lora_target_modules": ["embed_tokens"]}
    model = _adapter_model(validate_config(both), tmp_path)
    linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(model.peft_config["default"].target_modules) == linear | {"embed_tokens"}


# --- Axolotl's own examples ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", COPIES)
def test_axolotl_llama3_examples_validate_and_train(name: str, tmp_path: Path) -> None:
    """Axolotl's examples/llama-3 files, changed only as their header says, validate and train 2 steps."""
    command = [sys.executable, "-m", "mft_plugin.cli", str(EXAMPLES / name)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    validated = subprocess.run([*command, "--validate"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert validated.returncode == 0, validated.stderr
    # the copies keep Axolotl's relative dataset_prepared_path: prepared data goes to tmp, not into the repo
    overrides = ["--set", "max_steps=2", "--set", f"output_dir={tmp_path}", "--set", f"dataset_prepared_path={tmp_path / 'prepared'}"]
    trained = subprocess.run([*command, *overrides], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["eval_spec_ppl"] > 1
