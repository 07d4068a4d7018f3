"""The family matrix (issue 22): on tiny random models of 19 transformers families, the fused loss
(``loss_impl: auto`` and ``chunked``), the exact teacher cache, LoRA + MFT and LoRA + MFT with the
projected teacher cache (the hidden-state one under a softcap) give the naive run's
per-step losses and final perplexities, through the real recipe.

Each model: 2 layers, hidden size 64, the shipped tokenizer's vocabulary, its LM head scaled up so
that the logits before the model's own transform reach about 40 (Gemma's softcap of 30 then bites:
tanh(40 / 30) is far from 40 / 30), a random bias where the head has one (Phi). Among them: softcaps
(Gemma 2, Gemma 3 text), scales (Granite divides, Cohere and Falcon-H1 multiply), a biased head
(Phi), Conv1D and a tied head (GPT-2), two MoE models (Mixtral, Qwen3-MoE). SGD keeps a rounding
difference of the gradients a rounding difference of the weights (Adam's first step is
lr * sign(g), which flips on gradients that are 0 up to rounding), so rel 1e-5 stays meaningful.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import accelerate.utils.memory
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from mft_plugin import get_objective, run
from mft_plugin.config.schema import MFTConfigBase, config_model
from mft_plugin.loss.chunked import ChunkedLoss, select_loss_impl
from mft_plugin.models.heads import LogitTransform, output_head
from mft_plugin.registry import default_registry
from tests.tiny import DATA, REFERENCE_MODEL, write_corpus

# family: (config class, model class, config keys beyond the shared ones)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"num_key_value_heads": 2, "head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"num_key_value_heads": 2, "head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"num_key_value_heads": 2, "head_dim": 16, "final_logit_softcapping": 30.0}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"num_key_value_heads": 2, "head_dim": 16, "final_logit_softcapping": 30.0}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"num_key_value_heads": 2, "logits_scaling": 4.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"num_key_value_heads": 2, "logit_scale": 0.0625}),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", {
        "num_key_value_heads": 2, "lm_head_multiplier": 2.0, "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16,
        "mamba_d_state": 16, "mamba_chunk_size": 16,
    }),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_key_value_heads": 2}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {"num_key_value_heads": 2}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    }),
}
LOGIT_REACH = 40.0  # the largest |scale * y| on a probe batch, y = the head's output
# peft refuses its all-linear default on Falcon-H1's Mamba projections (out_proj, conv1d)
LORA_TARGETS = {"falcon_h1": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
# what each run adds to the naive one; every one of them takes the fused path or fails (never falls back)
FUSED_RUNS = {
    "chunked": {"loss_impl": "chunked"},
    "teacher_cache": {"teacher_cache": {}},  # loss_impl: auto; the cache needs the fused loss
    "lora": {"loss_impl": "chunked"},
    "lora_cache": {"teacher_cache": {}},  # the projected layout (hidden states where a softcap forbids it)
}


def lora(family: str) -> dict[str, Any]:
    spec = {"name": "lora", "r": 2, "lora_alpha": 4}
    return {"mitigations": [{**spec, "target_modules": LORA_TARGETS[family]} if family in LORA_TARGETS else spec]}


def build_family(name: str, folder: Path) -> Path:
    """A tiny random model of ``name`` with the shipped tokenizer, its head scaled to ``LOGIT_REACH``."""
    config_class, model_class, extra = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL)
    shared = {
        "vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 128, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**{**shared, **extra}))
    head, seen = output_head(model), []
    handle = head.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        model(input_ids=torch.randint(3, len(tokenizer), (2, 32)))
        handle.remove()
        if head.bias is not None:
            head.bias.normal_(0.0, 0.1)
        head.weight.mul_(LOGIT_REACH / (abs(LogitTransform.of(model).scale) * seen[-1].abs().max().item()))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


Validate = Callable[[dict[str, Any]], MFTConfigBase]


@pytest.fixture(scope="module")
def validate() -> Validate:
    """The config model built once (building it costs more than a tiny run's training)."""
    return config_model(default_registry()).model_validate


@pytest.fixture(autouse=True)
def no_full_garbage_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate's ``free_memory`` at the end of each run: a full ``gc.collect`` (about 1 s in a test
    process) that frees no memory a test needs."""
    monkeypatch.setattr(accelerate.utils.memory, "clear_device_cache", lambda garbage_collection=False: None)


@pytest.fixture(scope="module")
def small_corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("family-corpora")
    return {
        "train": write_corpus(folder / "train.jsonl", DATA / "legal" / "train.jsonl", 3),
        "spec": write_corpus(folder / "spec.jsonl", DATA / "legal" / "validation.jsonl", 1),
        "general": write_corpus(folder / "general.jsonl", DATA / "general" / "validation.jsonl", 1),
    }


def family_config(model: Path, corpora: dict[str, Path], output_dir: Path) -> dict[str, Any]:
    return {
        "base_model": str(model),
        "datasets": [{"path": str(corpora["train"]), "type": "completion"}],
        "test_datasets": [{"path": str(corpora["spec"]), "type": "completion"}],
        "general_eval_datasets": [{"path": str(corpora["general"]), "type": "completion"}],
        "sequence_len": 32, "micro_batch_size": 2, "eval_batch_size": 16, "max_steps": 2, "eval_steps": 2, "logging_steps": 1,
        "optimizer": "sgd", "learning_rate": 0.05, "lr_scheduler": "constant", "save_total_limit": 1,
        "objective": {"name": "mft", "tau": 0.25}, "seed": 0, "output_dir": str(output_dir),
    }


def trace(validate: Validate, config: dict[str, Any]) -> list[float]:
    """A run's per-step losses, then its base and final perplexities."""
    metrics = run(validate(config))
    history = json.loads((Path(config["output_dir"]) / "trainer_state.json").read_text())["log_history"]
    perplexities = [metrics[key] for key in ("base_spec_ppl", "base_general_ppl", "eval_spec_ppl", "eval_general_ppl")]
    return [entry["loss"] for entry in history if "loss" in entry] + perplexities


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_fused_and_cached_as_it_does_naive(
    family: str, small_corpora: dict[str, Path], tmp_path: Path, validate: Validate
) -> None:
    model = build_family(family, tmp_path / family)
    config = family_config(model, small_corpora, tmp_path / "naive")
    loaded = AutoModelForCausalLM.from_pretrained(model)
    assert isinstance(select_loss_impl(validate(config), get_objective("mft"), loaded), ChunkedLoss)  # auto fuses
    expected = {
        "full": trace(validate, {**config, "loss_impl": "naive"}),
        "lora": trace(validate, {**config, **lora(family), "loss_impl": "naive", "output_dir": str(tmp_path / "lora-naive")}),
    }
    assert len(expected["full"]) == 2 + 4
    for name, extra in FUSED_RUNS.items():
        adapter = lora(family) if name.startswith("lora") else {}
        got = trace(validate, {**config, **extra, **adapter, "output_dir": str(tmp_path / name)})
        reference = expected["lora" if adapter else "full"]
        assert got == pytest.approx(reference, rel=1e-5), name
