"""The YAML schema and its errors: every problem at once, as ``file:line: dotted.key: message``.

No test here loads a model: ``base_model`` points at a folder that does not exist, which schema
validation must never touch.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from mft_plugin.config.errors import ConfigError, load_config

NO_MODEL = "/nonexistent/model-folder"


@pytest.fixture
def train_file(corpora: dict[str, Path]) -> Path:
    return corpora["spec_train"]


def write(tmp_path: Path, text: str, name: str = "config.yml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    assert str(caught.value).startswith("invalid config:")
    return caught.value.problems


def minimal(train_file: Path, objective: str = "objective: mft") -> str:
    """A valid config of four lines (the objective on line 4), to append bad lines to."""
    return f"base_model: {NO_MODEL}\ndatasets:\n  - path: {train_file}\n{objective}\n"


# ---------------------------------------------------------------- valid configs


def test_valid_config(tmp_path: Path, train_file: Path, corpora: dict[str, Path]) -> None:
    path = write(
        tmp_path,
        f"""
        base_model: {NO_MODEL}
        datasets:
          - path: {train_file}
            type: completion
        test_datasets:
          - path: {corpora["spec_val"]}
        general_eval_datasets:
          - path: {corpora["general_val"]}
        sequence_len: 32
        max_steps: 2
        learning_rate: 1.0e-3
        seed: 7
        objective:
          name: mft
          tau: 0.5
        """,
    )
    config = load_config(path)
    assert config.base_model == NO_MODEL
    assert config.datasets[0].path == str(train_file) and config.datasets[0].field == "text"
    assert (config.sequence_len, config.max_steps, config.learning_rate, config.seed) == (32, 2, 1e-3, 7)
    assert (config.objective.name, config.objective.tau) == ("mft", 0.5)
    assert config.mitigations == []


@pytest.mark.parametrize(
    ("line", "name", "tau"),
    [
        ("objective: mft", "mft", 0.25),
        ("objective: singly_corrective", "singly_corrective", 0.25),
        ("objective: ft", "ft", None),
        ("objective: {name: distill_ft}", "distill_ft", None),
        ("mitigations: []", "mft", 0.25),  # no objective key: MFT with the paper's tau
        ("objective:", "mft", 0.25),  # left empty: the default, as every empty key in Axolotl
    ],
)
def test_objective_forms_and_defaults(
    tmp_path: Path, train_file: Path, line: str, name: str, tau: float | None
) -> None:
    config = load_config(write(tmp_path, minimal(train_file, line)))
    assert config.objective.name == name
    assert getattr(config.objective, "tau", None) == tau
    assert config.mitigations == []


# ---------------------------------------------------------------- unknown keys, types, names, bounds


def test_unknown_top_level_key(tmp_path: Path, train_file: Path) -> None:
    path = write(tmp_path, minimal(train_file) + "lerning_rate: 0.001\n")
    assert problems(path) == [f"{path}:5: lerning_rate: unknown key; did you mean 'learning_rate'?"]


def test_unknown_key_in_a_dataset(tmp_path: Path, train_file: Path) -> None:
    path = write(
        tmp_path,
        f"""
        base_model: {NO_MODEL}
        datasets:
          - path: {train_file}
          - path: {train_file}
            feild: text
        """,
    )
    assert problems(path) == [f"{path}:5: datasets.1.feild: unknown key; did you mean 'field'?"]


def test_axolotls_dataset_keys_that_a_format_does_not_read_say_why(tmp_path: Path, train_file: Path) -> None:
    path = write(
        tmp_path,
        f"""
        base_model: {NO_MODEL}
        datasets:
          - path: {train_file}
            type: completion
            field_messages: messages
            field_tools: tools
        """,
    )
    assert problems(path) == [
        f"{path}:5: datasets.0.field_messages: not a key of type 'completion': Axolotl's dataset key read by type 'chat_template'; remove it",
        f"{path}:6: datasets.0.field_tools: Axolotl's dataset key is not read by mft-run: tool definitions passed to the chat "
        "template are not supported yet; remove it",
    ]


def test_axolotls_dataset_loading_keys_are_checked(tmp_path: Path, train_file: Path) -> None:
    entries = [
        {"shards": 3, "shards_idx": 3}, {"shards": 2, "preprocess_shards": 2}, {"revision": "main"}, {"trust_remote_code": True},
    ]  # fmt: skip
    path = write(tmp_path, f"base_model: {NO_MODEL}\n" + yaml.safe_dump({"datasets": [{"path": str(train_file), **e} for e in entries]}))
    found = [problem.split(": ", 1)[1] for problem in problems(path)]
    assert found == [
        "datasets.0.shards_idx: 3 is not a shard of shards: 3 (allowed: 0 to 2)",
        "datasets.1.preprocess_shards: tokenizes all the rows in pieces, and shards keeps one piece: give one of them (Axolotl documents them as exclusive)",
        f"datasets.2.revision: 'main' selects a revision of a hub dataset, and {train_file} is a local file or folder: remove revision",
        "datasets.3.trust_remote_code: true asks datasets to run a loading script, which datasets 4 and later no longer do; "
        "a hub dataset of data files needs no remote code: remove it",
    ]
    fine = write(tmp_path, f"base_model: {NO_MODEL}\n" + yaml.safe_dump({"datasets": [{"path": str(train_file), "shards": 4, "shards_idx": 3, "trust_remote_code": False}, {"path": str(train_file), "preprocess_shards": 8}]}), "fine.yml")
    assert load_config(fine).datasets[0].shards == 4


def test_unknown_objective_parameter(tmp_path: Path, train_file: Path) -> None:
    path = write(tmp_path, minimal(train_file, "objective: {name: mft, taux: 1}"))
    assert problems(path) == [f"{path}:4: objective.taux: unknown key; did you mean 'tau'?"]


def test_parameter_of_a_strategy_that_takes_none(tmp_path: Path, train_file: Path) -> None:
    path = write(tmp_path, minimal(train_file, "objective: {name: ft, tau: 0.5}"))
    assert problems(path) == [f"{path}:4: objective.tau: unknown key; allowed here: name"]


def test_wrong_type(tmp_path: Path, train_file: Path) -> None:
    path = write(tmp_path, minimal(train_file) + "learning_rate: fast\nmicro_batch_size: 0\n")
    assert problems(path) == [  # in the schema's order
        f"{path}:6: micro_batch_size: Input should be greater than or equal to 1 (got 0)",
        f"{path}:5: learning_rate: Input should be a valid number, unable to parse string as a number (got 'fast')",
    ]


def test_unknown_strategy_lists_the_available_ones(tmp_path: Path, train_file: Path) -> None:
    path = write(tmp_path, minimal(train_file, "objective: mtf"))
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:4: objective: unknown objective 'mtf'; ")
    assert "available: distill_ft, ft, mft, singly_corrective" in problem
    assert problem.endswith("did you mean 'mft'?")


@pytest.mark.parametrize("value", ["5", "[mft]"])
def test_objective_must_be_a_name_or_a_mapping(tmp_path: Path, train_file: Path, value: str) -> None:
    path = write(tmp_path, minimal(train_file, f"objective: {value}"))
    assert problems(path) == [
        f"{path}:4: objective: objective must be a name or a mapping of `name` and parameters; "
        "available: distill_ft, ft, mft, singly_corrective"
    ]


def test_objective_mapping_without_name_is_mft(tmp_path: Path, train_file: Path) -> None:
    objective = load_config(write(tmp_path, minimal(train_file, "objective: {tau: 0.5}"))).objective
    assert (objective.name, objective.tau) == ("mft", 0.5)


def test_a_list_as_strategy_name_is_an_error_not_a_crash(tmp_path: Path, train_file: Path) -> None:
    path = write(tmp_path, minimal(train_file, "objective: {name: [mft]}"))
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:4: objective: unknown objective \"['mft']\"; available: ")


def test_unknown_mitigation(tmp_path: Path, train_file: Path) -> None:
    path = write(tmp_path, minimal(train_file) + "mitigations: [no_such_mitigation]\n")
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:5: mitigations: unknown mitigation 'no_such_mitigation'; available: ")


@pytest.mark.parametrize(("tau", "bound"), [(1.5, "less than or equal to 1"), (-0.5, "greater than or equal to 0")])
def test_tau_out_of_range(tmp_path: Path, train_file: Path, tau: float, bound: str) -> None:
    path = write(tmp_path, minimal(train_file, f"objective:\n  name: mft\n  tau: {tau}"))
    assert problems(path) == [f"{path}:6: objective.tau: Input should be {bound} (got {tau})"]


# ---------------------------------------------------------------- data files


def test_missing_data_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    path = write(tmp_path, f"base_model: {NO_MODEL}\ndatasets:\n  - path: {missing}\n")
    assert problems(path) == [f"{path}:3: datasets.0.path: file or folder not found: {missing}"]


def test_empty_data_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    path = write(tmp_path, f"base_model: {NO_MODEL}\ndatasets:\n  - path: {empty}\n")
    assert problems(path) == [f"{path}:3: datasets.0.path: dataset file is empty: {empty}"]


def test_field_not_in_jsonl(tmp_path: Path, train_file: Path) -> None:
    path = write(tmp_path, f"base_model: {NO_MODEL}\ndatasets:\n  - path: {train_file}\n    field: body\n")
    assert problems(path) == [
        f"{path}:4: datasets.0.field: 'body' is not a field of {train_file} (its records have: text)"
    ]


def test_missing_required_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\n")
    assert problems(path) == [f"{path}:1: base_model: Field required", f"{path}:1: datasets: Field required"]


# ---------------------------------------------------------------- YAML itself


def test_malformed_yaml_names_the_line(tmp_path: Path, train_file: Path) -> None:
    path = write(tmp_path, minimal(train_file) + "sequence_len: [32\nseed: 1\n")
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:6: malformed YAML: ")


def test_duplicate_keys_are_errors(tmp_path: Path, train_file: Path) -> None:
    """YAML keeps the last of two equal keys without a word; a pasted-over value must not hide."""
    path = write(tmp_path, minimal(train_file) + "seed: 1\nseed: 2\ndatasets:\n  - path: a\n    path: b\n")
    assert problems(path) == [
        f"{path}:6: seed: given twice (first on line 5); keep one",
        f"{path}:7: datasets: given twice (first on line 2); keep one",
        f"{path}:9: datasets.0.path: given twice (first on line 8); keep one",
    ]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- just\n- a list\n")
    assert problems(path) == [f"{path}: the top level must be a mapping of keys, got list"]


def test_missing_config_file(tmp_path: Path) -> None:
    assert problems(tmp_path / "nope.yml") == [f"{tmp_path / 'nope.yml'}: config file not found"]


def test_all_errors_at_once_with_their_lines(tmp_path: Path, train_file: Path) -> None:
    path = write(
        tmp_path,
        f"""
        base_model: {NO_MODEL}
        datasets:
          - path: {train_file}
            feild: text
          - path: {tmp_path / "missing.jsonl"}
        sequence_len: long
        objective:
          name: mft
          tau: 2
        lerning_rate: 0.1
        """,
    )
    assert problems(path) == [
        f"{path}:4: datasets.0.feild: unknown key; did you mean 'field'?",
        f"{path}:5: datasets.1.path: file or folder not found: {tmp_path / 'missing.jsonl'}",
        f"{path}:6: sequence_len: Input should be a valid integer, unable to parse string as an integer (got 'long')",
        f"{path}:9: objective.tau: Input should be less than or equal to 1 (got 2)",
        f"{path}:10: lerning_rate: unknown key; did you mean 'learning_rate'?",
    ]


# ---------------------------------------------------------------- --set overrides


def test_overrides(tmp_path: Path, train_file: Path) -> None:
    path = write(tmp_path, minimal(train_file, "objective: {name: mft, tau: 0.25}") + "seed: 1\n")
    config = load_config(path, ["objective.tau=0.5", "seed=2", "datasets.0.field=text"])
    assert (config.objective.tau, config.seed) == (0.5, 2)


def test_override_widens_a_bare_objective(tmp_path: Path, train_file: Path) -> None:
    path = write(tmp_path, minimal(train_file, "objective: mft"))
    assert load_config(path, ["objective.tau=0.5"]).objective.tau == 0.5
    switched = load_config(path, ["objective=singly_corrective", "objective.tau=0.75"]).objective
    assert (switched.name, switched.tau) == ("singly_corrective", 0.75)


def test_override_adds_a_missing_objective(tmp_path: Path, train_file: Path) -> None:
    """With no ``objective:`` key the objective is MFT, so ``objective.tau`` sets MFT's tau."""
    path = write(tmp_path, minimal(train_file, ""))
    objective = load_config(path, ["objective.tau=1.0"]).objective
    assert (objective.name, objective.tau) == ("mft", 1.0)


def test_bad_override_values_are_attributed_to_set(tmp_path: Path, train_file: Path) -> None:
    path = write(tmp_path, minimal(train_file, "objective:\n  name: mft\n  tau: 0.25"))
    assert problems(path, ["objective.tau=1.5", "seed=x", "nokey.sub=1"]) == [
        "--set: seed: Input should be a valid integer, unable to parse string as an integer (got 'x')",
        "--set: objective.tau: Input should be less than or equal to 1 (got 1.5)",
        "--set: nokey: unknown key",
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed", "--set 'seed': expected KEY=VALUE, e.g. --set objective.tau=0.5"),
        ("=1", "--set '=1': expected KEY=VALUE, e.g. --set objective.tau=0.5"),
        ("datasets.3.field=x", "--set datasets.3.field: datasets is a list of 1; '3' is not an index of it"),
        ("sequence_len.x=1", "--set sequence_len.x: sequence_len is 32, not a mapping"),
    ],
)
def test_malformed_overrides(tmp_path: Path, train_file: Path, override: str, message: str) -> None:
    path = write(tmp_path, minimal(train_file) + "sequence_len: 32\n")
    assert problems(path, [override]) == [message]


# ---------------------------------------------------------------- nothing heavy is loaded


def test_schema_errors_come_before_any_model_loading(tmp_path: Path, train_file: Path) -> None:
    """A typo'd key with a nonexistent base_model: only the schema error, and torch never imported."""
    path = write(tmp_path, minimal(train_file) + "lerning_rate: 0.1\n")
    script = (
        "import sys\n"
        "from mft_plugin.cli import main\n"
        f"code = main([{str(path)!r}])\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules]\n"
        "print(code, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "2 []", result.stderr
    assert result.stderr.strip().splitlines() == [
        "invalid config:",
        f"  {path}:5: lerning_rate: unknown key; did you mean 'learning_rate'?",
    ]


# ---------------------------------------------------------------- Axolotl's keys (README "Axolotl's keys")

EXAMPLE_KEYS = Path(__file__).parent / "axolotl_examples" / "example_keys.txt"
SCHEMA_KEYS = Path(__file__).parent / "axolotl_examples" / "schema_keys.txt"
DATA_SIDE = {"chat_template", "eot_tokens", "train_on_inputs", "sample_packing", "eval_sample_packing", "pad_to_sequence_len"}


def test_every_key_of_axolotls_examples_is_implemented_or_refused() -> None:
    from mft_plugin.config.adapters import AXOLOTL_FLAGS, AXOLOTL_LORA_KEYS
    from mft_plugin.config.axolotl_keys import REFUSED
    from mft_plugin.config.schema import AXOLOTL_DERIVED_KEYS, MFTConfigBase

    fields = {*AXOLOTL_DERIVED_KEYS} | {field.alias or name for name, field in MFTConfigBase.model_fields.items()}
    fields |= {key for field in MFTConfigBase.model_fields.values() for key in getattr(field.validation_alias, "choices", ())}
    adapter_keys = {"adapter", *AXOLOTL_LORA_KEYS, *AXOLOTL_FLAGS}
    keys = [line for line in EXAMPLE_KEYS.read_text().splitlines() if line and not line.startswith("#")]
    assert len(keys) > 200  # the inventory of Axolotl 0.19's examples
    implemented = (fields - set(REFUSED)) | adapter_keys
    assert [key for key in keys if key not in implemented | set(REFUSED) | DATA_SIDE] == []
    assert not implemented & set(REFUSED)


def test_every_key_of_axolotls_schema_is_known(tmp_path: Path, train_file: Path) -> None:
    """Each top-level key of Axolotl 0.19's schema, left empty, validates: implemented, a dataset default
    or refused with its reason, never "unknown key" (an Axolotl YAML may spell out any of them)."""
    keys = [line for line in SCHEMA_KEYS.read_text().splitlines() if line and not line.startswith("#")]
    assert len(keys) > 350
    empty = "".join(f"{key}:\n" for key in keys if key not in ("datasets", "base_model"))
    load_config(write(tmp_path, minimal(train_file) + empty))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("neftune_noise_alpha: 5", "5 is not supported: NEFTune noise on the student's embeddings"),
        ("load_best_model_at_end: false", "the final model is always the checkpoint of least specialized validation"),
        ("dpo_beta: 0.1", "0.1 is not supported: a preference/RL or reward-model trainer"),
        ("default_system_message: Hi", "conversations are rendered as written; no system message is inserted"),
        ("flash_attn_d512: true", "true is not supported: a CUDA-only kernel (Triton/CUDA)"),
        ("attn_implementation: sage", "'sage' is not supported: SageAttention quantizes Q and K to int8, which changes the loss"),
        ("attn_implementation: flash", "'flash' is not an attention implementation; one of eager, sdpa, flash_attention_2"),
        ("local_rank: 0", "0 is not supported: set by the launcher (LOCAL_RANK), not by the YAML (Axolotl key; allowed here: empty)"),
        ("save_safetensors: false", "weights are always saved as safetensors (Axolotl key; allowed here: empty or true)"),
        ("base_model_config: other", "the model loads from base_model with its own config.json"),
        ("rl: dpo", "'dpo' is not supported: a preference/RL or reward-model trainer"),
    ],
)
def test_refused_axolotl_keys_say_why(tmp_path: Path, train_file: Path, line: str, message: str) -> None:
    path = write(tmp_path, minimal(train_file) + line + "\n")
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:5: {line.split(':')[0]}: ") and message in problem


def test_refused_keys_with_their_off_value_ask_for_nothing(tmp_path: Path, train_file: Path) -> None:
    off = "flash_attn_d512: false\nxformers_attention:\nlocal_rank:\nsave_safetensors: true\nstrict: false\ndebug:\n"
    config = load_config(write(tmp_path, minimal(train_file) + off))
    assert not {"flash_attn_d512", "local_rank", "save_safetensors", "debug"} & set(config.model_dump())


def test_empty_keys_take_the_default(tmp_path: Path, train_file: Path) -> None:
    """Axolotl's examples leave keys empty to mean "default": ``adapter:`` empty is full finetuning."""
    empty = "adapter:\nlora_model_dir:\nfp16:\nwandb_project:\nwandb_entity:\nwandb_watch:\nresume_from_checkpoint:\nseed:\n"
    config = load_config(write(tmp_path, minimal(train_file) + empty))
    assert config.mitigations == [] and config.fp16 is None and config.seed == 42 and config.wandb_entity is None


def test_lora_target_linear_joins_lora_target_modules(tmp_path: Path, train_file: Path) -> None:
    lines = "adapter: lora\nlora_target_linear: true\nlora_target_modules: [embed_tokens]\nlora_fan_in_fan_out: false\n"
    (lora,) = load_config(write(tmp_path, minimal(train_file) + lines)).mitigations
    assert (lora.target_modules, lora.fan_in_fan_out) == (["all-linear", "embed_tokens"], False)


def test_qlora_defaults_are_axolotls(tmp_path: Path, train_file: Path) -> None:
    config = load_config(write(tmp_path, minimal(train_file) + "adapter: qlora\nload_in_4bit: true\n"))
    assert config.bnb_4bit_use_double_quant is True and config.bnb_4bit_compute_dtype is None  # None: the model's dtype


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("val_set_size: 0.1\nevals_per_epoch: 0\n", ":6: evals_per_epoch: 0 is no evaluation, but the final model is the best"),
        ("val_set_size: 0.1\neval_steps: 2\nevals_per_epoch: 4\n", ":7: evals_per_epoch: eval_steps sets the interval too"),
        ("val_set_size: 0.1\nevals_per_epoch: 4\nsaves_per_epoch: 3\n", ":7: saves_per_epoch: 3 must divide evals_per_epoch (4)"),
        ("early_stopping_patience: 2\n", ":5: early_stopping_patience: needs a specialized validation set"),
        ("loss_watchdog_patience: 3\n", ":5: loss_watchdog_patience: needs loss_watchdog_threshold"),
        ("wandb_entity: team\n", ":5: wandb_entity: read only when reporting to wandb; set wandb_project"),
        ("attn_implementation: sdpa\nflash_attention: true\n", ":6: flash_attention: attn_implementation chooses"),
        ("bf16: true\nfp16: true\n", "bf16 and fp16 cannot both be true"),
        ("model_type: AutoModelForSequenceClassification\n", "is not a causal LM class"),
        ("wandb_project: p\nwandb_watch: everything\n", "wandb_watch: Input should be 'false', 'gradients', 'parameters' or 'all'"),
    ],
)
def test_axolotl_keys_that_pair_with_others(tmp_path: Path, train_file: Path, lines: str, message: str) -> None:
    (problem,) = problems(write(tmp_path, minimal(train_file) + lines))
    assert message in problem


def test_axolotl_precision_and_attention_keys(tmp_path: Path, train_file: Path) -> None:
    lines = "bf16: auto\nfp16:\ntf32: false\nflash_attention: true\nwandb_project: p\nwandb_watch: false\n"
    config = load_config(write(tmp_path, minimal(train_file) + lines))
    from transformers.utils.import_utils import is_flash_attn_2_available

    flash = "flash_attention_2" if is_flash_attn_2_available() else None  # else inactive: the model's default
    assert (config.bf16, config.fp16, config.tf32, config.attention) == ("auto", None, False, flash)
    assert config.wandb_watch == "false" and config.reports_to_wandb


def test_strict_limits_overrides_to_the_yamls_keys(tmp_path: Path, train_file: Path) -> None:
    path = write(tmp_path, minimal(train_file) + "strict: true\nseed: 1\n")
    assert load_config(path, ["seed=2"]).seed == 2
    assert problems(path, ["learning_rate=0.1"]) == [
        f"--set learning_rate: {path} has strict: true, so --set may only change its keys"
    ]
    assert load_config(write(tmp_path, minimal(train_file) + "strict: false\n"), ["learning_rate=0.1"]).learning_rate == 0.1
