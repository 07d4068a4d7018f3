"""``mft-run``: --list, --validate, exit codes, and one YAML trained with each of the four objectives.

The CLI is called in-process (``main([...])`` with capsys); one test runs the console script.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import Field

from mft_plugin.cli import main
from mft_plugin.hookspecs import hookimpl
from mft_plugin.registry import Registry, collect_strategies, make_plugin_manager
from mft_plugin.strategies import objectives as builtin_objectives
from mft_plugin.strategy import Mitigation, StrategyParams
from tests.tiny import write_yaml

OBJECTIVES = ["ft", "distill_ft", "singly_corrective", "mft"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str, registry: Registry | None = None) -> tuple[int, str, str]:
    code = main(list(argv), registry=registry)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- --list


def test_list_shows_the_four_objectives(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--list")
    assert code == 0 and err == ""
    rows = {line.split()[1]: line.split(maxsplit=3) for line in out.splitlines() if line.startswith("objective")}
    assert rows["ft"] == ["objective", "ft", "mft-plugin", "-"]
    assert rows["distill_ft"] == ["objective", "distill_ft", "mft-plugin", "-"]
    assert rows["singly_corrective"] == ["objective", "singly_corrective", "mft-plugin", "tau=0.25"]
    assert rows["mft"] == ["objective", "mft", "mft-plugin", "tau=0.25"]


class RaisingPlugin:
    @hookimpl
    def mft_register_objectives(self) -> list[type]:
        raise RuntimeError("boom")


class ShadowPlugin:
    @hookimpl
    def mft_register_objectives(self) -> list[type]:
        return [builtin_objectives.FinetuningObjective]  # "ft" a second time


class CacheParams(StrategyParams):
    folder: Path = Path("/tmp/cache")  # not JSON: listed as its text
    size: int = Field(gt=0)  # required: listed as null


class CacheMitigation(Mitigation):
    name = "cache"
    Params = CacheParams


class CachePlugin:
    @hookimpl
    def mft_register_mitigations(self) -> list[type]:
        return [CacheMitigation]


def test_list_survives_broken_and_conflicting_plugins(capsys: pytest.CaptureFixture[str]) -> None:
    manager = make_plugin_manager()
    manager.register(builtin_objectives, name="mft-plugin")
    manager.register(RaisingPlugin(), name="raising-dist")
    manager.register(ShadowPlugin(), name="shadow-dist")
    manager.register(CachePlugin(), name="cache-dist")
    code, out, _ = run_cli(capsys, "--list", registry=collect_strategies(manager))
    assert code == 0
    lines = out.splitlines()
    assert [line.split(maxsplit=3) for line in lines if line.startswith("mitigation")] == [
        ["mitigation", "cache", "cache-dist", 'folder="/tmp/cache", size=null']
    ]
    listed = [line.split()[1] for line in lines if line.startswith("objective")]
    assert listed == ["distill_ft", "mft", "singly_corrective"]
    assert "CONFLICT    objective 'ft' is claimed by mft-plugin and shadow-dist: unusable until one is removed" in lines
    assert "BROKEN      plugin raising-dist: mft_register_objectives raised RuntimeError: boom" in lines


# ---------------------------------------------------------------- --validate and errors


def test_validate_prints_the_resolved_config(
    capsys: pytest.CaptureFixture[str], base_config: dict[str, Any], tmp_path: Path
) -> None:
    base_config["objective"] = "mft"
    path = write_yaml(tmp_path / "config.yml", base_config)
    code, out, err = run_cli(capsys, str(path), "--validate", "--set", "objective.tau=0.5", "--set", "seed=2")
    assert (code, err) == (0, "")
    resolved = yaml.safe_load(out)
    assert resolved["objective"] == {"tau": 0.5, "name": "mft"}
    assert (resolved["seed"], resolved["mitigations"], resolved["learning_rate"]) == (2, [], 1e-3)
    assert resolved["datasets"][0]["field"] == "text"
    assert not Path(base_config["output_dir"]).exists()  # validating writes nothing


def test_bad_config_exits_2_with_the_message_on_stderr(
    capsys: pytest.CaptureFixture[str], base_config: dict[str, Any], tmp_path: Path
) -> None:
    path = write_yaml(tmp_path / "config.yml", {**base_config, "objective": {"name": "mft", "taux": 1}})
    code, out, err = run_cli(capsys, str(path), "--validate")
    assert (code, out) == (2, "")
    line = path.read_text().splitlines().index("  taux: 1") + 1
    assert err.splitlines() == ["invalid config:", f"  {path}:{line}: objective.taux: unknown key; did you mean 'tau'?"]


def test_unloadable_base_model_exits_2(
    capsys: pytest.CaptureFixture[str], base_config: dict[str, Any], tmp_path: Path
) -> None:
    path = write_yaml(tmp_path / "config.yml", {**base_config, "base_model": str(tmp_path / "no-model")})
    code, out, err = run_cli(capsys, str(path))
    assert (code, out) == (2, "")
    assert f"base_model: cannot load '{tmp_path / 'no-model'}'" in err


def test_missing_config_argument_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2
    assert "a config file is required (or --list)" in capsys.readouterr().err


def test_console_script(tmp_path: Path, corpora: dict[str, Path]) -> None:
    script = shutil.which("mft-run")
    assert script, "the mft-run console script is not installed (pip install -e .)"
    path = tmp_path / "bad.yml"
    path.write_text(f"base_model: /nonexistent\ndatasets:\n  - path: {corpora['spec_train']}\nlerning_rate: 0.1\n")
    result = subprocess.run([script, str(path)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (2, "")
    assert f"{path}:4: lerning_rate: unknown key; did you mean 'learning_rate'?" in result.stderr


# ---------------------------------------------------------------- one YAML, four objectives


def step_losses(output_dir: Path) -> list[float]:
    """The training loss logged at each step (from the final checkpoint's trainer state)."""
    (state_file,) = output_dir.glob("checkpoint-*/trainer_state.json")
    return [entry["loss"] for entry in json.loads(state_file.read_text())["log_history"] if "loss" in entry]


def train(config: dict[str, Any], folder: Path, label: str, *overrides: str) -> list[float]:
    """Run ``mft-run`` in-process on ``config`` written as YAML; return its per-step losses."""
    config = {**config, "output_dir": str(folder / label)}
    assert main([str(write_yaml(folder / f"{label}.yml", config)), *overrides]) == 0
    return step_losses(folder / label)


def test_one_yaml_trains_with_each_objective(two_step_config: dict[str, Any], tmp_path: Path) -> None:
    """Swapping ``objective:`` is the only edit needed to train with any of the four."""
    losses = {}
    for name in OBJECTIVES:
        losses[name] = train({**two_step_config, "objective": name}, tmp_path, name)
        saved = yaml.safe_load((tmp_path / name / "config.yml").read_text())
        assert saved["objective"]["name"] == name
        assert len(losses[name]) == 2 and all(loss > 0 for loss in losses[name])
    # at step 1 the student is the teacher: only ft's loss (plain NLL) differs from the distillations'
    assert losses["ft"][0] != pytest.approx(losses["mft"][0], rel=1e-4)


def test_mft_at_tau_1_trains_exactly_like_ft(two_step_config: dict[str, Any], tmp_path: Path) -> None:
    ft = train({**two_step_config, "objective": "ft"}, tmp_path, "ft")
    mft = train({**two_step_config, "objective": "mft"}, tmp_path, "mft", "--set", "objective.tau=1.0")
    assert mft == pytest.approx(ft, rel=1e-5, abs=1e-6)
