"""Axolotl 0.18.0's own example YAMLs, changed only where a user moving here must change them
(tests/axolotl_population.py), validate (issue 25); the keys that made them fail mean what they mean in Axolotl."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from mft_plugin.config.errors import ConfigError, validate_config
from mft_plugin.models.loading import load_tokenizer
from mft_plugin.train.recipe import training_arguments
from tests.axolotl_population import POPULATION, problems_of

VALIDATING = 150  # of the 198 (51 before issue 25); README "Axolotl's example YAMLs" lists what stops the rest


def test_the_population_is_axolotls_198_supervised_text_examples() -> None:
    assert len(list(POPULATION.glob("*.y*ml"))) == 198
    assert (POPULATION / "NOTICE.md").is_file()


def test_axolotls_examples_validate(tmp_path: Path) -> None:
    failing = {path.name: found for path in sorted(POPULATION.glob("*.y*ml")) if (found := problems_of(path, tmp_path / path.stem))}
    assert 198 - len(failing) >= VALIDATING, "\n".join(p for found in failing.values() for p in found)


# --- evaluation without a validation set -----------------------------------------------------------


def test_evals_per_epoch_without_a_validation_set_trains_unevaluated(base_config: dict[str, Any]) -> None:
    config = validate_config({**base_config, "test_datasets": None, "eval_steps": None, "evals_per_epoch": 4})
    (note,) = config.start_notes
    assert note.startswith("evals_per_epoch: 4 with no specialized validation set") and "without S" in note
    args = training_arguments(config, train_blocks=40, evaluate=False)
    assert args.eval_strategy == "no" and not args.load_best_model_at_end
    with pytest.raises(ConfigError, match="evals_per_epoch: 0 is no evaluation"):
        validate_config({**base_config, "eval_steps": None, "evals_per_epoch": 0})


# --- keys of Axolotl's current spelling ------------------------------------------------------------


def test_warmup_steps_below_one_is_a_ratio(base_config: dict[str, Any]) -> None:
    assert training_arguments(validate_config({**base_config, "warmup_steps": 0.1}), 40, True).warmup_steps == 0.1
    assert validate_config({**base_config, "warmup_steps": 10.0}).warmup_steps == 10
    with pytest.raises(ConfigError, match="warmup_steps: 2.5 is neither a whole number of steps nor a fraction below 1"):
        validate_config({**base_config, "warmup_steps": 2.5})


def test_top_level_fsdp_version(base_config: dict[str, Any]) -> None:
    assert validate_config({**base_config, "fsdp_version": 2}).fsdp_version == 2
    with pytest.raises(ConfigError, match="fsdp_version: only FSDP2 is supported"):
        validate_config({**base_config, "fsdp_version": 1})


# --- speed-only switches ---------------------------------------------------------------------------


def test_speed_switches_are_said_inactive_once(base_config: dict[str, Any]) -> None:
    keys = {"liger_rms_norm": True, "lora_mlp_kernel": True, "use_kernels": False, "gradient_checkpointing": "offload", "tf32": True}
    config = validate_config({**base_config, **keys})
    notes = config.start_notes
    assert [note.split(":")[0] for note in notes][:3] == ["liger_rms_norm", "lora_mlp_kernel", "activation_offloading"]
    assert all("inactive here" in note for note in notes)
    args = training_arguments(config, 40, True)
    assert args.activation_checkpointing  # the checkpointing half of `offload` is applied
    with pytest.raises(ConfigError, match="activation_offloading"):
        validate_config({**base_config, "activation_offloading": "sometimes"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without FlashAttention")
@pytest.mark.parametrize("keys", [{"flash_attention": True}, {"attn_implementation": "flash_attention_2"}])
def test_flash_attention_without_flash_attn_is_the_default_attention(base_config: dict[str, Any], keys: dict[str, Any]) -> None:
    from mft_plugin.models.loading import load_model
    from mft_plugin.train.preflight import preflight

    config = validate_config({**base_config, **keys})
    key = next(iter(keys))
    assert config.attention is None and config.start_notes == [
        f"{key}: flash_attention_2 inactive here (speed only, same loss): FlashAttention runs on a CUDA GPU with "
        "the flash-attn package; the model's default attention runs"
    ]
    preflight(config)
    assert load_model(config).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("keys", [{"xformers_attention": True}, {"attn_implementation": "xformers"}])
def test_axolotls_xformers_attention_is_the_default_attention(base_config: dict[str, Any], keys: dict[str, Any]) -> None:
    """Axolotl's xformers patch (archived/xgen-7b) computes the model's attention; mft-run does not apply it, says so once."""
    from mft_plugin.models.loading import load_model

    config = validate_config({**base_config, **keys})
    assert config.attention is None and config.start_notes == [
        f"{next(iter(keys))}: xformers inactive here (speed only, same loss): Axolotl's xformers attention patch, which runs "
        "inside `axolotl train` on a CUDA GPU; the model's default attention runs"
    ]
    assert load_model(config).config._attn_implementation == "sdpa"


# --- chat_template: end-of-turn tokens, reasoning traces, Axolotl's older spelling ------------------

# a template whose turns end with "|" (one token of the shipped tokenizer) and that writes a reasoning trace
JINJA = (
    "{% for m in messages %}[{{ m['role'] }}]{% if m['reasoning_content'] %}<{{ m['reasoning_content'] }}>{% endif %}"
    "{{ m['content'] }}|{% endfor %}"
)
TALK = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello.", "thought": "greet"}]


def _labelled(tokenizer: Any, record: dict[str, Any], **params: Any) -> tuple[str, str]:
    """The rendered record and its labelled tokens, decoded."""
    from mft_plugin.data.labels import IGNORE_INDEX
    from mft_plugin.registry import default_registry

    chat = default_registry().get("format", "chat_template").cls(chat_template="jinja", chat_template_jinja=JINJA, **params)
    row = chat.tokenize(record, tokenizer, False)
    labelled = [token for token, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    return tokenizer.decode(row["input_ids"]), tokenizer.decode(labelled)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from tests.tiny import REFERENCE_MODEL

    return AutoTokenizer.from_pretrained(REFERENCE_MODEL)


@pytest.mark.parametrize(
    ("params", "labelled"),
    [
        ({}, "Hello."),  # the template writes no EOS: no turn end is labelled (Axolotl's default eot_tokens: [eos])
        ({"eot_tokens": ["|"]}, "Hello.|"),  # train_on_eot follows train_on_eos: turn
        ({"eot_tokens": ["|"], "train_on_eot": "all"}, "|Hello.|"),
        ({"eot_tokens": ["|"], "train_on_eot": "last"}, "Hello.|"),
        ({"eot_tokens": ["|", "<never>"], "train_on_eos": "none"}, "Hello."),  # a token the template lacks is skipped
        ({"eot_tokens": ["|"], "field_thinking": "thought"}, "greet>Hello.|"),  # the trace of a trained turn is trained
    ],
)
def test_end_of_turn_tokens_and_reasoning_traces(tokenizer: Any, params: dict[str, Any], labelled: str) -> None:
    whole, found = _labelled(tokenizer, {"messages": TALK}, **params)
    thought = "<greet>" if "field_thinking" in params else ""
    assert whole == f"[user]Hi?|[assistant]{thought}Hello.|" and found == labelled


def test_end_of_turn_token_errors(tokenizer: Any) -> None:
    from mft_plugin.strategy import RecordError

    with pytest.raises(RecordError, match=r"eot_tokens: 'reasoning_content' is \d+ tokens of this tokenizer, not one"):
        _labelled(tokenizer, {"messages": TALK}, eot_tokens=["reasoning_content"])
    with pytest.raises(RecordError, match="train_on_eot and train_on_eos disagree"):
        _labelled(tokenizer, {"messages": TALK}, eot_tokens=["</s>"], train_on_eot="all")


def test_older_message_field_spelling_and_dropped_system_message(tokenizer: Any) -> None:
    record = {"messages": [{"from": "system", "value": "Be brief."}] + [{"from": m["role"], "value": m["content"]} for m in TALK]}
    params = {"message_field_role": "from", "message_field_content": "value", "drop_system_message": True}
    assert _labelled(tokenizer, record, **params) == ("[user]Hi?|[assistant]Hello.|", "Hello.")
    with pytest.raises(ValueError, match="message_field_role: 'from' and message_property_mappings.role: 'who' disagree"):
        _labelled(tokenizer, record, message_field_role="from", message_property_mappings={"role": "who"})


def test_top_level_eot_tokens_are_the_chat_entries_default(base_config: dict[str, Any], tmp_path: Path) -> None:
    import json

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": TALK}) + "\n")
    entry = {"path": str(chat), "type": "chat_template", "chat_template": "jinja", "chat_template_jinja": JINJA}
    config = validate_config({**base_config, "datasets": [entry], "eot_tokens": ["|"]})
    assert config.datasets[0].eot_tokens == ["|"]


# --- model, schedule and checkpoint keys -------------------------------------------------------------


def test_model_config_overrides_reach_student_and_teacher(base_config: dict[str, Any]) -> None:
    from mft_plugin.models.loading import load_frozen_teacher, load_model

    config = validate_config({**base_config, "model_config": {"output_router_logits": True, "rms_norm_eps": 1e-3}})
    for model in (load_model(config), load_frozen_teacher(config)):
        assert model.config.output_router_logits is True and model.config.rms_norm_eps == 1e-3
        assert model.model.norm.variance_epsilon == 1e-3  # read by the layers as they are built


def test_resize_token_embeddings_to_32x(base_config: dict[str, Any]) -> None:
    from mft_plugin.models.loading import load_model

    config = validate_config({**base_config, "tokens": ["<clause>"], "resize_token_embeddings_to_32x": True})
    rows = load_model(config).get_input_embeddings().num_embeddings
    assert rows % 32 == 0 and rows >= 4097  # the tokenizer's 4097, rounded up


def test_cosine_min_lr_ratio_is_axolotls_floor(base_config: dict[str, Any]) -> None:
    import math

    import torch
    from transformers import get_scheduler

    config = validate_config({**base_config, "cosine_min_lr_ratio": 0.1, "warmup_steps": 2, "max_steps": 10})
    args = training_arguments(config, 40, True)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_scheduler(args.lr_scheduler_type, optimizer, 2, 10, scheduler_specific_kwargs=args.lr_scheduler_kwargs)

    def axolotl(step: int) -> float:  # axolotl.utils.schedulers._get_cosine_schedule_with_min_lr_lambda
        if step < 2:
            return step / 2
        return (1 - 0.1) * 0.5 * (1.0 + math.cos(math.pi * (step - 2) / 8)) + 0.1

    for step in range(11):
        assert schedule.lr_lambdas[0](step) == pytest.approx(axolotl(step))
    with pytest.raises(ConfigError, match="0.1 is the floor of lr_scheduler: cosine, and lr_scheduler is 'linear'"):
        validate_config({**base_config, "lr_scheduler": "linear", "cosine_min_lr_ratio": 0.1})


def test_lr_quadratic_warmup_is_axolotls_schedule_in_a_run(two_step_config: dict[str, Any]) -> None:
    import math

    from mft_plugin import run

    config = validate_config({**two_step_config, "max_steps": 5, "save_steps": 5, "warmup_steps": 2, "lr_quadratic_warmup": True})
    run(config)
    state = json.loads((Path(config.output_dir) / "trainer_state.json").read_text())
    logged = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]

    def axolotl(step: int) -> float:  # axolotl.utils.schedulers._get_cosine_schedule_with_quadratic_warmup_lr_lambda
        if step < 2:
            return (step / 2) ** 2
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * (step - 2) / 3)))

    assert logged == pytest.approx([config.learning_rate * axolotl(step) for step in range(5)])  # each step's own rate
    with pytest.raises(ConfigError, match="lr_quadratic_warmup is a warmup of lr_scheduler: cosine without cosine_min_lr_ratio"):
        validate_config({**two_step_config, "lr_quadratic_warmup": True, "lr_scheduler": "linear"})


def test_cosine_constant_lr_ratio_zero_is_off_as_in_axolotl(base_config: dict[str, Any]) -> None:
    validate_config({**base_config, "cosine_constant_lr_ratio": 0})  # Axolotl's scheduler tests the ratio's truth
    with pytest.raises(ConfigError, match="cosine_constant_lr_ratio: 0.8 is not supported: Axolotl's cosine-then-constant"):
        validate_config({**base_config, "cosine_constant_lr_ratio": 0.8})


def test_save_only_model(base_config: dict[str, Any]) -> None:
    assert training_arguments(validate_config({**base_config, "save_only_model": True}), 40, True).save_only_model
    with pytest.raises(ConfigError, match="save_only_model: true keeps no optimizer states"):
        validate_config({**base_config, "save_only_model": True, "resume_from_checkpoint": True})


def test_unfrozen_parameters_train_only_the_named_parameters(two_step_config: dict[str, Any], tiny_model: Path) -> None:
    from safetensors.torch import load_file

    from mft_plugin.train.recipe import run

    # Axolotl's spelling: '.' is a literal dot; rows [:5] of the (tied) embeddings, all of layer 1's MLP
    patterns = ["model.layers.1.mlp", "^model.embed_tokens.weight$[:5]"]
    config = validate_config({**two_step_config, "unfrozen_parameters": patterns, "weight_decay": 0.0})
    run(config)
    base, trained = load_file(tiny_model / "model.safetensors"), load_file(Path(config.output_dir) / "model.safetensors")
    changed = {name for name in base if not torch.equal(base[name], trained[name])}
    assert changed == {f"model.layers.1.mlp.{proj}_proj.weight" for proj in ("gate", "up", "down")} | {"model.embed_tokens.weight"}
    rows = (base["model.embed_tokens.weight"] != trained["model.embed_tokens.weight"]).any(dim=1).nonzero().flatten()
    assert rows.tolist() and max(rows.tolist()) < 5


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"unfrozen_parameters": ["layers.(1"]}, r"unfrozen_parameters: 'layers\.\(1' is not a pattern: missing \)"),
        ({"unfrozen_parameters": ["lm_head$[4:2]"]}, "the end must be greater than the start"),
        ({"unfrozen_parameters": ["lm_head"], "adapter": "lora"}, "unfrozen_parameters: freezes all but the named parameters of a full finetuning; with the 'lora' adapter"),
    ],
)
def test_unfrozen_parameters_errors(base_config: dict[str, Any], keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config({**base_config, **keys})


def test_unfrozen_parameters_that_name_nothing(base_config: dict[str, Any]) -> None:
    from mft_plugin.models.freezing import freeze_except
    from mft_plugin.models.loading import load_model

    model = load_model(validate_config({**base_config, "unfrozen_parameters": ["transformer.h"]}))
    with pytest.raises(ConfigError, match=r"no parameter of the model matches any of \['transformer.h'\], so nothing would train"):
        freeze_except(model, ["transformer.h"])


def test_tokenizer_use_mistral_common_is_refused_naming_the_package(base_config: dict[str, Any]) -> None:
    assert validate_config({**base_config, "tokenizer_use_mistral_common": False}).tokenizer_use_mistral_common is False
    with pytest.raises(ConfigError, match=r"tokenizer_use_mistral_common: true is not supported: Axolotl then tokenizes "
                       r"with the mistral-common package .*\(pip install mistral-common\) would not be enough"):
        validate_config({**base_config, "tokenizer_use_mistral_common": True})


# --- checkpoint formats, hub revisions, tokenizer options, keys Axolotl drops -----------------------

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # E2M1, by code
MXFP4 = {"model_quantization_config": "Mxfp4Config", "model_quantization_config_kwargs": {"dequantize": True}}


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 1-layer gpt-oss stored as gpt-oss is on the hub: each expert weight as MXFP4 blocks (two E2M1 codes
    a byte, the low nibble first, 32 values a block) and one E8M0 scale a block; with each weight's value
    dequantized naively, code by code: FP4_VALUES[code] * 2 ** (scale - 127)."""
    from safetensors.torch import load_file, save_file
    from transformers import GptOssConfig, GptOssForCausalLM

    from tests.tiny import REFERENCE_MODEL

    folder = tmp_path_factory.mktemp("tiny-gpt-oss-mxfp4")
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL)
    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["full_attention"])  # fmt: skip
    GptOssForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    weights, expected = load_file(folder / "model.safetensors"), {}
    for proj in ("gate_up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.{proj}"
        experts, inputs, outputs = weights.pop(name).shape  # the parameter is [expert, in, out]; blocks run along in
        codes = torch.randint(0, 16, (experts, outputs, inputs))
        scales = torch.randint(123, 131, (experts, outputs, inputs // 32), dtype=torch.uint8)
        blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
        weights[f"{name}_blocks"] = blocks.to(torch.uint8).reshape(experts, outputs, inputs // 32, 16)
        weights[f"{name}_scales"] = scales
        expected[name] = torch.tensor([[[FP4_VALUES[codes[e, o, i]] * 2.0 ** (int(scales[e, o, i // 32]) - 127)
                                         for o in range(outputs)] for i in range(inputs)] for e in range(experts)])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    stored = json.loads((folder / "config.json").read_text())
    stored["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                     "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(stored))
    return folder, expected


def test_an_mxfp4_checkpoint_loads_as_its_exact_dequantized_weights(
    base_config: dict[str, Any], mxfp4_checkpoint: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    from mft_plugin.models.loading import load_frozen_teacher, load_model
    from mft_plugin.train.preflight import preflight

    folder, expected = mxfp4_checkpoint
    config = validate_config({**base_config, "base_model": str(folder), **MXFP4})
    preflight(config)
    for model in (load_model(config), load_frozen_teacher(config)):  # student and full finetuning's teacher alike
        parameters = dict(model.named_parameters())
        for name, values in expected.items():
            assert parameters[name].dtype == torch.float32 and torch.equal(parameters[name], values)
    with pytest.raises(ConfigError, match=r"stores its weights quantized \(mxfp4, config.json quantization_config\); "
                       r"set model_quantization_config: Mxfp4Config"):  # fmt: skip
        preflight(validate_config({**base_config, "base_model": str(folder)}))


def test_a_checkpoint_quantized_otherwise_is_refused_before_loading(base_config: dict[str, Any], tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    from mft_plugin.train.preflight import preflight

    folder = shutil.copytree(tiny_model, tmp_path / "fp8-model")
    stored = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**stored, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ConfigError, match=r"stores its weights quantized \(fp8, config.json quantization_config\), a scheme"):
        preflight(validate_config({**base_config, "base_model": str(folder)}))


@pytest.mark.parametrize(("keys", "message"), [
    ({"model_quantization_config": "FineGrainedFP8Config"}, "'FineGrainedFP8Config' is not supported: fp8 weights and matmuls change the loss"),
    ({"model_quantization_config": "Mxfp4Config"}, "Mxfp4Config needs model_quantization_config_kwargs: {dequantize: true}"),
    ({**MXFP4, "model_quantization_config_kwargs": {"dequantize": False}}, "only {dequantize: true} is supported"),
    ({"model_quantization_config_kwargs": {"dequantize": True}}, "read only with model_quantization_config: Mxfp4Config"),
    ({**MXFP4, "adapter": "qlora", "load_in_4bit": True}, "cannot be combined with load_in_4bit/load_in_8bit"),
])  # fmt: skip
def test_model_quantization_config_errors(base_config: dict[str, Any], keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config({**base_config, **keys})


def test_revision_of_model_reads_that_revision_of_a_hub_model(tiny_model: Path, tmp_path: Path) -> None:
    """Two revisions of a hub model in an offline hub cache: ``revision_of_model`` (Axolotl's
    ``model_revision`` too) picks the one the student and the tokenizer load from."""
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    repo = tmp_path / "hub" / "models--acme--tiny"
    for ref, commit in (("main", "a" * 40), ("v1", "b" * 40)):
        shutil.copytree(tiny_model, repo / "snapshots" / commit)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    weights = repo / "snapshots" / ("b" * 40) / "model.safetensors"
    save_file({name: tensor + 1 if name == "model.norm.weight" else tensor for name, tensor in load_file(weights).items()}, weights)
    script = (
        "import sys; from mft_plugin.config.errors import validate_config; from mft_plugin.models.loading import load_model\n"
        "for keys in ({}, {'revision_of_model': 'v1'}, {'model_revision': 'v1'}):\n"
        "    config = validate_config({'base_model': 'acme/tiny', 'datasets': [{'path': sys.argv[1]}], **keys})\n"
        "    print(round(float(load_model(config).model.norm.weight.mean()), 4))"
    )
    corpus = tmp_path / "spec.txt"
    corpus.write_text("One clause.\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script, str(corpus)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    main, v1, alias = map(float, result.stdout.split())
    assert v1 == alias == pytest.approx(main + 1)


def test_bfloat16_weights_train_in_bf16_with_the_fused_loss_equal_to_the_plain_one(base_config: dict[str, Any], tmp_path: Path) -> None:
    """Axolotl's pure bf16 training: student, teacher and the measured base all hold bf16 weights; the fused
    loss gives the plain one's metrics (the same bf16 logits, float32 softmaxes), and an unchanged model
    is measured as its base exactly (S = DG = 0: a learning rate of 1e-30 moves no bf16 weight)."""
    from mft_plugin import run
    from mft_plugin.models.loading import load_frozen_teacher, load_model

    config = validate_config({**base_config, "bfloat16": True})
    assert {p.dtype for p in load_model(config).parameters()} == {p.dtype for p in load_frozen_teacher(config).parameters()} == {torch.bfloat16}
    keys = {**base_config, "bfloat16": True, "max_steps": 2, "eval_steps": 2}
    trained = {impl: run(validate_config({**keys, "loss_impl": impl, "output_dir": str(tmp_path / impl)})) for impl in ("naive", "chunked")}
    for metric in ("eval_spec_ppl", "eval_general_ppl", "base_spec_ppl", "base_general_ppl"):
        assert trained["chunked"][metric] == pytest.approx(trained["naive"][metric], rel=1e-3), metric
    assert trained["chunked"]["eval_spec_ppl"] < trained["chunked"]["base_spec_ppl"]  # it trained
    still = run(validate_config({**keys, "learning_rate": 1e-30, "output_dir": str(tmp_path / "still")}))
    assert still["eval_S"] == 0.0 and still["eval_DG"] == 0.0


@pytest.mark.parametrize(("keys", "message"), [
    ({"bfloat16": True, "float16": True}, "bfloat16 and float16 cannot both be true"),
    ({"float16": True, "fp16": True}, "float16: true holds the weights in float16, which fp16: true cannot compute over"),
    ({"bfloat16": True, "fp16": True}, "bfloat16: true holds the weights in bfloat16, which fp16: true cannot compute over"),
])  # fmt: skip
def test_half_precision_weight_errors(base_config: dict[str, Any], keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config({**base_config, **keys})


def test_curriculum_sampling_trains_on_the_rows_in_their_order(base_config: dict[str, Any], corpora: dict[str, Path]) -> None:
    from datasets import Dataset
    from transformers import Trainer

    config = validate_config({**base_config, "curriculum_sampling": True, "sample_packing_sequentially": True})
    args = training_arguments(config, 40, evaluate=False)
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=Dataset.from_dict({"x": list(range(12))}))
    assert list(trainer._get_train_sampler()) == list(range(12))  # the Trainer's own sampler, unshuffled
    replay = {"name": "replay", "ratio": 0.5, "datasets": [{"path": str(corpora["general_val"])}]}
    for keys, message in (({"group_by_length": True}, "curriculum_sampling keeps the data's order, and group_by_length regroups it"),
                          ({"mitigations": [replay]}, "curriculum_sampling: replay composes every micro-batch")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate_config({**base_config, "curriculum_sampling": True, **keys})


def test_tokenizer_legacy_is_the_tokenizers_legacy_argument(base_config: dict[str, Any]) -> None:
    assert load_tokenizer(validate_config({**base_config, "tokenizer_legacy": False})).init_kwargs["legacy"] is False
    assert "legacy" not in load_tokenizer(validate_config(base_config)).init_kwargs  # unset: the tokenizer's own


def test_keys_axolotl_drops_or_does_not_run_here_are_said_once(base_config: dict[str, Any]) -> None:
    keys = {"debug": True, "test_value": True, "base_model_ignore_patterns": "*.pth", "sample_packing_seq_len_multiplier": 2,
            "nvfp4_merge_aware": True, "dsv4_fp4_grouped_mode": "nvfp4", "use_glm_dsa_kernels": True, "flash_optimum": True,
            "hf_use_auth_token": True, "revision_of_model": "main"}  # fmt: skip
    notes = validate_config({**base_config, **keys}).start_notes
    said = {note.split(":")[0] for note in notes}
    assert said == set(keys), notes
    assert len(notes) == len(keys)
    assert "revision_of_model: 'main' has no effect: base_model is a local folder" in "\n".join(notes)
    assert all("inactive here (speed only, same loss)" in note for note in notes if note.split(":")[0] in
               ("dsv4_fp4_grouped_mode", "use_glm_dsa_kernels", "flash_optimum"))  # fmt: skip


# --- mixture-of-experts keys -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer Mixtral (4 fused experts) with the shipped tokenizer."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from tests.tiny import REFERENCE_MODEL

    folder = tmp_path_factory.mktemp("tiny-moe")
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_quantize_moe_experts(base_config: dict[str, Any], tiny_moe: Path) -> None:
    import torch

    from mft_plugin.models.experts import expert_parameters
    from mft_plugin.models.loading import load_model

    qlora = {**base_config, "base_model": str(tiny_moe), "adapter": "qlora", "load_in_4bit": True}
    plain, quantized = load_model(validate_config(qlora)), load_model(validate_config({**qlora, "quantize_moe_experts": True}))
    experts = expert_parameters(plain)
    assert [name for _, name in experts] == ["gate_up_proj", "down_proj"]
    assert expert_parameters(quantized) == []  # each one is now a parametrization of packed 4-bit data
    for (reference, name) in experts:
        module = quantized.get_submodule(next(path for path, m in plain.named_modules() if m is reference))
        stored = module.parametrizations[name].original  # packed 4-bit
        assert stored.dtype == torch.uint8 and stored.numel() * 2 == getattr(reference, name).numel()
        weight, full = getattr(module, name), getattr(reference, name)  # dequantized on access
        assert weight.shape == full.shape and torch.allclose(weight, full, atol=0.2 * full.abs().max().item())
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.allclose(quantized(ids).logits, plain(ids).logits, atol=0.1)
    with pytest.raises(ConfigError, match="quantize_moe_experts quantizes the experts as the base is: it needs load_in_4bit or load_in_8bit"):
        validate_config({**base_config, "adapter": "lora", "quantize_moe_experts": True})


def test_quantize_moe_experts_in_8_bits(base_config: dict[str, Any], tiny_moe: Path) -> None:
    """``load_in_8bit`` with ``quantize_moe_experts`` (Axolotl's 8-bit experts): each expert weight is stored
    as int8 rows of its float16 copy, code = round(127 w / max|row|), and read back as code * max|row| / 127."""
    from mft_plugin.models.experts import expert_parameters
    from mft_plugin.models.loading import load_model

    lora = {**base_config, "base_model": str(tiny_moe), "adapter": "lora", "load_in_8bit": True}
    plain, quantized = load_model(validate_config(lora)), load_model(validate_config({**lora, "quantize_moe_experts": True}))
    experts = expert_parameters(plain)
    assert len(experts) == 2 and expert_parameters(quantized) == []
    for reference, name in experts:
        module = quantized.get_submodule(next(path for path, m in plain.named_modules() if m is reference))
        half = getattr(reference, name).detach().to(torch.float16).float()
        row_max = half.abs().amax(-1, keepdim=True)
        codes = torch.round(half * (127 / row_max))  # the scale 127 / max first, as bitsandbytes computes it
        assert torch.equal(module.parametrizations[name].original, codes.to(torch.int8))
        torch.testing.assert_close(getattr(module, name), codes * row_max / 127, rtol=1e-6, atol=1e-7)
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.allclose(quantized(ids).logits, plain(ids).logits, atol=0.1)


def test_lora_target_parameters_train_the_fused_experts(base_config: dict[str, Any], tiny_moe: Path) -> None:
    import torch

    from mft_plugin.models.loading import load_model
    from mft_plugin.registry import default_registry

    keys = {"adapter": "lora", "lora_target_modules": ["q_proj"], "lora_target_parameters": ["mlp.experts.gate_up_proj"]}
    config = validate_config({**base_config, "base_model": str(tiny_moe), **keys})
    (spec,) = config.mitigations
    adapter = default_registry().get("mitigation", spec.name).cls(spec)
    model = adapter.prepare_model(load_model(config), None)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("experts" in name and "lora_A" in name for name in trained) and any("q_proj.lora_A" in name for name in trained)
    model(torch.tensor([[1, 5, 9, 13]]), labels=torch.tensor([[1, 5, 9, 13]])).loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if p.requires_grad and "lora_B" in name)


# --- a sample trains 2 steps -------------------------------------------------------------------------

# One per family (llama, qwen, gemma, mistral, phi) and format. One file that validates reads `completion`, none
# `input_output` (Axolotl's other examples of those are pretraining, diffusion or sequence-parallel runs). Not here:
# the Gemma and Mistral chat files, whose end-of-turn token / `model.language_model` LoRA targets the shipped
# model lacks, and those with torchao's optimizers (adamw_torch_4bit, _8bit), which need that package.
TRAINED_SAMPLE = [
    "llama-3__instruct-lora-8b.yml",  # llama, chat_template, LoRA
    "llama-3__lora-8b.yml",  # llama, alpaca, LoRA
    "archived__qwen__lora.yml",  # qwen, alpaca, LoRA
    "deepcogito__cogito-v1-preview-qwen-14B-lora.yml",  # qwen, chat_template, LoRA
    "archived__gemma__qlora.yml",  # gemma, alpaca, QLoRA
    "mistral__lora.yml",  # mistral, alpaca, LoRA
    "phi__phi-ft.yml",  # phi, alpaca, full finetuning
    "qat_nvfp4__Qwen2.5-72B_baseline.yml",  # qwen, alpaca, a top-level chat_template (the saved tokenizer's)
    "archived__xgen-7b__xgen-7b-8k-qlora.yml",  # completion, QLoRA, gptq_* left empty, auto_resume_from_checkpoints
    "archived__falcon__config-7b-lora.yml",  # alpaca:chat, LoRA, batch_size
]


@pytest.mark.parametrize("name", TRAINED_SAMPLE)
def test_a_sample_of_axolotls_examples_trains_two_steps(name: str, tiny_model: Path, tmp_path: Path) -> None:
    """Changed as :func:`user_changes` changes them, on the tiny model, 96-token rows, 2 steps, in-process."""
    import yaml

    from mft_plugin.train.recipe import run
    from tests.axolotl_population import user_changes

    changed = user_changes(yaml.safe_load((POPULATION / name).read_text(encoding="utf-8")), tmp_path / "data")
    fast = {"base_model": str(tiny_model), "sequence_len": 96, "max_steps": 2, "output_dir": str(tmp_path / "out"),
            "dataset_prepared_path": str(tmp_path / "prepared")}  # some write last_run_prepared, relative to the cwd
    config = validate_config({**changed, **fast}, source=name)
    metrics = run(config)
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text(encoding="utf-8"))["global_step"] == 2
    assert metrics.get("step", 2) == 2  # the best evaluation's step, where the run evaluates
    if config.tokenizer_chat_template:  # Axolotl's top-level chat_template is the saved tokenizer's
        saved = (tmp_path / "out" / "chat_template.jinja").read_text(encoding="utf-8")
        assert saved == load_tokenizer(config).chat_template != AutoTokenizer.from_pretrained(tiny_model).chat_template
