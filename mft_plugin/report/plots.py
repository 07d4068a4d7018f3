"""The paper's figures from finished runs, as PNG beside the tables (matplotlib: the ``plots`` extra).

- ``dg_vs_s.png``: DG against S, one point per run (Figure 2, left);
- ``dg_over_s.png``: DG/S against the swept parameter, or per setting when none is numeric (Figure 2, right);
- ``curves.png``: S and DG over training steps, one line per run (Figure 3).

Drawn on ``matplotlib.figure.Figure`` objects, never through ``pyplot``: no GUI backend, no global state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from mft_plugin.report.results import Row

logger = logging.getLogger(__name__)
DG_VS_S, DG_OVER_S, CURVES = "dg_vs_s.png", "dg_over_s.png", "curves.png"


def plot_report(out: Path, rows: Sequence[Row], keys: Sequence[str]) -> list[Path]:
    """Draw the three figures into ``out``; none (with a warning) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'mft-plugin[plots]'): tables only, no plots")
        return []
    return [_dg_vs_s(out / DG_VS_S, rows), _dg_over_s(out / DG_OVER_S, rows, keys), _curves(out / CURVES, rows)]


def _figure(columns: int = 1) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5 * columns, 4.2))
    return figure, [figure.add_subplot(1, columns, i + 1) for i in range(columns)]


def _save(figure: Figure, axes: Sequence[Axes], path: Path) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def _dg_vs_s(path: Path, rows: Sequence[Row]) -> Path:
    figure, (ax,) = _figure()
    for row in rows:
        points = [(run.metrics["eval_S"], run.metrics["eval_DG"]) for run in row.runs if "eval_DG" in run.metrics]
        ax.scatter([100 * s for s, _ in points], [100 * dg for _, dg in points], label=row.label)
    ax.set(xlabel="specialization S (%)", ylabel="degeneralization DG (%)", title="DG against S (cf. paper Fig. 2, left)")
    return _save(figure, [ax], path)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _numeric_key(rows: Sequence[Row], keys: Sequence[str]) -> str | None:
    """The first differing key whose values are all numbers: the swept parameter."""
    return next((key for key in keys if all(_is_number(row.setting[key]) for row in rows)), None)


def _dg_over_s(path: Path, rows: Sequence[Row], keys: Sequence[str]) -> Path:
    from mft_plugin.report.results import mean_and_spread

    figure, (ax,) = _figure()
    swept = _numeric_key(rows, keys)
    series: dict[str, list[tuple[Any, Row]]] = {}
    for position, row in enumerate(rows):
        other = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in row.setting.items() if k != swept and v is not None)
        series.setdefault(other if swept else "", []).append((row.setting[swept] if swept else position, row))
    for label, points in series.items():
        points.sort(key=lambda point: point[0])
        points = [(x, row) for x, row in points if row.values("eval_DG/S")]  # none without a general set
        stats = [mean_and_spread(row.values("eval_DG/S")) for _, row in points]
        ax.errorbar([x for x, _ in points], [mean for mean, _ in stats], yerr=[spread or 0.0 for _, spread in stats],
                    marker="o", capsize=3, label=label or None, linestyle="-" if swept else "none")  # fmt: skip
    if swept:
        ax.set_xlabel(swept)
    else:
        ax.set_xticks(range(len(rows)), [row.label for row in rows], rotation=20, ha="right")
    ax.set(ylabel="DG/S", title="DG/S (cf. paper Fig. 2, right)")
    return _save(figure, [ax], path)


def _curves(path: Path, rows: Sequence[Row]) -> Path:
    figure, axes = _figure(columns=2)
    for index, row in enumerate(rows):
        for seed_index, run in enumerate(row.runs):
            steps = [entry["step"] for entry in run.curve]
            style = {"marker": ".", "color": f"C{index % 10}", "linestyle": ("-", "--", ":", "-.")[seed_index % 4]}
            label = row.label + (f", seed={run.settings.get('seed')}" if len(row.runs) > 1 else "")
            for ax, key in zip(axes, ("eval_S", "eval_DG")):
                values = [100 * entry.get(key, float("nan")) for entry in run.curve]
                ax.plot(steps, values, **style, label=label if key == "eval_S" else None)
    axes[0].set(xlabel="step", ylabel="specialization S (%)", title="S during training (cf. paper Fig. 3)")
    axes[1].set(xlabel="step", ylabel="degeneralization DG (%)", title="DG during training")
    return _save(figure, axes, path)
