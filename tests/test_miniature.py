"""The miniature in the paper's regime (issue 18, ``bench/miniature/epochs8``): what its configs claim, and its summary.

The configs claim ~8 epochs over their training subset and at least 8 evaluations per run, so that
the best-checkpoint rule has something to choose; the tau table puts runs of both sweeps side by
side, which is only fair if they differ in tau alone. The summary's numbers are checked on run
folders written by hand, against values computed by hand.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest

from mft_plugin.data.packing import raw_text_blocks
from mft_plugin.models.loading import load_tokenizer
from mft_plugin.report.results import find_runs, group_runs, load_run
from mft_plugin.sweep import plan_sweep
from tests.test_report import finished_run
from tests.tiny import REPO

CONFIGS = REPO / "bench" / "miniature" / "epochs8"


def _summary_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("miniature_summary", CONFIGS / "summary.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


summary = _summary_module()


@pytest.fixture
def sweeps(monkeypatch: pytest.MonkeyPatch) -> tuple:
    monkeypatch.chdir(REPO)  # the configs name the shipped model and corpora relative to the repo
    return plan_sweep(CONFIGS / "ablation.yml"), plan_sweep(CONFIGS / "tau.yml")


def test_table_3_and_the_tau_sweep_each_with_three_seeds(sweeps: tuple) -> None:
    ablation, tau = sweeps
    assert [run.name for run in ablation.runs] == [
        f"objective={name},seed={seed}" for name in ("ft", "distill_ft", "singly_corrective", "mft") for seed in (1, 2, 3)
    ]
    assert [run.name for run in tau.runs] == [f"seed={s},objective.tau={t}" for s in (1, 2, 3) for t in (0.0, 0.5, 0.75)]


def test_tau_runs_differ_from_the_ablations_mft_runs_in_tau_alone(sweeps: tuple) -> None:
    ablation, tau = sweeps
    mft = next(run.config for run in ablation.runs if run.name == "objective=mft,seed=1").model_dump()
    tau_zero = next(run.config for run in tau.runs if run.name == "seed=1,objective.tau=0.0").model_dump()
    assert (mft["objective"]["tau"], tau_zero["objective"]["tau"]) == (0.25, 0.0)
    for config in (mft, tau_zero):
        config["objective"].pop("tau"), config.pop("output_dir")
    assert mft == tau_zero


def test_each_run_sees_its_data_about_eight_times_and_is_evaluated_eight_times(sweeps: tuple) -> None:
    for sweep in sweeps:
        config = sweep.runs[0].config
        blocks = len(raw_text_blocks(config.datasets, load_tokenizer(config), config.sequence_len))
        epochs = config.max_steps / math.ceil(blocks / config.micro_batch_size)  # the last batch of an epoch is short
        assert 7.5 <= epochs <= 9.5, (blocks, epochs)
        assert config.max_steps // config.eval_steps >= 8


def test_spread_is_exceeded_only_by_disjoint_intervals() -> None:
    # means 2 and 6, sample std 1 each: 4 > 1 + 1
    assert summary.exceeds_spread([1.0, 2.0, 3.0], [5.0, 6.0, 7.0]) is True
    # means 2 and 4: the intervals [1, 3] and [3, 5] touch, which is not beyond the spread
    assert summary.exceeds_spread([1.0, 2.0, 3.0], [3.0, 4.0, 5.0]) is False
    assert summary.exceeds_spread([1.0], [5.0, 6.0]) is None  # one seed has no spread


def _overfitting_run(folder: Path, objective: dict, seed: int) -> Path:
    """A finished run whose S peaks at step 4 of evaluations at 2, 4, 6 (the kept step) and then falls."""
    finished_run(folder, objective, seed, 0.50, 0.10)
    curve = [{"step": 2, "eval_S": 0.30, "eval_DG": 0.05}, {"step": 4, "eval_S": 0.50, "eval_DG": 0.10},
             {"step": 6, "eval_S": 0.40, "eval_DG": 0.20}]  # fmt: skip
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": curve}))
    return folder


def test_selection_table_gives_the_kept_step_and_the_last_evaluation(tmp_path: Path) -> None:
    _overfitting_run(tmp_path / "objective=ft,seed=3", {"name": "ft"}, 3)
    _, rows = group_runs([load_run(folder) for folder in find_runs([tmp_path])])
    lines = summary.selection_table(rows).splitlines()
    assert lines[2] == "| ft | 3 | 4 | 3 (2-6) | 50.0 | 40.0 | 10.0 | 20.0 |"  # one setting: labelled by its method
    assert "Differences" not in summary.summary([tmp_path], "One run")  # nothing to compare it with


def test_comparison_table_of_consecutive_settings_and_first_against_last(tmp_path: Path) -> None:
    # S (fractions): ft 0.16, 0.14; distill_ft 0.15, 0.13; mft 0.10, 0.12. DG: ft 0.012, 0.010; ...
    for seed, (s_ft, s_distill, s_mft) in enumerate(((0.16, 0.15, 0.10), (0.14, 0.13, 0.12)), start=1):
        finished_run(tmp_path / f"objective=ft,seed={seed}", {"name": "ft"}, seed, s_ft, 0.012 - 0.002 * (seed - 1))
        finished_run(tmp_path / f"objective=distill_ft,seed={seed}", {"name": "distill_ft"}, seed, s_distill, 0.012)
        finished_run(tmp_path / f"objective=mft,seed={seed}", {"name": "mft"}, seed, s_mft, 0.005)
    order = [tmp_path / f"objective={name},seed={seed}" for name in ("ft", "distill_ft", "mft") for seed in (1, 2)]
    _, rows = group_runs([load_run(folder) for folder in order])
    lines = summary.comparison_table(rows).splitlines()
    assert [line.split(" | ")[:2] for line in lines[2:5]] == [["| ft", "distill_ft"], ["| distill_ft", "mft"], ["| ft", "mft"]]
    # ft -> distill_ft: S 15.0 ± 1.41 -> 14.0 ± 1.41 (within); DG 1.1 ± 0.14 -> 1.2 ± 0 (within)
    assert lines[2].split(" | ")[2:4] == ["-1.0 (within spread)", "+0.1 (within spread)"]
    # ft -> mft: S 15.0 ± 1.41 -> 11.0 ± 1.41: 4.0 > 2.83; DG 1.1 ± 0.14 -> 0.5 ± 0: 0.6 > 0.14
    assert lines[4].split(" | ")[2:4] == ["-4.0 (exceeds spread)", "-0.6 (exceeds spread)"]
