"""Which checkpoint each run kept, and which differences between settings exceed the seed spread.

    python bench/miniature/epochs8/summary.py OUTPUT_DIR... [--title TITLE]

For the miniature in the paper's regime (issue 18, ``bash bench/reproduce.sh epochs8``), where runs
last ~8 epochs so that the paper's best-checkpoint rule (least specialized validation perplexity,
Sec. 3.1) has something to choose. ``mft-run report`` gives each setting's mean ± std; this adds
what it does not show, as markdown on stdout:

- per run, the step kept among its evaluations, with S and DG there and at the last evaluation:
  S falling after the kept step is the overfitting of Fig. 3;
- for each pair of consecutive settings (in the order the runs are given: Table 3's rows, or tau
  ascending) and for the first against the last, the difference of the means of S, DG and DG/S and
  whether it exceeds the seed spread, i.e. whether the mean ± std intervals are disjoint:
  |mean_a - mean_b| > std_a + std_b.

OUTPUT_DIR is read as ``mft-run report`` reads it (runs, sweeps, or folders of runs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mft_plugin.report.results import Row, RunResult, find_runs, group_runs, load_run, mean_and_spread
from mft_plugin.report.tables import METRICS


def exceeds_spread(a: Sequence[float], b: Sequence[float]) -> bool | None:
    """Whether the mean ± sample std intervals of ``a`` and ``b`` are disjoint; None without a spread."""
    (mean_a, std_a), (mean_b, std_b) = mean_and_spread(a), mean_and_spread(b)
    if std_a is None or std_b is None:
        return None
    return abs(mean_a - mean_b) > std_a + std_b


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def selection_table(rows: Sequence[Row]) -> str:
    """One line per run: the step kept, out of how many evaluations, and S and DG there and at the end."""
    lines = [
        "| setting | seed | kept step | evaluations | S kept (%) | S last (%) | DG kept (%) | DG last (%) |",
        "|" + " --- |" * 8,
    ]
    for row in rows:
        for run in row.runs:
            lines.append("| " + " | ".join([row.label, str(run.settings.get("seed")), *_selection_cells(run)]) + " |")
    return "\n".join(lines) + "\n"


def _selection_cells(run: RunResult) -> list[str]:
    last = run.curve[-1]
    steps = [entry["step"] for entry in run.curve]
    return [
        str(run.metrics["step"]),
        f"{len(steps)} ({steps[0]}-{steps[-1]})",
        _percent(run.metrics["eval_S"]),
        _percent(last["eval_S"]),
        _percent(run.metrics["eval_DG"]),
        _percent(last["eval_DG"]),
    ]


def comparison_table(rows: Sequence[Row]) -> str:
    """Differences of the means (second minus first) for consecutive settings and first against last."""
    pairs = list(zip(rows, rows[1:]))
    if len(rows) > 2:
        pairs.append((rows[0], rows[-1]))
    header = ["from", "to", *(f"Δ {name}" for name, *_ in METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for first, second in pairs:
        cells = [first.label, second.label]
        for _, key, _, scale, decimals in METRICS:
            a, b = first.values(key), second.values(key)
            difference = mean_and_spread(b)[0] - mean_and_spread(a)[0]
            verdict = {True: "exceeds spread", False: "within spread", None: "no spread"}[exceeds_spread(a, b)]
            cells.append(f"{scale * difference:+.{decimals}f} ({verdict})")
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\nΔ: mean of the second setting minus mean of the first (S and DG in percentage points). "
        "*Exceeds spread*: the mean ± sample std intervals over seeds are disjoint.\n"
    )
    return "\n".join(lines) + "\n" + note


def summary(paths: Sequence[Path], title: str) -> str:
    """The markdown section for the runs under ``paths``, settings in the order the runs come."""
    folders = find_runs(paths)
    if not folders:
        raise SystemExit(f"no finished run (a folder with metrics.json) in {', '.join(map(str, paths))}")
    _, rows = group_runs([load_run(folder) for folder in folders])
    text = f"## {title}\n\n### The checkpoint each run kept\n\n{selection_table(rows)}"
    return text + (f"\n### Differences against the seed spread\n\n{comparison_table(rows)}" if len(rows) > 1 else "")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="OUTPUT_DIR")
    parser.add_argument("--title", default="Runs", help="the section's heading")
    args = parser.parse_args(argv)
    print(summary(args.paths, args.title), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
