"""peft adapters: Axolotl's keys, the shared-base teacher (plain, 8-bit, 4-bit), saving and merging,
and full finetuning with a cheap (quantized / bfloat16) frozen teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from mft_plugin import run
from mft_plugin.config.errors import ConfigError, validate_config
from mft_plugin.train.context import RecipeContext
from mft_plugin.models.loading import load_frozen_teacher, load_model, load_tokenizer
from mft_plugin.train.recipe import build_strategies
from mft_plugin.registry import default_registry
from mft_plugin.teacher.sources import FrozenCopyTeacher, SharedBaseTeacher, build_teacher

QUANTIZED = {"plain": {}, "8bit": {"load_in_8bit": True}, "4bit": {"load_in_4bit": True, "bnb_4bit_use_double_quant": True}}


def spec(config: Any) -> dict[str, Any]:
    return config.mitigations[-1].model_dump()


# --- configuration ----------------------------------------------------------------------------


def test_axolotl_keys_become_the_lora_mitigation(base_config: dict[str, Any]) -> None:
    axolotl = {"adapter": "lora", "lora_r": 4, "lora_alpha": 32, "lora_dropout": 0.1, "lora_target_linear": True}
    config = validate_config({**base_config, **axolotl})
    assert spec(config) == {
        "name": "lora", "r": 4, "lora_alpha": 32.0, "lora_dropout": 0.1, "target_modules": "all-linear",
        "modules_to_save": None, "target_parameters": None, "use_dora": False, "fan_in_fan_out": False, "use_rslora": False,
        "lora_model_dir": None,
    }  # fmt: skip
    assert "adapter" not in config.model_dump()  # one spelling in the resolved config
    resolved = validate_config(config.model_dump(mode="json"))  # a run's config.yml validates again
    assert spec(resolved) == spec(config)


def test_peft_use_dora_selects_dora_and_qlora_needs_4bit(base_config: dict[str, Any]) -> None:
    dora = validate_config({**base_config, "adapter": "lora", "peft_use_dora": True, "lora_target_modules": ["q_proj"]})
    assert (spec(dora)["name"], spec(dora)["use_dora"], spec(dora)["target_modules"]) == ("dora", True, ["q_proj"])
    qlora = validate_config({**base_config, "adapter": "qlora", "load_in_4bit": True, "lora_modules_to_save": ["lm_head"]})
    assert spec(qlora)["name"] == "lora" and qlora.load_in_4bit and spec(qlora)["modules_to_save"] == ["lm_head"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"adapter": "lora", "mitigations": ["dora"]}, "adapter: lora and mitigations: dora both choose an adapter"),
        ({"mitigations": ["ia3", "lora"]}, "mitigations 'ia3' and 'lora' cannot be combined"),
        ({"lora_r": 8, "mitigations": ["lora"]}, "lora_r is an Axolotl adapter key and needs `adapter: lora`; with mitigations: lora"),
        ({"adapter": "qlora"}, "adapter: qlora needs load_in_4bit: true"),
        ({"adapter": "ia3"}, "adapter: 'ia3' is not one of: lora, qlora"),
        ({"load_in_4bit": True}, "load_in_4bit: a quantized base trains only through an adapter"),
        ({"load_in_4bit": True, "load_in_8bit": True, "mitigations": ["lora"]}, "cannot both be true"),
        ({"teacher": {"load_in_4bit": True}, "mitigations": ["lora"]}, "teacher: with the 'lora' adapter"),
        ({"merge_adapter": True}, "merge_adapter: true needs an adapter mitigation"),
        ({"mitigations": [{"name": "dora", "use_dora": False}]}, r"mitigations\.0\.use_dora"),
        ({"mitigations": [{"name": "ia3", "feedforward_modules": ["down_proj"]}]}, "give target_modules too"),
    ],
)
def test_adapter_keys_are_validated(base_config: dict[str, Any], extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config({**base_config, **extra})


def test_adapter_keys_without_an_adapter_are_full_finetuning_said_at_start(base_config: dict[str, Any]) -> None:
    """As in Axolotl (its archived examples write ``adapter:`` empty beside ``lora_r``): full finetuning, the keys
    unread, and the start of the run says so."""
    config = validate_config({**base_config, "adapter": None, "lora_r": 64, "lora_alpha": 16, "lora_fan_in_fan_out": False})
    assert config.mitigations == [] and config.adapter_keys_without_adapter == ["lora_r", "lora_alpha", "lora_fan_in_fan_out"]
    assert "lora_r, lora_alpha, lora_fan_in_fan_out: no effect: adapter is empty, so this is full finetuning" in " ".join(config.start_notes)
    assert "adapter_keys_without_adapter" not in config.model_dump()  # not in the resolved config


def test_quantization_without_bitsandbytes_is_a_config_error(base_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else find_spec(name))
    with pytest.raises(ConfigError, match=r"need bitsandbytes: pip install 'mft-plugin\[quantization\]'"):
        validate_config({**base_config, "teacher": {"load_in_8bit": True}})


@pytest.mark.parametrize(("name", "peft_type", "dora"), [("lora", "LORA", False), ("dora", "LORA", True), ("ia3", "IA3", None)])
def test_peft_config_keeps_peft_option_names(name: str, peft_type: str, dora: bool | None) -> None:
    from mft_plugin import get_mitigation

    peft_config = get_mitigation(name).peft_config()
    assert peft_config.peft_type.value == peft_type
    if dora is not None:  # the paper's default: rank 8 on every attention and MLP projection
        assert (peft_config.r, peft_config.target_modules, peft_config.use_dora) == (8, "all-linear", dora)


def test_peft_use_rslora_is_peft_rank_stabilized_scale(base_config: dict[str, Any], tmp_path: Path) -> None:
    """Axolotl's ``peft_use_rslora: true`` is peft's ``use_rslora``: each LoRA layer scales by alpha / sqrt(r)."""
    config = {**base_config, "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "peft_use_rslora": True}
    assert spec(validate_config(config))["use_rslora"] is True
    _, model, _ = adapted_student(config, tmp_path)
    scales = {layer.scaling["default"] for layer in model.modules() if hasattr(layer, "lora_A") and layer.lora_A}
    assert scales == {8 / 4**0.5}  # plain LoRA would be 8 / 4


# --- the teacher is the base ------------------------------------------------------------------


def adapted_student(config_dict: dict[str, Any], tmp_path: Path) -> tuple[Any, torch.nn.Module, RecipeContext]:
    """The student as the recipe builds it (load, then model stage), adapters moved off zero."""
    config = validate_config(config_dict)
    context = RecipeContext(config=config, tokenizer=load_tokenizer(config), output_dir=tmp_path)
    model = load_model(config)
    for mitigation in build_strategies(config, default_registry())[1]:
        model = mitigation.prepare_model(model, context)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)  # a trained-looking adapter (LoRA's B starts at 0)
    return config, model, context


@pytest.mark.parametrize(
    ("adapter", "base"), [("lora", "plain"), ("lora", "8bit"), ("lora", "4bit"), ("dora", "plain"), ("dora", "4bit"), ("ia3", "plain")]
)
def test_teacher_logits_equal_the_untouched_base(base_config: dict[str, Any], tmp_path: Path, adapter: str, base: str) -> None:
    config, student, _ = adapted_student({**base_config, **QUANTIZED[base], "mitigations": [adapter]}, tmp_path)
    teacher = build_teacher(True, student, lambda: pytest.fail("a second copy was loaded"))
    assert isinstance(teacher, SharedBaseTeacher) and teacher.model is student
    untouched = load_model(config).eval()
    input_ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        expected = untouched(input_ids=input_ids).logits
        student.eval()
        adapted = student(input_ids=input_ids).logits
    student.train()
    assert torch.equal(teacher.logits({"input_ids": input_ids}), expected)
    assert not torch.allclose(adapted, expected)  # the adapter is live, and disabled for the teacher
    assert student.training  # the teacher's eval mode does not leak


def storages(*modules: torch.nn.Module) -> dict[int, int]:
    """Distinct tensor storages (data pointer -> bytes) held by the modules' parameters and buffers."""
    held = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return held


@pytest.mark.parametrize("base", ["plain", "4bit"])
def test_no_second_base_copy_with_an_adapter(base_config: dict[str, Any], tmp_path: Path, base: str) -> None:
    config, student, _ = adapted_student({**base_config, **QUANTIZED[base], "mitigations": ["lora"]}, tmp_path)
    teacher = build_teacher(True, student, lambda: pytest.fail("a second copy was loaded"))
    assert storages(student, teacher.model) == storages(student)
    base_bytes = sum(storages(load_model(config)).values())
    adapter_bytes = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
    assert sum(storages(student, teacher.model).values()) == base_bytes + adapter_bytes
    # without an adapter the teacher is a second model: the counting above can tell
    full = load_model(config.model_copy(update={"load_in_4bit": False}))
    copy = build_teacher(True, full, lambda: load_model(config.model_copy(update={"load_in_4bit": False})))
    assert len(storages(full, copy.model)) == 2 * len(storages(full))


def test_a_lora_mft_run_never_loads_a_teacher_copy(
    two_step_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mft_plugin.train.recipe.load_frozen_teacher", lambda config: pytest.fail("a second copy was loaded"))
    config = validate_config({**two_step_config, "mitigations": ["lora"]})
    assert run(config)["train_loss"] > 0


# --- saving -----------------------------------------------------------------------------------


def test_adapter_saved_in_peft_format_and_merged_into_a_plain_model(two_step_config: dict[str, Any]) -> None:
    from peft import PeftModel

    config = validate_config({**two_step_config, "adapter": "lora", "lora_r": 4, "merge_adapter": True})
    run(config)
    out = Path(config.output_dir)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert not hasattr(merged, "peft_config")
    adapted = PeftModel.from_pretrained(load_model(config), str(out)).eval()
    input_ids = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=input_ids).logits, adapted(input_ids=input_ids).logits)
        assert not torch.allclose(merged(input_ids=input_ids).logits, load_model(config)(input_ids=input_ids).logits)


@pytest.mark.parametrize("base", ["8bit", "4bit"])
def test_qlora_mft_trains_on_cpu_and_merges_into_float32(two_step_config: dict[str, Any], base: str) -> None:
    config = validate_config({**two_step_config, **QUANTIZED[base], "mitigations": ["lora"], "merge_adapter": True})
    assert run(config)["train_loss"] > 0
    merged = AutoModelForCausalLM.from_pretrained(Path(config.output_dir) / "merged")
    assert {p.dtype for p in merged.parameters()} == {torch.float32}


# --- full finetuning with a cheap teacher ------------------------------------------------------


@pytest.mark.parametrize(
    ("teacher", "expected", "share"),
    [
        ({"load_in_4bit": True}, "is_loaded_in_4bit", 0.2),  # 0.5 byte per weight + norms, vs 4
        ({"load_in_8bit": True}, "is_loaded_in_8bit", 0.3),
        ({"dtype": "bfloat16"}, None, 0.51),
    ],
)
def test_full_finetuning_with_a_cheap_teacher(
    base_config: dict[str, Any], two_step_config: dict[str, Any], teacher: dict[str, Any], expected: str | None, share: float
) -> None:
    config = validate_config({**base_config, "teacher": teacher})
    frozen = FrozenCopyTeacher(load_frozen_teacher(config))
    if expected:
        assert getattr(frozen.model, expected)
    else:
        assert {p.dtype for p in frozen.model.parameters()} == {torch.bfloat16}
    layer_bytes = lambda model: sum(storages(model.model.layers).values())
    assert layer_bytes(frozen.model) < share * layer_bytes(load_model(config))  # embedding is not quantized)
    input_ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        exact = load_model(config)(input_ids=input_ids).logits.log_softmax(-1)
    cheap = frozen.logits({"input_ids": input_ids}).float().log_softmax(-1)
    kl = torch.nn.functional.kl_div(cheap, exact, log_target=True, reduction="none").sum(-1).mean()
    assert not torch.equal(cheap, exact) and kl < 0.01  # p^T is the base's up to quantization/rounding
    assert run(validate_config({**two_step_config, "teacher": teacher}))["train_loss"] > 0
