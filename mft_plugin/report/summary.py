"""The few lines in words that end every run: what was trained, which checkpoint was kept and why,
S / DG / DG/S with the perplexities they come from (paper Sec. 3.1), and where everything is.

Read back from the finished run folder (``config.yml``, ``metrics.json``, ``trainer_state.json``), so
that ``mft-run`` and ``mft-run sweep`` print exactly what was saved; ``metrics.json`` keeps the
machine-readable form (README "Metrics during training" explains each key).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mft_plugin.report.results import RunResult, method_parts
from mft_plugin.train.outputs import METRICS_FILE


def _checkpoint_line(run: RunResult) -> str:
    """Which weights are the final model, and why (paper Sec. 3.1: least specialized perplexity,
    within the degeneralization budget)."""
    metrics, evaluations = run.metrics, len(run.curve)
    budget = run.settings.get("max_degeneralization")
    within = f" within the DG budget ({100 * budget:g} %)" if budget is not None else ""
    stopped = f"; training stopped early ({metrics['stopped_by']})" if "stopped_by" in metrics else ""
    if "step" in metrics:
        return (
            f"Final model: the checkpoint of step {metrics['step']}, the least specialized validation perplexity "
            f"among {evaluations} evaluation{'s' if evaluations != 1 else ''}{within}{stopped}."
        )
    if "eval_S" in metrics or "eval_DG" in metrics:
        return f"Final model: the last step's, as no evaluation was{within or ' kept'}{stopped}."
    return "Final model: the last step's (no specialized validation set: nothing to choose by)."


def _perplexities(metrics: dict[str, float], name: str) -> str:
    base, final = metrics.get(f"base_{name}_ppl"), metrics.get(f"eval_{name}_ppl")
    return f"{name} perplexity {base:.2f} (base) -> {final:.2f}" if base is not None and final is not None else ""


def _metric_lines(metrics: dict[str, float]) -> list[str]:
    """S, DG, DG/S with the perplexities they come from (paper Sec. 3.1)."""
    lines = []
    if "eval_S" in metrics:
        lines.append(f"  S    = {100 * metrics['eval_S']:5.1f} %   specialization: {_perplexities(metrics, 'spec')}")
    if "eval_DG" in metrics:
        lines.append(f"  DG   = {100 * metrics['eval_DG']:5.1f} %   degeneralization: {_perplexities(metrics, 'general')}")
    if "eval_DG/S" in metrics:
        lines.append(f"  DG/S = {metrics['eval_DG/S']:5.3f}     degeneralization per unit of specialization (lower is better)")
    return lines


def run_summary(run: RunResult, plots: Sequence[Path] = ()) -> str:
    """The run in a few lines: objective and mitigations, the checkpoint kept and why, S / DG / DG/S
    with their perplexities, and where the model, the metrics and the ``plots`` are."""
    *mitigations, objective = method_parts([run.settings])[0]
    lines = [
        f"Trained: objective {objective}; mitigations: {', '.join(mitigations) or 'none'}.",
        _checkpoint_line(run),
        *_metric_lines(run.metrics),
        f"Model: {run.folder}/   metrics: {run.folder / METRICS_FILE}   every evaluation: {run.folder / 'trainer_state.json'}",
    ]
    if plots:
        lines.append(f"Plots: {', '.join(str(path) for path in plots)}")
    return "\n".join(lines)
