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
from mft_plugin.report.results import find_runs, flatten, group_runs, load_run, mean_and_spread
from mft_plugin.report.tables import RESULTS_CSV, RESULTS_MD
from mft_plugin.report.results import SWEEP_FILE

PNG = b"\x89PNG\r\n\x1a\n"


def finished_run(folder: Path, objective: dict[str, Any], seed: int, s: float, dg: float, **config: Any) -> Path:
    """A run folder as the recipe leaves it; S and DG as fractions, DG/S = dg / s."""
    folder.mkdir(parents=True)
    settings = {"base_model": "m", "seed": seed, "output_dir": str(folder), "objective": objective, "mitigations": [], **config}
    (folder / "config.yml").write_text(yaml.safe_dump(settings))
    metrics = {"eval_S": s, "eval_DG": dg, "eval_DG/S": dg / s, "base_spec_ppl": 120.0, "base_general_ppl": 50.0, "step": 4}
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
    assert lines[0] == "| objective.name | objective.tau | runs | S ↑ (%) | DG ↓ (%) | DG/S ↓ | base ppl spec | base ppl general |"
    # ft: S 16, 14 -> 15.0 ± 1.4; DG 1.2, 1.0 -> 1.1 ± 0.1; DG/S 0.075, 0.0714.. -> 0.07 ± 0.00
    assert lines[2] == "| ft | – | 2 | 15.0 ± 1.4 | 1.1 ± 0.1 | 0.07 ± 0.00 | 120.00 | 50.00 |"
    # mft: S 10, 12 -> 11.0 ± 1.4; DG 0.4, 0.6 -> 0.5 ± 0.1; DG/S 0.04, 0.05 -> 0.045 (0.04 as printed) ± 0.007
    assert lines[3] == "| mft | 0.25 | 2 | 11.0 ± 1.4 | 0.5 ± 0.1 | 0.04 ± 0.01 | 120.00 | 50.00 |"
    assert len([line for line in lines if line.startswith("| ")]) == 4  # the unfinished run is left out
    assert "mean ± sample standard deviation over seeds" in table


def test_csv_keeps_full_precision_and_the_seeds(ablation: Path) -> None:
    assert main(["report", str(ablation)]) == 0
    rows = list(csv.DictReader(io.StringIO((ablation / RESULTS_CSV).read_text())))
    assert [row["objective.name"] for row in rows] == ["ft", "mft"]
    mft = rows[1]
    assert (mft["objective.tau"], mft["runs"], mft["seeds"]) == ("0.25", "2", "1;2")
    assert float(mft["S_pct"]) == pytest.approx(11.0) and float(mft["S_pct_std"]) == pytest.approx(math.sqrt(2))
    assert float(mft["DG/S"]) == pytest.approx(0.045) and float(mft["base_spec_ppl"]) == 120.0
    assert rows[0]["objective.tau"] == ""  # ft has no tau


def test_one_seed_has_no_spread_and_columns_are_only_what_differs(tmp_path: Path) -> None:
    for tau, s in ((0.0, 0.08), (0.5, 0.13), (1.0, 0.15)):
        finished_run(tmp_path / f"objective.tau={tau}", {"name": "mft", "tau": tau}, 0, s, s / 10)
    keys, rows = group_runs([load_run(folder) for folder in find_runs([tmp_path])])
    assert keys == ["objective.tau"]
    assert [row.label for row in rows] == ["tau=0.0", "tau=0.5", "tau=1.0"]
    assert main(["report", str(tmp_path)]) == 0
    assert "| 0.5 | 1 | 13.0 | 1.3 | 0.10 | 120.00 | 50.00 |" in (tmp_path / RESULTS_MD).read_text()


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
