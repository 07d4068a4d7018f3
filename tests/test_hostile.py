"""The hostile user's catalogue (issue 16): bad inputs and faults, each ending in a message, never a traceback.

Every case goes through ``mft-run`` where a user would meet it and asserts the exit code, a message
naming the key, file or plugin at fault, and that no traceback was printed. Damaged caches are
checked where they are read (detected, logged, recomputed). The fault cases that need training
share a few tiny runs (a handful of steps of the 2-layer test model) and assert identical results
or a refusal. Bad *data files* and damaged *teacher caches* are covered by the tests of those stages.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mft_plugin.cli import main
from mft_plugin.config.errors import MAX_CONFIG_BYTES, validate_config
from mft_plugin.hookspecs import hookimpl
from mft_plugin.registry import Registry, collect_strategies, load_entry_point_plugins, make_plugin_manager
from mft_plugin.strategies import formats as builtin_formats
from mft_plugin.strategies import mitigations as builtin_mitigations
from mft_plugin.strategies import objectives as builtin_objectives
from mft_plugin.strategies.mitigations.ewc import KEY, load_fisher, save_fisher
from mft_plugin.train.checkpoints import RUN_CONFIG, finish_checkpoint, record_run_config
from mft_plugin.train.outputs import (
    BASE_PPL_FILE,
    LOCK_FILE,
    METRICS_FILE,
    base_key,
    exclusive_output_dir,
    load_base_perplexities,
    metrics_json,
    prepare_output_dir,
    read_metrics,
)
from mft_plugin.train.safety import NonFiniteError, check_finite_weights
from tests.test_plugin_failures import install
from tests.tiny import REPO, evaluation_rows, write_yaml


def cli(capsys: pytest.CaptureFixture[str], *argv: str, registry: Registry | None = None) -> tuple[int, str]:
    """``mft-run ARGV``: its exit code and stderr, asserting that nothing printed a traceback."""
    code = main(list(argv), registry=registry)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out, captured.err
    return code, captured.err


@pytest.fixture
def config(base_config: dict[str, Any], weightless_model: Path) -> dict[str, Any]:
    return {**base_config, "base_model": str(weightless_model)}


# ---------------------------------------------------------------- YAML files that attack the reader


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)
)
YAML_FILES: dict[str, tuple[bytes, str]] = {
    "billion-laughs": (BILLION_LAUGHS.encode(), "aliases expand to more than 100000 YAML nodes"),
    "deep-brackets": (b"a: " + b"[" * 2000 + b"]" * 2000 + b"\n", "nested too deeply"),
    "deep-mappings": ("".join(f"{'  ' * i}k{i}:\n" for i in range(150)).encode() + b"  " * 150 + b"v\n", "nested too deeply"),
    "recursive-alias": (b"a: &a [*a]\n", "nested too deeply"),
    "binary": (bytes(range(256)) * 4, "not UTF-8 text (byte 0x80 at offset 128)"),
    "latin-1": ("base_model: mod\u00e8le\n".encode("latin-1"), ":1: not UTF-8 text (byte 0xe8"),
    "nul-bytes": (b"seed: 1\x00\n", "malformed YAML"),
    "huge": (b"# padding\n" * (MAX_CONFIG_BYTES // 10 + 1), f"is too large for a config (at most {MAX_CONFIG_BYTES})"),
    "empty": (b"", "the top level must be a mapping of keys, got NoneType"),
    "top-level-list": (b"- a\n- b\n", "the top level must be a mapping of keys, got list"),
    "python-tag": (b"seed: !!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
    "unclosed-bracket": (b"seed: [1, 2\n", "malformed YAML"),
    "tab-indent": (b"a:\n\tb: 1\n", "malformed YAML"),
    "duplicate-key": (b"seed: 1\nseed: 2\n", ":2: seed: given twice (first on line 1); keep one"),
}


@pytest.mark.parametrize("name", list(YAML_FILES))
def test_a_hostile_yaml_file_is_a_config_error(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, expected = YAML_FILES[name]
    path = tmp_path / "config.yml"
    path.write_bytes(content)
    code, err = cli(capsys, str(path), "--validate")
    assert code == 2
    assert err.startswith(f"invalid config:\n  {path}") and expected in err, err


# ---------------------------------------------------------------- values that validated, then crashed


VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "lr-inf": ({"learning_rate": math.inf}, "learning_rate: Input should be a finite number"),
    "lr-nan": ({"learning_rate": math.nan}, "learning_rate: Input should be a finite number"),
    "weight-decay-inf": ({"weight_decay": math.inf}, "weight_decay: Input should be a finite number"),
    "epochs-inf": ({"num_epochs": math.inf, "max_steps": None}, "num_epochs: Input should be a finite number"),
    "val-set-size-inf": ({"val_set_size": math.inf}, "val_set_size: Input should be a finite number"),
    "val-set-size-nan": ({"val_set_size": math.nan}, "val_set_size: Input should be a finite number"),
    "max-grad-norm-nan": ({"max_grad_norm": math.nan}, "max_grad_norm: Input should be a finite number"),
    "budget-nan": ({"max_degeneralization": math.nan}, "max_degeneralization: Input should be a finite number"),
    "seed-negative": ({"seed": -1}, "seed: Input should be greater than or equal to 0 (got -1)"),
    "seed-too-big": ({"seed": 2**32}, "seed: Input should be less than or equal to 4294967295"),
    "output-dir-empty": ({"output_dir": ""}, "output_dir: String should have at least 1 character"),
    "tokenizer-type-unknown": ({"tokenizer_type": "NoSuchTokenizer"}, "tokenizer_type: cannot load the tokenizer: tokenizer_type: 'NoSuchTokenizer' is not a transformers tokenizer class"),
    "tokenizer-config-missing": ({"tokenizer_config": "/nonexistent/tokenizer"}, "tokenizer_config: cannot load the tokenizer"),
    "base-model-missing": ({"base_model": "/nonexistent/model"}, "base_model: cannot load '/nonexistent/model'"),
    "scheduler-unknown": ({"lr_scheduler": "sometimes"}, "lr_scheduler: 'sometimes' is not one of"),
    "optimizer-unknown": ({"optimizer": "adamz"}, "optimizer: 'adamz' is not one of"),
    "sequence-len-too-long": ({"sequence_len": 4096}, "sequence_len: 4096 is longer than the model's 128 positions"),
    "resume-missing-path": ({"resume_from_checkpoint": "/nonexistent/checkpoint-2"}, "resume_from_checkpoint: /nonexistent/checkpoint-2 is not a folder"),
    "output-dir-read-only": ({"output_dir": "/sys/mft-run-out"}, "output_dir: cannot write in /sys"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(VALUES))
def test_a_bad_value_is_refused_with_file_and_line(
    name: str, config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    change, expected = VALUES[name]
    path = write_yaml(tmp_path / "config.yml", {**config, **change})
    code, err = cli(capsys, str(path), "--validate")
    assert code == 2
    line = next(line for line in err.splitlines() if expected in line)
    assert line.strip().startswith(f"{path}:"), err  # file:line, preflight's problems too


def test_output_dir_that_is_or_lies_under_a_file(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    for output_dir, expected in [(file, "is a file, not a folder"), (file / "run", f"lies under {file}, which is a file")]:
        path = write_yaml(tmp_path / "config.yml", {**config, "output_dir": str(output_dir)})
        code, err = cli(capsys, str(path), "--validate")
        assert code == 2 and f"output_dir: {output_dir} {expected}" in err, err


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("seed=[1", "--set 'seed=[1': the value is not valid YAML"),
        ("=3", "--set '=3': expected KEY=VALUE"),
        ("seed", "--set 'seed': expected KEY=VALUE"),
        ("seed.x=1", "--set seed.x: seed is 0, not a mapping"),
        ("datasets.7.path=x", "--set datasets.7.path: datasets is a list of 1; '7' is not an index of it"),
        ("learning_rate=.inf", "--set: learning_rate: Input should be a finite number"),
    ],
)
def test_a_malformed_set_option(
    option: str, expected: str, config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = cli(capsys, str(write_yaml(tmp_path / "config.yml", config)), "--validate", "--set", option)
    assert code == 2 and expected in err, err


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("objective.tau", "--grid 'objective.tau': expected KEY=VALUE"),
        ("objective.tau=[0,", "--grid 'objective.tau=[0,': the value is not valid YAML"),
        ("objective.tau=0.5", "--grid 'objective.tau=0.5': expected KEY=[VALUE, ...]"),
        ("objective.tau=[]", "--grid 'objective.tau=[]': expected KEY=[VALUE, ...]"),
    ],
)
def test_a_malformed_grid_option(
    option: str, expected: str, config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_yaml(tmp_path / "config.yml", config)
    code, err = cli(capsys, "sweep", str(path), "--validate", "--grid", option)
    assert code == 2 and expected in err, err


def test_val_set_size_larger_than_the_corpus(
    base_config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {**base_config, "test_datasets": None, "val_set_size": 1000, "max_degeneralization": None}
    code, err = cli(capsys, str(write_yaml(tmp_path / "config.yml", config)))
    assert code == 2
    assert "val_set_size: 1000 would hold out every one of the 24 training documents" in err, err


# ---------------------------------------------------------------- the output folder


def test_a_second_run_on_a_held_output_dir_is_refused_naming_the_holder(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_yaml(tmp_path / "config.yml", config)
    with exclusive_output_dir(Path(config["output_dir"])):
        code, err = cli(capsys, str(path))
    assert code == 2
    assert f"output_dir: {config['output_dir']} is in use by another run (pid {os.getpid()} on {socket.gethostname()}, started " in err


def test_a_killed_runs_lock_does_not_block(tmp_path: Path) -> None:
    """The lock is the system's: it dies with its process (SIGKILL, no cleanup), and the next run takes it."""
    script = "import os, sys; from pathlib import Path; from mft_plugin.train.outputs import exclusive_output_dir\n" \
             "with exclusive_output_dir(Path(sys.argv[1])): os.kill(os.getpid(), 9)"  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], cwd=REPO, timeout=120, check=False)
    assert result.returncode == -signal.SIGKILL
    assert (tmp_path / "out" / ".mft-run.holder.json").is_file()  # it held the folder
    with exclusive_output_dir(tmp_path / "out"):
        pass


def test_overwrite_output_dir_clears_the_old_results_first(config: dict[str, Any], tmp_path: Path) -> None:
    out = Path(config["output_dir"])
    old = [METRICS_FILE, "config.yml", RUN_CONFIG, "model.safetensors", "config.json", "trainer_state.json",
           "checkpoint-2/model.safetensors", "incomplete-checkpoint-4/x", "merged/model.safetensors"]  # fmt: skip
    for name in [*old, BASE_PPL_FILE, "notes.txt"]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("old")
    prepare_output_dir(validate_config({**config, "overwrite_output_dir": True}))
    assert sorted(p.name for p in out.iterdir()) == [BASE_PPL_FILE, "notes.txt"]  # a keyed cache and the user's file


def test_resume_with_another_config_is_refused_naming_the_keys(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(config["output_dir"])
    record_run_config(out, validate_config(config).model_dump(mode="json"))
    (out / "checkpoint-2").mkdir()
    finish_checkpoint(out, 2, None, None)  # complete: it copies the run's config, then its manifest
    changed = {**config, "resume_from_checkpoint": True, "learning_rate": 0.5, "sequence_len": 32,
               "objective": {"name": "mft", "tau": 0.5}, "logging_steps": 3}  # fmt: skip
    code, err = cli(capsys, str(write_yaml(tmp_path / "config.yml", changed)), "--validate")
    assert code == 2
    assert "was made with another config; these keys differ: learning_rate, objective.tau, sequence_len." in err, err


# ---------------------------------------------------------------- plugins


class RaisingHooks:
    @hookimpl
    def mft_run_start(self, config: Any, output_dir: str) -> None:
        raise RuntimeError("tracker unreachable")

    @hookimpl
    def mft_run_end(self, config: Any, output_dir: str, metrics: dict[str, float]) -> None:
        raise KeyError("no such project")


def registry_with(*plugins: tuple[str, object]) -> Registry:
    manager = make_plugin_manager()
    manager.register(builtin_objectives, name="mft-plugin")
    manager.register(builtin_mitigations, name="mft-plugin-mitigations")
    manager.register(builtin_formats, name="mft-plugin-formats")
    for name, plugin in plugins:
        manager.register(plugin, name=name)
    return collect_strategies(manager)


def test_plugins_that_exit_or_interrupt_at_import_are_isolated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    install(tmp_path, "mft-exiting-plugin", "import sys\nsys.exit(3)\n")
    install(tmp_path, "mft-interrupting-plugin", "raise KeyboardInterrupt\n")
    sys.path.insert(0, str(tmp_path))
    try:
        manager = make_plugin_manager()
        registry = collect_strategies(manager, load_entry_point_plugins(manager))
    finally:
        sys.path.remove(str(tmp_path))
    assert main(["--list"], registry=registry) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    listing = captured.out
    assert "BROKEN      plugin mft-exiting-plugin: failed to import: SystemExit: 3" in listing
    assert "BROKEN      plugin mft-interrupting-plugin: failed to import: KeyboardInterrupt: " in listing
    assert "mft " in listing  # the built-ins are still there


def test_a_plugin_claiming_mft_reports_the_conflict_when_objective_is_left_out(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Rival:
        @hookimpl
        def mft_register_objectives(self) -> list[type]:
            return [builtin_objectives.MinifinetuningObjective]

    registry = registry_with(("mft-rival-plugin", Rival()))
    without_objective = {k: v for k, v in config.items() if k != "objective"}
    code, err = cli(capsys, str(write_yaml(tmp_path / "config.yml", without_objective)), "--validate", registry=registry)
    assert code == 2
    assert "objective: objective 'mft' is provided by more than one plugin (mft-plugin and mft-rival-plugin)" in err, err


# ---------------------------------------------------------------- damaged caches: detected, logged, recomputed


@pytest.mark.parametrize(
    "perplexities",
    [{"spec": math.nan, "general": 10.0}, {"spec": 10.0}, {"spec": "10", "general": 10.0}, {"spec": True, "general": 10.0},
     {"spec": 0.5, "general": 10.0}, [10.0, 10.0], None, {"spec": math.inf, "general": 10.0}],
    ids=["nan", "missing", "string", "bool", "below-one", "list", "null", "inf"],
)  # fmt: skip
def test_a_damaged_base_perplexity_cache_is_measured_again(
    perplexities: Any, config: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    validated, rows = validate_config(config), evaluation_rows(config, tmp_path)
    key = base_key(validated, rows)
    (tmp_path / BASE_PPL_FILE).write_text(json.dumps({"measured": {key: {"spec": 20.0, "general": 30.0}}}))
    assert load_base_perplexities(tmp_path, validated, rows) == {"spec": 20.0, "general": 30.0}  # guard: the key is right
    (tmp_path / BASE_PPL_FILE).write_text(json.dumps({"measured": {key: perplexities}}))
    with caplog.at_level(logging.WARNING):
        assert load_base_perplexities(tmp_path, validated, rows) is None
    assert f"{tmp_path / BASE_PPL_FILE} holds" in caplog.text and "measuring them again" in caplog.text


def test_a_truncated_base_perplexity_cache_is_measured_again(
    config: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / BASE_PPL_FILE).write_text('{"measured": {"abc": {"sp')
    with caplog.at_level(logging.WARNING):
        assert load_base_perplexities(tmp_path, validate_config(config), evaluation_rows(config, tmp_path)) is None
    assert f"{tmp_path / BASE_PPL_FILE} is damaged" in caplog.text


SHAPES = {"layer.weight": (3, 2), "layer.bias": (3,)}  # the Fisher tensors the run expects


def _damage_fisher(path: Path, how: str) -> None:
    good = {"layer.weight": torch.ones(3, 2), "layer.bias": torch.ones(3)}
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"\x93NUMPY garbage" * 10)
    else:
        tensors = {
            "nan": {**good, "layer.bias": torch.tensor([1.0, math.nan, 1.0])},
            "negative": {**good, "layer.bias": -good["layer.bias"]},
            "missing": {"layer.weight": good["layer.weight"]},
            "wrong-shape": {**good, "layer.weight": torch.ones(2, 3)},
            "integer": {**good, "layer.bias": torch.ones(3, dtype=torch.int64)},
        }[how]
        save_file(tensors, str(path), metadata={KEY: "the-key"})


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "nan", "negative", "missing", "wrong-shape", "integer"])
def test_a_damaged_fisher_file_is_recomputed(how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "fisher.safetensors"
    save_fisher(path, {"layer.weight": torch.ones(3, 2), "layer.bias": torch.ones(3)}, "the-key")
    assert set(load_fisher(path, "the-key", SHAPES) or {}) == set(SHAPES)  # guard: the good file loads
    _damage_fisher(path, how)
    with caplog.at_level(logging.WARNING):
        assert load_fisher(path, "the-key", SHAPES) is None
    assert f"ewc: {path} is damaged" in caplog.text and "recomputing the Fisher" in caplog.text


def test_non_finite_weights_are_refused_by_the_final_check() -> None:
    model = torch.nn.Linear(2, 2)
    check_finite_weights(model)  # finite: quiet
    with torch.no_grad():
        model.bias[1] = math.inf
    with pytest.raises(NonFiniteError, match=r"non-finite weights in 1 parameter\(s\): bias"):
        check_finite_weights(model)


def test_metrics_json_is_standard_json_and_an_undefined_dg_over_s_reads_back_as_inf(tmp_path: Path) -> None:
    metrics = {"eval_S": -0.1, "eval_DG": 0.2, "eval_DG/S": math.inf, "step": 4}
    text = metrics_json(metrics)
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert json.loads(text)["eval_DG/S"] is None
    (tmp_path / METRICS_FILE).write_text(text)
    assert read_metrics(tmp_path) == metrics


# ---------------------------------------------------------------- model files


def _model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    return folder


def _damage_model(folder: Path, how: str) -> str:
    """Damage the model in ``folder``; the file the message must name."""
    weights = folder / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return f"cannot read {weights} (truncated or damaged?)"
    if how == "missing":
        weights.unlink()
        return f"{folder} has no weights (none of model.safetensors"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    return f"{folder / 'config.json'} does not match the weights in {weights}"


@pytest.mark.parametrize("how", ["truncated", "missing", "mismatch"])
def test_damaged_model_files_end_in_one_error_naming_the_file(
    how: str, two_step_config: dict[str, Any], tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _model_copy(tiny_model, tmp_path)
    expected = _damage_model(folder, how)
    path = write_yaml(tmp_path / "config.yml", {**two_step_config, "base_model": str(folder)})
    code, err = cli(capsys, str(path))
    assert code == 1
    (line,) = err.strip().splitlines()[-1:]
    assert line.startswith("error: base_model: ") and expected in line, err


def test_a_tokenizer_of_another_vocabulary_is_refused(
    config: dict[str, Any], weightless_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "tokenizer"
    shutil.copytree(weightless_model, other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = "the", "and"  # same size, two ids swapped: fits the embedding, reads wrong tokens
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(data))
    path = write_yaml(tmp_path / "config.yml", {**config, "tokenizer_config": str(other)})
    code, err = cli(capsys, str(path), "--validate")
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "tokenizer_config" in line]
    assert f"tokenizer_config: {other} maps 2 token(s) to other ids than {weightless_model}'s own tokenizer" in line


def test_a_copy_of_the_model_s_own_tokenizer_is_accepted(
    config: dict[str, Any], weightless_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "tokenizer"
    shutil.copytree(weightless_model, other)
    path = write_yaml(tmp_path / "config.yml", {**config, "tokenizer_config": str(other)})
    assert cli(capsys, str(path), "--validate")[0] == 0


# ---------------------------------------------------------------- faults during a run (shared tiny runs)


@pytest.fixture(scope="module")
def finished_run(base_config_module: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished 4-step run (checkpoints at 2 and 4), with a plugin whose run hooks raise."""
    folder = tmp_path_factory.mktemp("finished")
    config = {**base_config_module, "output_dir": str(folder / "out"), "save_steps": 2}
    path = write_yaml(folder / "config.yml", config)
    registry = registry_with(("mft-raising-hooks", RaisingHooks()))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("mft_plugin.registry").addHandler(handler)
    try:
        code = main([str(path)], registry=registry)
    finally:
        logging.getLogger("mft_plugin.registry").removeHandler(handler)
    hook_errors = [record.getMessage() for record in records]
    return {"code": code, "config": config, "path": path, "out": folder / "out", "registry": registry, "hook_errors": hook_errors}


@pytest.fixture(scope="module")
def base_config_module(tiny_model: Path, corpora: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return {
        "base_model": str(tiny_model),
        "datasets": [{"path": str(corpora["spec_train"]), "type": "completion"}],
        "test_datasets": [{"path": str(corpora["spec_val"]), "type": "completion"}],
        "general_eval_datasets": [{"path": str(corpora["general_val"]), "type": "completion"}],
        "sequence_len": 64, "micro_batch_size": 4, "max_steps": 4, "eval_steps": 2, "learning_rate": 1e-3,
        "logging_steps": 1, "lr_scheduler": "constant", "objective": {"name": "mft", "tau": 0.25}, "seed": 0,
    }  # fmt: skip


def test_raising_run_hooks_do_not_fail_the_run(finished_run: dict[str, Any]) -> None:
    assert finished_run["code"] == 0
    assert finished_run["hook_errors"] == [
        "plugin mft-raising-hooks: mft_run_start raised RuntimeError: tracker unreachable (ignored)",
        "plugin mft-raising-hooks: mft_run_end raised KeyError: 'no such project' (ignored)",
    ]
    metrics = json.loads((finished_run["out"] / METRICS_FILE).read_text(),
                         parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))  # fmt: skip
    assert metrics["step"] == 4 and math.isfinite(metrics["eval_S"])


def test_resuming_a_finished_run_keeps_its_metrics(finished_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    out = finished_run["out"]
    before = (out / METRICS_FILE).read_bytes(), (out / METRICS_FILE).stat().st_mtime_ns
    code, _ = cli(capsys, str(finished_run["path"]), "--set", "resume_from_checkpoint=true")
    assert code == 0
    assert ((out / METRICS_FILE).read_bytes(), (out / METRICS_FILE).stat().st_mtime_ns) == before
    assert not (out / "checkpoint-5").exists()


def test_a_kill_after_the_final_checkpoint_resumes_to_the_same_result_without_training(
    finished_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(finished_run["out"], out)
    for name in (METRICS_FILE, "model.safetensors", "config.yml", "trainer_state.json"):
        (out / name).unlink()  # as if killed right after checkpoint-4's manifest
    for state_file in out.glob("checkpoint-*/trainer_state.json"):  # the checkpoints name the old folder
        state = json.loads(state_file.read_text())
        state["best_model_checkpoint"] = str(out / Path(state["best_model_checkpoint"]).name)
        state_file.write_text(json.dumps(state))
    config = {**finished_run["config"], "output_dir": str(out), "resume_from_checkpoint": True}
    code, _ = cli(capsys, str(write_yaml(tmp_path / "config.yml", config)), registry=finished_run["registry"])
    assert code == 0
    assert not (out / "checkpoint-5").exists()
    expected = json.loads((finished_run["out"] / METRICS_FILE).read_text())
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert {k: v for k, v in metrics.items() if k.startswith(("eval_", "base_"))} == {
        k: v for k, v in expected.items() if k.startswith(("eval_", "base_"))
    }
    reference = load_file(str(finished_run["out"] / "model.safetensors"))
    resumed = load_file(str(out / "model.safetensors"))
    assert reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_resuming_a_finished_run_with_another_learning_rate_is_refused(
    finished_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = cli(capsys, str(finished_run["path"]), "--set", "resume_from_checkpoint=true", "--set", "learning_rate=0.5")
    assert code == 2 and "these keys differ: learning_rate." in err, err


def test_a_run_that_ends_with_non_finite_weights_fails(
    two_step_config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An optimizer step that leaves an infinite weight (the fault), with the later NaN losses skipped:
    the run must fail rather than save the model and metrics."""
    step = torch.optim.AdamW.step

    def poisoned_step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        result = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = math.inf
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    config = {**two_step_config, "skip_nonfinite_batches": True}
    code, err = cli(capsys, str(write_yaml(tmp_path / "config.yml", config)))
    assert code == 1
    assert "error: training ended with non-finite weights in 1 parameter(s): " in err, err
    assert not (Path(config["output_dir"]) / METRICS_FILE).exists()


@pytest.mark.parametrize(
    "fault",
    [RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"),
     OSError(errno.ENOSPC, "No space left on device", "checkpoint-2/model.safetensors")],
    ids=["torch-save", "safetensors"],
)  # fmt: skip
def test_a_full_disk_during_a_save_says_so_and_where(
    fault: Exception, two_step_config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import Trainer

    def full(*args: Any, **kwargs: Any) -> None:
        raise fault

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full)
    code, err = cli(capsys, str(write_yaml(tmp_path / "config.yml", two_step_config)))
    assert code == 1
    where = "checkpoint-2/model.safetensors (no space left on device" if isinstance(fault, OSError) else \
        f"under {two_step_config['output_dir']} (disk full? [enforce fail at inline_container.cc"  # fmt: skip
    assert f"error: could not write {where}" in err and "MiB free there now" in err, err
    assert not (Path(two_step_config["output_dir"]) / METRICS_FILE).exists()


# ---------------------------------------------------------------- another run's folder (held-out probes)


def _finished_folder(config: dict[str, Any]) -> Path:
    """``output_dir`` as a finished run of ``config`` leaves it (its recorded config, model, metrics)."""
    out = Path(config["output_dir"])
    record_run_config(out, validate_config(config).model_dump(mode="json"))
    (out / "model.safetensors").write_text("the first run's model")
    (out / METRICS_FILE).write_text('{"eval_S": 0.1}')
    return out


def test_an_output_dir_holding_another_configs_run_is_refused_before_loading(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _finished_folder(config)
    other = write_yaml(tmp_path / "other.yml", {**config, "learning_rate": 0.5, "objective": {"name": "ft"}})
    code, err = cli(capsys, str(other))
    assert code == 2
    (line,) = [line for line in err.splitlines() if "output_dir" in line]
    assert f"output_dir: {out} holds a run of another config (learning_rate, objective.name, objective.tau differ)" in line
    assert (out / METRICS_FILE).read_text() == '{"eval_S": 0.1}' and (out / "model.safetensors").is_file()  # nothing lost
    assert cli(capsys, str(write_yaml(tmp_path / "same.yml", config)), "--validate")[0] == 0  # its own config: a rerun
    replace = write_yaml(tmp_path / "replace.yml", {**config, "learning_rate": 0.5, "overwrite_output_dir": True})
    assert cli(capsys, str(replace), "--validate")[0] == 0


def test_the_folder_stays_held_until_the_run_s_summary_is_read(
    config: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Held-out probe: a second run (overwrite_output_dir) took the folder as soon as the first run's
    recipe returned and cleared its metrics.json before the first printed its summary from it."""
    import filelock

    from mft_plugin import cli as cli_module
    from mft_plugin.train import recipe

    out = Path(config["output_dir"])
    monkeypatch.setattr(recipe, "_run", lambda config, registry: _finished_folder(config.model_dump(mode="json")) and {})
    taken_meanwhile = []

    def summary(output_dir: Path) -> None:
        try:  # what a second run does first: take the folder's lock (another file description, as another process)
            filelock.FileLock(out / LOCK_FILE, timeout=0).acquire()
            taken_meanwhile.append(True)
        except filelock.Timeout:
            taken_meanwhile.append(False)

    monkeypatch.setattr(cli_module, "print_run_summary", summary)
    assert cli(capsys, str(write_yaml(tmp_path / "config.yml", config)))[0] == 0
    assert taken_meanwhile == [False]


def test_resuming_a_finished_run_with_a_damaged_metrics_file_is_one_error(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _finished_folder(config)
    (out / METRICS_FILE).write_text('{"eval_S": 0.')
    code, err = cli(capsys, str(write_yaml(tmp_path / "config.yml", {**config, "resume_from_checkpoint": True})))
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"{out / METRICS_FILE} is damaged (not valid JSON: "), err
    assert (out / METRICS_FILE).read_text() == '{"eval_S": 0.'  # left as it was
