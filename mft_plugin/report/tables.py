"""Tables and plots from finished runs: S, DG and DG/S as the paper reports them (Sec. 3.1).

    mft-run report OUTPUT_DIR... [--out DIR]
    mft-run report results.csv [--out DIR]      results.md again, from the table's data

An OUTPUT_DIR holding ``metrics.json`` is one run; a sweep folder (``sweep.json``) stands for its
finished runs in grid order; any other folder for the run folders directly inside it.

Runs whose resolved configs (``config.yml``) differ only in ``seed`` make one row, with the mean and
the sample standard deviation over seeds of each metric (DG/S averaged run by run). ``results.md``
names each row by its method, as the paper's tables do (``lora + mft (tau 0.25)``), plus any other
key that tells rows apart; ``results.csv`` keeps every key that differs. Each run contributes the
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

from mft_plugin.files import RunFileError, atomic_write_text
from mft_plugin.report.results import (
    SEED,
    Row,
    find_runs,
    group_runs,
    load_run,
    mean_and_spread,
    method_labels,
    shown_keys,
)
from mft_plugin.train.outputs import METRICS_FILE

RESULTS_MD, RESULTS_CSV = "results.md", "results.csv"
# (column, metrics.json key, results.csv column, scale, decimals): the paper's format
METRICS = (
    ("S ↑ (%)", "eval_S", "S_pct", 100.0, 1),
    ("DG ↓ (%)", "eval_DG", "DG_pct", 100.0, 1),
    ("DG/S ↓", "eval_DG/S", "DG/S", 1.0, 2),
)
# (column, base perplexity in metrics.json, final perplexity in metrics.json): results.csv uses the keys
PERPLEXITIES = (
    ("spec ppl (base → final)", "base_spec_ppl", "eval_spec_ppl"),
    ("general ppl (base → final)", "base_general_ppl", "eval_general_ppl"),
)
METHOD, RUNS = "method", "runs"


def _number(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def _stat_cell(record: dict[str, str], column: str, decimals: int) -> str:
    mean, spread = _number(record.get(column, "")), _number(record.get(f"{column}_std", ""))
    if mean is None:
        return "–"
    return f"{mean:.{decimals}f}" + (f" ± {spread:.{decimals}f}" if spread is not None else "")


def _ppl_cell(record: dict[str, str], base: str, final: str) -> str:
    return " → ".join(f"{value:.2f}" if (value := _number(record.get(key, ""))) is not None else "–" for key in (base, final))


def markdown_table(records: Sequence[dict[str, str]]) -> str:
    """``results.md`` from the records of ``results.csv``: each row named by its method
    (:func:`method_labels`) and only the other keys that tell rows apart (:func:`shown_keys`).

    A ``results.csv`` written before it had a ``method`` column is named from its keys.
    """
    columns = list(records[0])
    keys = [column for column in columns[: columns.index(RUNS)] if column != METHOD]
    methods = [record[METHOD] for record in records] if METHOD in columns else method_labels(records)
    shown = shown_keys(keys, records)
    header = [METHOD, *shown, RUNS, *(name for name, *_ in METRICS), *(name for name, *_ in PERPLEXITIES)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method, record in zip(methods, records):
        cells = [method, *(record[key] or "–" for key in shown), record[RUNS]]
        cells += [_stat_cell(record, column, decimals) for _, _, column, _, decimals in METRICS]
        cells += [_ppl_cell(record, base, final) for _, base, final in PERPLEXITIES]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = max(int(record[RUNS]) for record in records)
    note = (
        "S and DG in percent, DG/S as a fraction (paper Sec. 3.1), at each run's final checkpoint (least "
        "specialized validation perplexity, within any degeneralization budget)"
        + ("; mean ± sample standard deviation over seeds." if seeds > 1 else ".")
        + " Every config key that differs between rows is in results.csv."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


def csv_table(keys: Sequence[str], rows: Sequence[Row]) -> str:
    """One row per setting: its method and every key that differs between rows; S and DG in percent,
    DG/S as a fraction, with the spread over seeds; the base and final perplexities (means)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    metric_columns = [f"{column}{suffix}" for _, _, column, _, _ in METRICS for suffix in ("", "_std")]
    perplexity_keys = [key for _, base, final in PERPLEXITIES for key in (base, final)]
    writer.writerow([METHOD, *keys, RUNS, "seeds", *metric_columns, *perplexity_keys, "folders"])
    for row in rows:
        stats = []
        for _, key, _, scale, _ in METRICS:
            values = [value * scale for value in row.values(key)]
            stats += list(mean_and_spread(values)) if values else [None, None]
        perplexities = [statistics.fmean(row.values(key)) if row.values(key) else None for key in perplexity_keys]
        seeds = ";".join(str(run.settings.get(SEED)) for run in row.runs)
        folders = ";".join(run.folder.name for run in row.runs)
        writer.writerow([row.method, *row.setting.values(), len(row.runs), seeds, *stats, *perplexities, folders])
    return buffer.getvalue()  # None as ''


def csv_records(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def write_report(run_folders: Sequence[Path], out: Path) -> list[Path]:
    """``results.md``, ``results.csv`` and the plots (with matplotlib) in ``out``; the paths written."""
    from mft_plugin.report.plots import plot_report

    keys, rows = group_runs([load_run(folder) for folder in run_folders])
    table = csv_table(keys, rows)
    atomic_write_text(out / RESULTS_CSV, table)
    atomic_write_text(out / RESULTS_MD, markdown_table(csv_records(table)))
    return [out / RESULTS_MD, out / RESULTS_CSV, *plot_report(out, rows, keys)]


def main(argv: Sequence[str]) -> int:
    """``mft-run report``: rebuild the tables and plots from finished runs; print ``results.md``.

    Given a ``results.csv`` instead, only ``results.md`` is rendered again from it (the plots need
    the runs' curves), e.g. for a table written by an older version.
    """
    parser = argparse.ArgumentParser(prog="mft-run report", description="Tables and plots from finished runs.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="OUTPUT_DIR", help="run, sweep or parent folders, or one results.csv")
    parser.add_argument("--out", type=Path, help="where to write results.md/.csv and the plots (default: the first OUTPUT_DIR)")
    args = parser.parse_args(argv)
    if args.paths[0].suffix == ".csv" and args.paths[0].is_file():
        out = args.out or args.paths[0].parent
        atomic_write_text(out / RESULTS_MD, markdown_table(csv_records(args.paths[0].read_text(encoding="utf-8"))))
        written = [out / RESULTS_MD]
    else:
        try:
            folders = find_runs(args.paths)
            if not folders:
                print(f"no finished run (a folder with {METRICS_FILE}) in {', '.join(map(str, args.paths))}", file=sys.stderr)
                return 2
            out = args.out or args.paths[0]
            written = write_report(folders, out)  # reads every run before it writes anything
        except RunFileError as error:
            print(f"error: {error}; restore or remove that run's folder, then report again", file=sys.stderr)
            return 2
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    print((out / RESULTS_MD).read_text(encoding="utf-8"), end="")
    return 0
