"""Tables and plots from finished runs: S, DG and DG/S as the paper reports them (Sec. 3.1).

    mft-run report OUTPUT_DIR... [--out DIR]

An OUTPUT_DIR holding ``metrics.json`` is one run; a sweep folder (``sweep.json``) stands for its
finished runs in grid order; any other folder for the run folders directly inside it.

Runs whose resolved configs (``config.yml``) differ only in ``seed`` make one row, with the mean and
the sample standard deviation over seeds of each metric (DG/S averaged run by run). The columns
naming a row are the config keys whose values differ between rows. Each run contributes the
evaluation of its final checkpoint, as in ``metrics.json`` (least specialized perplexity, within the
degeneralization budget). The format is the paper's tables': S and DG in percent with one decimal,
DG/S as a fraction with two.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


from mft_plugin.files import atomic_write_text
from mft_plugin.report.results import SEED, Row, find_runs, group_runs, load_run, mean_and_spread
from mft_plugin.train.outputs import METRICS_FILE

RESULTS_MD, RESULTS_CSV = "results.md", "results.csv"
# (column, metrics.json key, scale, decimals): the paper's format
METRICS = (("S ↑ (%)", "eval_S", 100.0, 1), ("DG ↓ (%)", "eval_DG", 100.0, 1), ("DG/S ↓", "eval_DG/S", 1.0, 2))
BASE = (("base ppl spec", "base_spec_ppl"), ("base ppl general", "base_general_ppl"))


def _cell(values: Sequence[float], scale: float, decimals: int) -> str:
    if not values:
        return "–"
    mean, spread = mean_and_spread([value * scale for value in values])
    return f"{mean:.{decimals}f}" + (f" ± {spread:.{decimals}f}" if spread is not None else "")


def _setting_cell(value: Any) -> str:
    return "–" if value is None else str(value)


def markdown_table(keys: Sequence[str], rows: Sequence[Row]) -> str:
    header = [*keys, "runs", *(name for name, *_ in METRICS), *(name for name, _ in BASE)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [_setting_cell(row.setting[key]) for key in keys] + [str(len(row.runs))]
        cells += [_cell(row.values(key), scale, decimals) for _, key, scale, decimals in METRICS]
        cells += [f"{statistics.fmean(row.values(key)):.2f}" if row.values(key) else "–" for _, key in BASE]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = max(len(row.runs) for row in rows)
    note = (
        "S and DG in percent, DG/S as a fraction (paper Sec. 3.1), at each run's final checkpoint (least "
        "specialized validation perplexity, within any degeneralization budget)"
        + ("; mean ± sample standard deviation over seeds." if seeds > 1 else ".")
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


def csv_table(keys: Sequence[str], rows: Sequence[Row]) -> str:
    """One row per setting; S and DG in percent, DG/S as a fraction, with the spread over seeds."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    metric_columns = [f"{name}{suffix}" for name in ("S_pct", "DG_pct", "DG/S") for suffix in ("", "_std")]
    writer.writerow([*keys, "runs", "seeds", *metric_columns, *(key for _, key in BASE), "folders"])
    for row in rows:
        stats = []
        for _, key, scale, _ in METRICS:
            values = [value * scale for value in row.values(key)]
            stats += list(mean_and_spread(values)) if values else [None, None]
        base = [statistics.fmean(row.values(key)) if row.values(key) else None for _, key in BASE]
        seeds = ";".join(str(run.settings.get(SEED)) for run in row.runs)
        folders = ";".join(run.folder.name for run in row.runs)
        writer.writerow([*row.setting.values(), len(row.runs), seeds, *stats, *base, folders])  # None as ''
    return buffer.getvalue()


def write_report(run_folders: Sequence[Path], out: Path) -> list[Path]:
    """``results.md``, ``results.csv`` and the plots (with matplotlib) in ``out``; the paths written."""
    from mft_plugin.report.plots import plot_report

    keys, rows = group_runs([load_run(folder) for folder in run_folders])
    atomic_write_text(out / RESULTS_MD, markdown_table(keys, rows))
    atomic_write_text(out / RESULTS_CSV, csv_table(keys, rows))
    return [out / RESULTS_MD, out / RESULTS_CSV, *plot_report(out, rows, keys)]


def main(argv: Sequence[str]) -> int:
    """``mft-run report``: rebuild the tables and plots from finished runs; print ``results.md``."""
    parser = argparse.ArgumentParser(prog="mft-run report", description="Tables and plots from finished runs.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="OUTPUT_DIR", help="run, sweep or parent folders")
    parser.add_argument("--out", type=Path, help="where to write results.md/.csv and the plots (default: the first OUTPUT_DIR)")
    args = parser.parse_args(argv)
    folders = find_runs(args.paths)
    if not folders:
        print(f"no finished run (a folder with {METRICS_FILE}) in {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    out = args.out or args.paths[0]
    for path in write_report(folders, out):
        print(f"wrote {path}", file=sys.stderr)
    print((out / RESULTS_MD).read_text(encoding="utf-8"), end="")
    return 0
