"""``mft-run sweep``: a grid of runs from one config, each in its own folder, resumable.

The resume test trains the tiny model for real (2 steps a run); the others replace the training
(``mft_plugin.train.recipe.run``) by a stand-in that writes what a finished run writes.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mft_plugin.train import recipe
from mft_plugin.cli import main
from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.config.errors import ConfigError
from mft_plugin.train.outputs import BASE_PPL_FILE, METRICS_FILE
from mft_plugin.report.results import SWEEP_FILE
from mft_plugin.sweep import SweepError, grid_points, plan_sweep, run_name, run_sweep
from tests.tiny import write_yaml

ABLATION = {"objective": ["ft", "distill_ft", "mft"]}
ABLATION_RUNS = ["objective=ft", "objective=distill_ft", "objective=mft"]


def sweep_config(base_config: dict[str, Any], tmp_path: Path, grid: dict[str, list[Any]]) -> Path:
    config = {**base_config, "sequence_len": 32, "max_steps": 2, "eval_steps": 2, "sweep": grid}
    return write_yaml(tmp_path / "sweep.yml", config)


def fake_run(trained: list[str], fail: set[str] = frozenset()) -> Callable[..., dict[str, Any]]:
    """A stand-in for ``recipe.run`` that records the run and writes a finished run's files."""

    def run(config: MFTConfigBase, registry: Any = None) -> dict[str, Any]:
        output_dir = Path(config.output_dir)
        trained.append(output_dir.name)
        if output_dir.name in fail:
            raise RuntimeError("diverged")
        metrics = {"eval_S": 0.1, "eval_DG": 0.01, "eval_DG/S": 0.1, "base_spec_ppl": 9.0, "base_general_ppl": 5.0}
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
        (output_dir / METRICS_FILE).write_text(json.dumps(metrics))
        return metrics

    return run


# ---------------------------------------------------------------- planning


def test_the_sweep_command_imports_no_torch_before_it_has_read_the_configs() -> None:
    """``mft-run sweep`` quiets the import-time lines of libraries its runs do not use (bitsandbytes' missing
    CPU kernel, on CPUs that have its instructions) only if torch, transformers and peft come after that."""
    import subprocess

    script = "import sys, mft_plugin.cli, mft_plugin.sweep; print([m for m in ('torch', 'transformers', 'peft') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_grid_is_the_cartesian_product_first_key_slowest() -> None:
    points = grid_points({"objective": ["ft", "mft"], "seed": [1, 2]})
    assert [run_name(point) for point in points] == [
        "objective=ft,seed=1", "objective=ft,seed=2", "objective=mft,seed=1", "objective=mft,seed=2",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("point", "name"),
    [
        ({"objective.tau": 0.25}, "objective.tau=0.25"),
        ({"objective": {"name": "mft", "tau": 0.5}}, "objective=mft(tau=0.5)"),
        ({"mitigations": []}, "mitigations=none"),
        ({"mitigations": ["replay", {"name": "lora", "r": 8}]}, "mitigations=replay+lora(r=8)"),
        ({"base_model": "models/a b"}, "base_model=models_a_b"),
        ({}, "base"),
    ],
)
def test_run_folder_names_read_like_the_overrides(point: dict[str, Any], name: str) -> None:
    assert run_name(point) == name


def test_plan_validates_every_run_and_places_it_under_output_dir(base_config: dict[str, Any], tmp_path: Path) -> None:
    path = sweep_config(base_config, tmp_path, {"objective": ["ft", {"name": "mft", "tau": 0.5}]})
    sweep = plan_sweep(path, grid=["seed=[1, 2]"], overrides=["learning_rate=0.01"])
    assert sweep.folder == Path(base_config["output_dir"])
    assert [run.output_dir for run in sweep.runs] == [
        sweep.folder / name
        for name in ("objective=ft,seed=1", "objective=ft,seed=2", "objective=mft(tau=0.5),seed=1", "objective=mft(tau=0.5),seed=2")
    ]
    last = sweep.runs[-1].config
    assert (last.objective.name, last.objective.tau, last.seed, last.learning_rate) == ("mft", 0.5, 2, 0.01)
    assert last.sweep is None


def test_axolotl_keys_and_strategy_parameters_are_swept_as_written(
    base_config: dict[str, Any], corpora: dict[str, Path], tmp_path: Path
) -> None:
    # `lora_r` is rewritten into the lora mitigation by validation: the grid applies before it, like --set
    path = sweep_config({**base_config, "adapter": "lora", "lora_r": 8}, tmp_path, {"lora_r": [4, 16]})
    assert [run.config.mitigations[0].r for run in plan_sweep(path).runs] == [4, 16]
    replay = {"name": "replay", "datasets": [{"path": str(corpora["general_train"])}]}
    path = sweep_config({**base_config, "mitigations": [replay]}, tmp_path, {"mitigations.0.ratio": [0.25, 0.5]})
    runs = plan_sweep(path).runs
    assert [(run.name, run.config.mitigations[0].ratio) for run in runs] == [
        ("mitigations.0.ratio=0.25", 0.25), ("mitigations.0.ratio=0.5", 0.5),
    ]  # fmt: skip


def test_plan_reports_every_bad_run_at_once(base_config: dict[str, Any], tmp_path: Path) -> None:
    path = sweep_config(base_config, tmp_path, {"objective.tau": [0.5, 1.5, 2.0]})
    with pytest.raises(ConfigError) as caught:
        plan_sweep(path)
    assert len(caught.value.problems) == 2
    assert caught.value.problems[0].startswith(f"{path} (sweep run objective.tau=1.5): objective.tau: ")
    assert "less than or equal to 1" in caught.value.problems[0]


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (["objective.tau=0.5"], "--grid 'objective.tau=0.5': expected KEY=[VALUE, ...]"),
        (["output_dir=[a, b]"], "sweep.output_dir: each run's folder is made from the sweep's output_dir"),
    ],
)
def test_bad_grids_are_refused(base_config: dict[str, Any], tmp_path: Path, grid: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        plan_sweep(sweep_config(base_config, tmp_path, ABLATION), grid=grid)


def test_preflight_checks_every_run_before_the_first_trains(
    base_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    trained: list[str] = []
    monkeypatch.setattr(recipe, "run", fake_run(trained))
    path = sweep_config(base_config, tmp_path, {"lr_scheduler": ["cosine", "cosine_typo"]})
    assert main(["sweep", str(path)]) == 2
    assert "sweep run lr_scheduler=cosine_typo: lr_scheduler: 'cosine_typo' is not one of" in capsys.readouterr().err
    assert trained == []


def test_plain_run_of_a_sweep_config_points_to_mft_run_sweep(
    base_config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sweep_config(base_config, tmp_path, ABLATION)
    assert main([str(path)]) == 2
    assert f"train it with `mft-run sweep {path}`" in capsys.readouterr().err
    assert not Path(base_config["output_dir"]).exists()


# ---------------------------------------------------------------- running


def test_an_interrupted_sweep_finishes_the_rest_when_run_again(
    base_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sweep_config(base_config, tmp_path, ABLATION)
    real_run, calls = recipe.run, []

    def ctrl_c_on_the_second_run(config: MFTConfigBase, registry: Any = None) -> dict[str, Any]:
        calls.append(Path(config.output_dir).name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(config, registry)

    monkeypatch.setattr(recipe, "run", ctrl_c_on_the_second_run)
    with pytest.raises(KeyboardInterrupt):
        main(["sweep", str(path)])
    folder = Path(base_config["output_dir"])
    first = folder / ABLATION_RUNS[0] / METRICS_FILE
    assert first.is_file() and not any((folder / name / METRICS_FILE).exists() for name in ABLATION_RUNS[1:])
    first_written, first_metrics = first.stat().st_mtime_ns, first.read_text()

    trained, base_cached = [], []

    def recording_run(config: MFTConfigBase, registry: Any = None) -> dict[str, Any]:
        trained.append(Path(config.output_dir).name)
        base_cached.append((Path(config.output_dir) / BASE_PPL_FILE).is_file())  # measured by the first run
        return real_run(config, registry)

    monkeypatch.setattr(recipe, "run", recording_run)
    capsys.readouterr()
    assert main(["sweep", str(path)]) == 0
    assert trained == ABLATION_RUNS[1:] and base_cached == [True, True]
    assert (first.stat().st_mtime_ns, first.read_text()) == (first_written, first_metrics)  # untouched
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[2:] == ["| ft", "| distill_ft", "| mft (tau 0.25)"]  # after the header and its rule
    assert json.loads((folder / SWEEP_FILE).read_text()) == {"runs": ABLATION_RUNS}
    for name in ABLATION_RUNS:
        metrics = json.loads((folder / name / METRICS_FILE).read_text())
        assert {"eval_S", "eval_DG", "eval_DG/S", "base_spec_ppl"} <= set(metrics)
    assert {json.loads((folder / name / METRICS_FILE).read_text())["base_spec_ppl"] for name in ABLATION_RUNS} == {
        json.loads(first_metrics)["base_spec_ppl"]
    }


def test_a_failed_run_does_not_stop_the_others(
    base_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    trained: list[str] = []
    monkeypatch.setattr(recipe, "run", fake_run(trained, fail={"objective=distill_ft"}))
    assert main(["sweep", str(sweep_config(base_config, tmp_path, ABLATION))]) == 1
    assert trained == ABLATION_RUNS
    captured = capsys.readouterr()
    assert "run objective=distill_ft failed: RuntimeError: diverged" in captured.err
    table = [line.split(" | ")[0] for line in captured.out.splitlines() if line.startswith("| ")]
    assert table[2:] == ["| ft", "| mft (tau 0.25)"]
    # each finished run in words before the table; none for the failed one
    assert [line for line in captured.out.splitlines() if line.startswith("Trained: ")] == [
        "Trained: objective ft; mitigations: none.", "Trained: objective mft (tau 0.25); mitigations: none.",
    ]  # fmt: skip


def test_a_finished_run_with_another_config_is_refused(
    base_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = sweep_config(base_config, tmp_path, ABLATION)
    monkeypatch.setattr(recipe, "run", fake_run([]))
    run_sweep(plan_sweep(path))
    trained: list[str] = []
    monkeypatch.setattr(recipe, "run", fake_run(trained))
    with pytest.raises(SweepError, match=r"objective=ft: finished with another config \(learning_rate differ\)"):
        run_sweep(plan_sweep(path, overrides=["learning_rate=0.5"]))
    assert trained == []  # refused before anything trained
    run_sweep(plan_sweep(path))  # the same config again: every run finished, nothing trained
    assert trained == []
    saved = Path(base_config["output_dir"]) / ABLATION_RUNS[0] / "config.yml"
    for key, refused in (("use_tensorboard", False), ("logging_steps", True)):  # default False; 1, default 10
        config = yaml.safe_load(saved.read_text())
        del config[key]  # as if written before the key existed: its default applies
        saved.write_text(yaml.safe_dump(config))
        if refused:
            with pytest.raises(SweepError, match=r"\(logging_steps differ\)"):
                run_sweep(plan_sweep(path))
        else:
            run_sweep(plan_sweep(path))
    assert trained == []


def test_each_run_gets_its_own_wandb_run(
    base_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    finished: list[str] = []
    wandb = types.SimpleNamespace(run=object(), finish=lambda: finished.append("finish"))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    names: list[str | None] = []
    fake = fake_run([])
    monkeypatch.setattr(recipe, "run", lambda config, registry=None: names.append(config.wandb_name) or fake(config))
    base_config.update(wandb_project="ablation", wandb_name="tiny")
    run_sweep(plan_sweep(sweep_config(base_config, tmp_path, ABLATION)))
    assert names == [f"tiny/{name}" for name in ABLATION_RUNS]
    assert finished == ["finish"] * 3


def test_a_run_interrupted_after_a_checkpoint_resumes_from_it(
    base_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = plan_sweep(sweep_config(base_config, tmp_path, ABLATION))
    (sweep.runs[1].output_dir / "checkpoint-1").mkdir(parents=True)  # what a SIGTERM'd run leaves
    resumed: list[Any] = []
    fake = fake_run([])
    monkeypatch.setattr(recipe, "run", lambda config, registry=None: resumed.append(config.resume_from_checkpoint) or fake(config))
    run_sweep(sweep)
    assert resumed == [None, True, None]
    run_sweep(plan_sweep(sweep_config(base_config, tmp_path, ABLATION)))  # the resumed run counts as finished
    assert len(resumed) == 3


def test_the_shipped_sweeps_plan_the_papers_grids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the examples' paths are relative to the repo
    ablation = plan_sweep("yaml_examples/ablation.yml")
    assert [run.name for run in ablation.runs[::3]] == [
        "objective=ft,seed=1", "objective=distill_ft,seed=1", "objective=singly_corrective,seed=1", "objective=mft,seed=1",
    ]  # fmt: skip
    assert len(ablation.runs) == 12 and ablation.runs[-1].config.objective.tau == 0.25
    taus = plan_sweep("yaml_examples/tau_sweep.yml", grid=["seed=[42]"])
    assert [run.config.objective.tau for run in taus.runs] == [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
