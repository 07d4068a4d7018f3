"""``mft-run report``: the paper's table format, seeds averaged, settings told apart, plots drawn.

Run folders are written by hand here (``metrics.json``, ``config.yml``, ``trainer_state.json``, as a
finished run leaves them), so every number in a table has a hand-computed expectation.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mft_plugin.cli import main
from mft_plugin.train.outputs import METRICS_FILE
from mft_plugin.report.plots import CURVES, DG_OVER_S, DG_VS_S, plot_report
from mft_plugin.report.results import find_runs, flatten, group_runs, load_run, mean_and_spread, method_labels, shown_keys
from mft_plugin.report.summary import run_summary
from mft_plugin.report.tables import RESULTS_CSV, RESULTS_MD
from mft_plugin.report.results import SWEEP_FILE

PNG = b"\x89PNG\r\n\x1a\n"


def finished_run(folder: Path, objective: dict[str, Any], seed: int, s: float, dg: float, **config: Any) -> Path:
    """A run folder as the recipe leaves it; S and DG as fractions, DG/S = dg / s."""
    folder.mkdir(parents=True)
    settings = {"base_model": "m", "seed": seed, "output_dir": str(folder), "objective": objective, "mitigations": [], **config}
    (folder / "config.yml").write_text(yaml.safe_dump(settings))
    metrics = {"eval_S": s, "eval_DG": dg, "eval_DG/S": dg / s, "base_spec_ppl": 120.0, "base_general_ppl": 50.0,
               "eval_spec_ppl": 120.0 * (1 - s), "eval_general_ppl": 50.0 * (1 + dg), "step": 4}  # fmt: skip
    (folder / METRICS_FILE).write_text(json.dumps(metrics))
    curve = [{"step": step, "eval_S": s * step / 4, "eval_DG": dg * step / 4} for step in (2, 4)]
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 1.0, "step": 1}, *curve]}))
    return folder


@pytest.fixture
def ablation(tmp_path: Path) -> Path:
    """FT and MFT, two seeds each, in grid order (sweep.json), plus an unfinished run."""
    sweep = tmp_path / "sweep"
    finished_run(sweep / "objective=ft,seed=1", {"name": "ft"}, 1, 0.16, 0.012)
    finished_run(sweep / "objective=ft,seed=2", {"name": "ft"}, 2, 0.14, 0.010)
    finished_run(sweep / "objective=mft,seed=1", {"name": "mft", "tau": 0.25}, 1, 0.10, 0.004)
    finished_run(sweep / "objective=mft,seed=2", {"name": "mft", "tau": 0.25}, 2, 0.12, 0.006)
    (sweep / "objective=singly_corrective,seed=1").mkdir()
    names = ["objective=ft,seed=1", "objective=ft,seed=2", "objective=singly_corrective,seed=1", "objective=mft,seed=1", "objective=mft,seed=2"]
    (sweep / SWEEP_FILE).write_text(json.dumps({"runs": names}))
    return sweep


def test_flatten_gives_dotted_keys() -> None:
    config = {"objective": {"name": "mft", "tau": 0.25}, "mitigations": [{"name": "lora", "r": 8}], "seed": 1, "extra": []}
    assert flatten(config) == {"objective.name": "mft", "objective.tau": 0.25, "mitigations.0.name": "lora",
                               "mitigations.0.r": 8, "seed": 1, "extra": []}  # fmt: skip


def test_mean_and_sample_spread() -> None:
    assert mean_and_spread([0.10, 0.12]) == (pytest.approx(0.11), pytest.approx(math.sqrt(2) * 0.01))
    assert mean_and_spread([0.3]) == (0.3, None)
    assert mean_and_spread([math.inf, 0.1]) == (math.inf, None)  # DG/S of a run that did not specialize


def test_markdown_table_in_the_papers_format(ablation: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(ablation)]) == 0
    table = (ablation / RESULTS_MD).read_text()
    assert capsys.readouterr().out == table
    lines = table.splitlines()
    assert lines[0] == (
        "| method | runs | S ↑ (%) | DG ↓ (%) | DG/S ↓ | spec ppl (base → final) | general ppl (base → final) |"
    )
    # ft: S 16, 14 -> 15.0 ± 1.4; DG 1.2, 1.0 -> 1.1 ± 0.1; DG/S 0.075, 0.0714.. -> 0.07 ± 0.00;
    # spec ppl 120 * (0.84, 0.86) -> 102.00; general 50 * (1.012, 1.010) -> 50.55
    assert lines[2] == "| ft | 2 | 15.0 ± 1.4 | 1.1 ± 0.1 | 0.07 ± 0.00 | 120.00 → 102.00 | 50.00 → 50.55 |"
    # mft: S 10, 12 -> 11.0 ± 1.4; DG 0.4, 0.6 -> 0.5 ± 0.1; DG/S 0.04, 0.05 -> 0.045 (0.04 as printed) ± 0.007;
    # spec ppl 120 * (0.90, 0.88) -> 106.80; general 50 * (1.004, 1.006) -> 50.25
    assert lines[3] == "| mft (tau 0.25) | 2 | 11.0 ± 1.4 | 0.5 ± 0.1 | 0.04 ± 0.01 | 120.00 → 106.80 | 50.00 → 50.25 |"
    assert len([line for line in lines if line.startswith("| ")]) == 4  # the unfinished run is left out
    assert "mean ± sample standard deviation over seeds" in table


def test_csv_keeps_full_precision_and_the_seeds(ablation: Path) -> None:
    assert main(["report", str(ablation)]) == 0
    rows = list(csv.DictReader(io.StringIO((ablation / RESULTS_CSV).read_text())))
    assert [(row["method"], row["objective.name"]) for row in rows] == [("ft", "ft"), ("mft (tau 0.25)", "mft")]
    mft = rows[1]
    assert (mft["objective.tau"], mft["runs"], mft["seeds"]) == ("0.25", "2", "1;2")
    assert float(mft["S_pct"]) == pytest.approx(11.0) and float(mft["S_pct_std"]) == pytest.approx(math.sqrt(2))
    assert float(mft["DG/S"]) == pytest.approx(0.045) and float(mft["base_spec_ppl"]) == 120.0
    assert float(mft["eval_spec_ppl"]) == pytest.approx(106.8) and float(mft["eval_general_ppl"]) == pytest.approx(50.25)
    assert rows[0]["objective.tau"] == ""  # ft has no tau


def test_one_seed_has_no_spread_and_columns_are_only_what_differs(tmp_path: Path) -> None:
    for tau, s in ((0.0, 0.08), (0.5, 0.13), (1.0, 0.15)):
        finished_run(tmp_path / f"objective.tau={tau}", {"name": "mft", "tau": tau}, 0, s, s / 10)
    keys, rows = group_runs([load_run(folder) for folder in find_runs([tmp_path])])
    assert keys == ["objective.tau"]
    assert [row.label for row in rows] == ["mft (tau 0.0)", "mft (tau 0.5)", "mft (tau 1.0)"]
    assert main(["report", str(tmp_path)]) == 0
    assert "| mft (tau 0.5) | 1 | 13.0 | 1.3 | 0.10 | 120.00 → 104.40 | 50.00 → 50.65 |" in (tmp_path / RESULTS_MD).read_text()


def test_find_runs_takes_run_sweep_and_parent_folders(ablation: Path, tmp_path: Path) -> None:
    in_grid_order = find_runs([ablation])
    assert [path.name for path in in_grid_order] == [
        "objective=ft,seed=1", "objective=ft,seed=2", "objective=mft,seed=1", "objective=mft,seed=2",
    ]  # fmt: skip
    (ablation / SWEEP_FILE).unlink()
    assert [path.name for path in find_runs([ablation])] == sorted(path.name for path in in_grid_order)
    assert find_runs([ablation / "objective=mft,seed=2"]) == [ablation / "objective=mft,seed=2"]
    assert find_runs([tmp_path / "nothing"]) == []


def test_no_finished_run_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert f"no finished run (a folder with metrics.json) in {tmp_path}" in capsys.readouterr().err


def test_the_three_figures_are_drawn(ablation: Path, tmp_path: Path) -> None:
    assert main(["report", str(ablation), "--out", str(tmp_path / "figures")]) == 0
    for name in (DG_VS_S, DG_OVER_S, CURVES, RESULTS_MD, RESULTS_CSV):
        assert (tmp_path / "figures" / name).is_file()
    for name in (DG_VS_S, DG_OVER_S, CURVES):
        assert (tmp_path / "figures" / name).read_bytes().startswith(PNG)


def test_without_matplotlib_the_tables_are_still_written(
    ablation: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    _, rows = group_runs([load_run(folder) for folder in find_runs([ablation])])
    assert plot_report(ablation, rows, ["objective.name"]) == []
    assert "matplotlib is not installed" in caplog.text


# ---------------------------------------------------------------- rows named by what differs


def test_method_labels_name_mitigations_then_the_objective() -> None:
    lora = {"name": "lora", "r": 8, "lora_alpha": 16, "use_dora": False}
    dora = {**lora, "name": "dora", "use_dora": True}
    runs = [
        {"objective": {"name": "ft", "tau": None}, "mitigations": []},
        {"objective": {"name": "mft", "tau": 0.25}, "mitigations": [lora]},
        {"objective": {"name": "mft", "tau": 0.25}, "mitigations": [dora]},
        {"objective": {"name": "mft", "tau": 0.25}, "mitigations": [{"name": "replay", "ratio": 0.25}, lora]},
        {"objective": {"name": "mft", "tau": 0.25}, "mitigations": [{"name": "replay", "ratio": 0.5}, lora]},
    ]
    # lora's parameters and dora's use_dora are the same in every run of that mitigation: not named;
    # replay's ratio differs between its runs: named
    assert method_labels([flatten(run) for run in runs]) == [
        "ft", "lora + mft (tau 0.25)", "dora + mft (tau 0.25)",
        "replay (ratio 0.25) + lora + mft (tau 0.25)", "replay (ratio 0.5) + lora + mft (tau 0.25)",
    ]  # fmt: skip


def test_shown_keys_are_those_besides_the_method_that_vary_one_per_group() -> None:
    runs = [
        {"datasets.0.path": "legal", "test_datasets.0.path": "legal_val", "learning_rate": 0.001, "seq": 256,
         "objective.name": "ft", "max_degeneralization": None},
        {"datasets.0.path": "code", "test_datasets.0.path": "code_val", "learning_rate": 0.001, "seq": 256,
         "objective.name": "mft", "max_degeneralization": None},
        {"datasets.0.path": "legal", "test_datasets.0.path": "legal_val", "learning_rate": 0.005, "seq": 256,
         "objective.name": "ft", "max_degeneralization": 0.1},
    ]  # fmt: skip
    keys = sorted(runs[0])
    # test_datasets.0.path changes in step with datasets.0.path; max_degeneralization with learning_rate
    assert shown_keys(keys, runs) == ["datasets.0.path", "learning_rate"]


def test_a_results_csv_from_before_the_method_column_is_rendered_again(tmp_path: Path) -> None:
    """``mft-run report results.csv``: the docs' tables were written with one column per differing key."""
    (tmp_path / RESULTS_CSV).write_text(
        "datasets.0.path,mitigations,mitigations.0.name,mitigations.0.r,objective.name,objective.tau,test_datasets.0.path,"
        "runs,seeds,S_pct,S_pct_std,DG_pct,DG_pct_std,DG/S,DG/S_std,base_spec_ppl,base_general_ppl,folders\n"
        "legal,[],,,ft,,legal_val,3,1;2;3,81.67,0.16,199.77,10.6,2.446,0.1308,123.0,53.35,a\n"
        "legal,,lora,8,mft,0.25,legal_val,1,1,53.115,,9.32,,0.1755,,123.0,53.35,b\n"
        "code,[],,,mft,0.25,code_val,1,1,87.687,,18.016,,0.2055,,721.83,53.35,c\n"
    )
    assert main(["report", str(tmp_path / RESULTS_CSV), "--out", str(tmp_path / "out")]) == 0
    lines = (tmp_path / "out" / RESULTS_MD).read_text().splitlines()
    assert lines[0] == (
        "| method | datasets.0.path | runs | S ↑ (%) | DG ↓ (%) | DG/S ↓ | spec ppl (base → final) | general ppl (base → final) |"
    )
    assert lines[2:5] == [
        "| ft | legal | 3 | 81.7 ± 0.2 | 199.8 ± 10.6 | 2.45 ± 0.13 | 123.00 → – | 53.35 → – |",
        "| lora + mft (tau 0.25) | legal | 1 | 53.1 | 9.3 | 0.18 | 123.00 → – | 53.35 → – |",
        "| mft (tau 0.25) | code | 1 | 87.7 | 18.0 | 0.21 | 721.83 → – | 53.35 → – |",
    ]
    assert not (tmp_path / "out" / RESULTS_CSV).exists()  # the data is read, never rewritten


# ---------------------------------------------------------------- the run in words


def test_run_summary_says_what_was_kept_and_why(tmp_path: Path) -> None:
    run = finished_run(tmp_path / "run", {"name": "mft", "tau": 0.25}, 1, 0.619, 0.144,
                       mitigations=[{"name": "lora", "r": 8}], max_degeneralization=0.2)  # fmt: skip
    metrics = json.loads((run / METRICS_FILE).read_text())
    (run / METRICS_FILE).write_text(json.dumps({**metrics, "stopped_by": "max_degeneralization"}))
    assert run_summary(load_run(run), [run / DG_VS_S]).splitlines() == [
        "Trained: objective mft (tau 0.25); mitigations: lora.",
        "Final model: the checkpoint of step 4, the least specialized validation perplexity among 2 evaluations "
        "within the DG budget (20 %); training stopped early (max_degeneralization).",
        "  S    =  61.9 %   specialization: spec perplexity 120.00 (base) -> 45.72",
        "  DG   =  14.4 %   degeneralization: general perplexity 50.00 (base) -> 57.20",
        "  DG/S = 0.233     degeneralization per unit of specialization (lower is better)",
        f"Model: {run}/   metrics: {run / METRICS_FILE}   every evaluation: {run / 'trainer_state.json'}",
        f"Plots: {run / DG_VS_S}",
    ]


def test_run_summary_without_a_selected_checkpoint(tmp_path: Path) -> None:
    run = finished_run(tmp_path / "run", {"name": "ft"}, 1, 0.5, 0.1)
    metrics = json.loads((run / METRICS_FILE).read_text())
    (run / METRICS_FILE).write_text(json.dumps({k: v for k, v in metrics.items() if k != "step"}))
    assert run_summary(load_run(run)).splitlines()[1] == "Final model: the last step's, as no evaluation was kept."
    (run / METRICS_FILE).write_text(json.dumps({"train_loss": 1.0}))
    lines = run_summary(load_run(run)).splitlines()
    assert lines[1] == "Final model: the last step's (no specialized validation set: nothing to choose by)."
    assert not any(line.startswith(("  S ", "  DG")) for line in lines)


@pytest.mark.parametrize(
    ("file", "damage", "expected"),
    [
        ("objective=ft,seed=1/metrics.json", lambda text: text[: len(text) // 2], "is damaged (not valid JSON: "),
        ("objective=ft,seed=2/metrics.json", lambda text: "[1, 2]", "is damaged (it holds a list, not a dict)"),
        ("objective=mft,seed=1/config.yml", lambda text: "objective: [unclosed\n", "is damaged (not valid YAML: "),
        ("objective=mft,seed=2/trainer_state.json", lambda text: text[:-3], "is damaged (not valid JSON: "),
        ("objective=mft,seed=2/trainer_state.json", lambda text: '{"log_history": 3}', "is damaged (its log_history is not a list"),
        (SWEEP_FILE, lambda text: text[:-5], "is damaged (not valid JSON: "),
    ],
)
def test_a_damaged_run_file_is_one_error_naming_it(
    ablation: Path, file: str, damage: Any, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Held-out probe: a truncated metrics.json ended in a JSONDecodeError traceback. Now: one line naming
    the file, exit 2, and no table written over the last good one."""
    path = ablation / file
    path.write_text(damage(path.read_text()))
    assert main(["report", str(ablation)]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"error: {path} {expected}"), line
    assert not (ablation / RESULTS_MD).exists() and not (ablation / RESULTS_CSV).exists()
