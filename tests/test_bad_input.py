"""Bad input is refused by ``mft-run`` with a clear message before any weight is read.

One test per row of the README's "Errors and recovery" table, through the CLI (exit code 2, the
message on stderr). The model folder here holds a config and a tokenizer but no weights at all: a
check that loaded the model would fail differently. Schema messages in detail (every key, type and
bound, ``--set``) are in ``tests/test_config.py``; this file covers what needs the model's config
or tokenizer (preflight), the output folder, the dataset checks and the safety of the YAML loader.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from mft_plugin.cli import main
from mft_plugin.train.outputs import prepare_output_dir
from mft_plugin.config.errors import validate_config
from tests.tiny import write_yaml


@pytest.fixture
def config(base_config: dict[str, Any], weightless_model: Path) -> dict[str, Any]:
    return {**base_config, "base_model": str(weightless_model)}


def refused(config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The problems ``mft-run --validate`` prints (it must exit 2, printing nothing on stdout)."""
    path = write_yaml(tmp_path / "config.yml", config)
    code = main([str(path), "--validate"])
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, ""), captured
    lines = captured.err.splitlines()
    assert lines[0] == "invalid config:"
    problems = [line.strip() for line in lines[1:]]
    assert all(re.match(rf"{re.escape(str(path))}:\d+: ", problem) for problem in problems), problems  # file:line
    return [re.sub(rf"^{re.escape(str(path))}:\d+: ", "", problem) for problem in problems]


def model_variant(weightless_model: Path, tmp_path: Path, **changes: Any) -> Path:
    """A copy of the weightless model folder with some ``config.json`` values changed."""
    folder = tmp_path / "variant"
    shutil.copytree(weightless_model, folder)
    model_config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**model_config, **changes}))
    return folder


def test_a_valid_config_passes_without_weights(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Guard for the tests below: their base config is valid, and validation never needs the weights."""
    assert main([str(write_yaml(tmp_path / "config.yml", config)), "--validate"]) == 0
    assert "base_model:" in capsys.readouterr().out


# ---------------------------------------------------------------- the model: positions, vocabulary, code


def test_sequence_len_longer_than_the_model_positions(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    problems = refused({**config, "sequence_len": 256}, tmp_path, capsys)
    assert problems == [
        f"sequence_len: 256 is longer than the model's 128 positions (max_position_embeddings of "
        f"{config['base_model']}); use at most 128"
    ]


def test_tokenizer_larger_than_the_model_vocabulary(
    config: dict[str, Any], weightless_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vocab = len(AutoTokenizer.from_pretrained(weightless_model))
    model = model_variant(weightless_model, tmp_path, vocab_size=vocab - 10)
    assert refused({**config, "base_model": str(model)}, tmp_path, capsys) == [
        f"tokenizer_config: the tokenizer has {vocab} tokens but {model} embeds only {vocab - 10}; "
        "use the model's own tokenizer (or resize the embeddings before finetuning)"
    ]


def test_added_special_tokens_beyond_the_embedding_size(
    config: dict[str, Any], weightless_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ids past the embedding would index out of range on the first batch: refused before loading."""
    tokenizer = AutoTokenizer.from_pretrained(weightless_model)
    vocab = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|clause|>", "<|article|>"]})
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert refused({**config, "tokenizer_config": str(tmp_path / "tokenizer")}, tmp_path, capsys) == [
        f"tokenizer_config: the tokenizer has {vocab + 2} tokens but {weightless_model} embeds only {vocab}; "
        "use the model's own tokenizer (or resize the embeddings before finetuning)"
    ]


def test_embeddings_padded_beyond_the_tokenizer_are_fine(
    config: dict[str, Any], weightless_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Models often pad their embedding to a multiple of 64: unused rows are harmless."""
    vocab = len(AutoTokenizer.from_pretrained(weightless_model))
    model = model_variant(weightless_model, tmp_path, vocab_size=vocab + 64)
    assert main([str(write_yaml(tmp_path / "config.yml", {**config, "base_model": str(model)})), "--validate"]) == 0


def test_base_model_that_is_not_a_model(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    (problem,) = refused({**config, "base_model": str(tmp_path / "empty")}, tmp_path, capsys)
    assert problem.startswith(f"base_model: cannot load {str(tmp_path / 'empty')!r}: ")


def test_remote_code_is_never_run_unless_trusted(
    config: dict[str, Any], weightless_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model folder that ships code (``auto_map``): refused by default, and the code is not executed."""
    ran = tmp_path / "remote-code-ran"
    code = {"auto_map": {"AutoConfig": "custom.CustomConfig"}, "model_type": "custom-llm"}
    model = model_variant(weightless_model, tmp_path, **code)
    (model / "custom.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    assert validate_config(config).trust_remote_code is False  # the default
    (problem,) = refused({**config, "base_model": str(model)}, tmp_path, capsys)
    assert problem.startswith(f"base_model: cannot load {str(model)!r}: ") and "trust_remote_code" in problem
    assert not ran.exists()


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [("lr_scheduler", "cosine_annealing", "constant, constant_with_warmup"), ("optimizer", "adam", "adafactor")],
)
def test_scheduler_and_optimizer_names(
    key: str, value: str, allowed: str, config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (problem,) = refused({**config, key: value}, tmp_path, capsys)
    assert problem.startswith(f"{key}: {value!r} is not one of: ") and allowed in problem


# ---------------------------------------------------------------- the output folder


def test_output_dir_holding_another_runs_checkpoints(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output_dir = Path(config["output_dir"])
    (output_dir / "checkpoint-40").mkdir(parents=True)
    assert refused(config, tmp_path, capsys) == [
        f"output_dir: {output_dir} already holds checkpoints of another run; set resume_from_checkpoint: true "
        "to continue it, overwrite_output_dir: true to start over, or choose another output_dir"
    ]
    for allowed in ({"resume_from_checkpoint": True}, {"overwrite_output_dir": True}):
        assert main([str(write_yaml(tmp_path / "config.yml", {**config, **allowed})), "--validate"]) == 0
    assert (output_dir / "checkpoint-40").exists()  # validation never deletes anything


def test_overwrite_output_dir_removes_the_old_checkpoints_only_when_the_run_starts(
    config: dict[str, Any], tmp_path: Path
) -> None:
    output_dir = Path(config["output_dir"])
    (output_dir / "checkpoint-40").mkdir(parents=True)
    (output_dir / "notes.txt").write_text("mine")
    prepare_output_dir(validate_config({**config, "overwrite_output_dir": True}))
    assert sorted(p.name for p in output_dir.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- data and schema, as the CLI reports them


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"datasets": [{"path": "{tmp}/missing.jsonl"}]},
         "datasets.0.path: file or folder not found: {tmp}/missing.jsonl"),
        ({"datasets": [{"path": "{tmp}/empty.jsonl"}]}, "datasets.0.path: dataset file is empty: {tmp}/empty.jsonl"),
        ({"datasets": [{"path": "{train}", "field": "body"}]},
         "datasets.0.field: 'body' is not a field of {train} (its records have: text)"),
        ({"learning_rate": -0.001}, "learning_rate: Input should be greater than 0 (got -0.001)"),
        ({"objective": {"name": "mft", "tau": 1.5}},
         "objective.tau: Input should be less than or equal to 1 (got 1.5)"),
        ({"mitigations": [{"name": "replay", "ratio": 1.5, "datasets": [{"path": "{train}"}]}]},
         "mitigations.0.ratio: Input should be less than or equal to 1 (got 1.5)"),
        ({"adapter": "lora", "lora_r": 0}, "mitigations.0.r: Input should be greater than or equal to 1 (got 0)"),
        ({"mitigations": ["lora", "ia3"]},
         "mitigations: mitigations 'lora' and 'ia3' cannot be combined (both are adapter methods; pick one)"),
        ({"lerning_rate": 0.001}, "lerning_rate: unknown key; did you mean 'learning_rate'?"),
        ({"micro_batch_size": "four"}, "micro_batch_size: Input should be a valid integer, unable to parse string "
                                       "as an integer (got 'four')"),
        ({"save_steps": 3}, "save_steps: 3 is not a multiple of eval_steps (2), but the best checkpoint is chosen "
                            "among evaluated steps; e.g. save_steps: 2"),
    ],
    ids=["missing-file", "empty-file", "missing-field", "negative-lr", "tau", "replay-ratio", "lora-r",
         "incompatible", "unknown-key", "wrong-type", "save-steps"],
)  # fmt: skip
def test_schema_errors_at_the_command_line(
    change: dict[str, Any], expected: str, config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    train = config["datasets"][0]["path"]
    fill = lambda value: json.loads(json.dumps(value).replace("{tmp}", str(tmp_path)).replace("{train}", train))  # noqa: E731
    (problem,) = refused({**config, **fill(change)}, tmp_path, capsys)
    assert problem == expected.replace("{tmp}", str(tmp_path)).replace("{train}", train)


# ---------------------------------------------------------------- the YAML loader runs no code


def test_yaml_tags_that_would_run_code_are_refused(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ran = tmp_path / "yaml-code-ran"
    path = write_yaml(tmp_path / "config.yml", config)
    path.write_text(path.read_text() + f"seed: !!python/object/apply:os.system ['touch {ran}']\n")
    assert main([str(path), "--validate"]) == 2
    (problem,) = capsys.readouterr().err.splitlines()[1:]
    line = len(path.read_text().splitlines())
    assert problem.strip().startswith(f"{path}:{line}: malformed YAML: could not determine a constructor for the tag")
    assert not ran.exists()


# ---------------------------------------------------------------- the fused loss: a head it cannot reproduce


def test_a_cache_on_a_model_whose_config_changes_its_logits_unfused_is_refused_before_loading(
    config: dict[str, Any], weightless_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = model_variant(weightless_model, tmp_path, output_multiplier_scale=2.0)
    problems = refused({**config, "base_model": str(model), "teacher_cache": {}}, tmp_path, capsys)
    assert len(problems) == 1 and problems[0].startswith("teacher_cache: needs the fused loss, which ")
    assert "its config sets output_multiplier_scale = 2.0" in problems[0]
    assert refused({**config, "base_model": str(model), "loss_impl": "chunked"}, tmp_path, capsys)[0].startswith("loss_impl: ")
    assert main([str(write_yaml(tmp_path / "auto.yml", {**config, "base_model": str(model)})), "--validate"]) == 0  # auto: plain


def test_a_cache_on_a_model_the_probe_refuses_ends_in_one_line_and_exit_2(
    base_config: dict[str, Any], tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Llama whose config says ``logit_scale`` (Cohere's key, which Llama ignores): the fused logits are
    scaled, the model's are not, and the probe forward after loading says so."""
    model = model_variant(tiny_model, tmp_path, logit_scale=0.5)
    code = main([str(write_yaml(tmp_path / "config.yml", {**base_config, "base_model": str(model), "teacher_cache": {}}))])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("error: teacher_cache needs the chunked loss, which cannot be used: its logits are not")
