"""Finished runs read back: their settings, final metrics and evaluation curves, grouped by setting.

An OUTPUT_DIR holding ``metrics.json`` is one run; a sweep folder (``sweep.json``) stands for its
finished runs in grid order; any other folder for the run folders directly inside it. Runs whose
resolved configs (``config.yml``) differ only in ``seed`` make one :class:`Row`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mft_plugin.train.outputs import METRICS_FILE, read_metrics

SWEEP_FILE = "sweep.json"  # a sweep's runs in grid order (mft_plugin.sweep), for `mft-run report`
SEED = "seed"
NOT_SETTINGS = {"output_dir", "wandb_name", "resume_from_checkpoint", "overwrite_output_dir", "sweep"}  # same result


@dataclass(frozen=True)
class RunResult:
    folder: Path
    settings: dict[str, Any]  # the resolved config, flattened to dotted keys
    metrics: dict[str, Any]  # metrics.json
    curve: list[dict[str, Any]]  # every logged evaluation, in step order (trainer_state.json)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"objective": {"tau": 0.25}}`` -> ``{"objective.tau": 0.25}``; list items by index."""
    if isinstance(value, dict) and value:
        items: Any = value.items()
    elif isinstance(value, list) and value:
        items = enumerate(value)
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def load_run(folder: Path) -> RunResult:
    metrics = read_metrics(folder)
    config_file, state_file = folder / "config.yml", folder / "trainer_state.json"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    history = json.loads(state_file.read_text(encoding="utf-8"))["log_history"] if state_file.is_file() else []
    return RunResult(folder, flatten(config), metrics, [entry for entry in history if "eval_S" in entry])


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """The finished run folders under ``paths`` (see the module docstring), in order."""
    found: list[Path] = []
    for path in paths:
        if (path / METRICS_FILE).is_file():
            found.append(path)
        elif (path / SWEEP_FILE).is_file():
            names = json.loads((path / SWEEP_FILE).read_text(encoding="utf-8"))["runs"]
            found.extend(path / name for name in names if (path / name / METRICS_FILE).is_file())
        else:
            found.extend(sorted(file.parent for file in path.glob(f"*/{METRICS_FILE}")))
    return found


@dataclass(frozen=True)
class Row:
    """Runs of one setting (the values of the keys that tell rows apart), one per seed."""

    setting: dict[str, Any]
    runs: list[RunResult]

    def values(self, key: str) -> list[float]:
        return [run.metrics[key] for run in self.runs if run.metrics.get(key) is not None]

    @property
    def label(self) -> str:
        """``mft, tau=0.25``: a strategy's name alone, other keys by their last part."""
        parts = [
            str(value) if key.endswith("name") else f"{key.rsplit('.', 1)[-1]}={value}"
            for key, value in self.setting.items()
            if value is not None
        ]
        return ", ".join(parts) or "run"


def _hashable(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def group_runs(results: Sequence[RunResult]) -> tuple[list[str], list[Row]]:
    """The keys that differ between runs (seed aside) and the rows, in the order runs were given."""
    candidates = sorted({key for result in results for key in result.settings} - NOT_SETTINGS - {SEED})
    keys = [key for key in candidates if len({_hashable(r.settings.get(key)) for r in results}) > 1]
    rows: dict[str, Row] = {}
    for result in results:
        setting = {key: result.settings.get(key) for key in keys}
        rows.setdefault(_hashable(setting), Row(setting, [])).runs.append(result)
    return keys, list(rows.values())


def mean_and_spread(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value, or any infinite DG/S)."""
    mean = statistics.fmean(values)
    finite = all(math.isfinite(value) for value in values)
    return mean, statistics.stdev(values) if len(values) > 1 and finite else None
