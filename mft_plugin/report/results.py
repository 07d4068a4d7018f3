"""Finished runs read back: their settings, final metrics and evaluation curves, grouped by setting.

An OUTPUT_DIR holding ``metrics.json`` is one run; a sweep folder (``sweep.json``) stands for its
finished runs in grid order; any other folder for the run folders directly inside it. Runs whose
resolved configs (``config.yml``) differ only in ``seed`` make one :class:`Row`.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mft_plugin.files import RunFileError, read_run_file
from mft_plugin.train.outputs import METRICS_FILE, read_metrics

SWEEP_FILE = "sweep.json"  # a sweep's runs in grid order (mft_plugin.sweep), for `mft-run report`
SEED = "seed"
OBJECTIVE, MITIGATIONS = "objective", "mitigations"
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
    config = read_run_file(config_file, "yaml") if config_file.is_file() else {}
    history = read_run_file(state_file).get("log_history", []) if state_file.is_file() else []
    if not (isinstance(history, list) and all(isinstance(entry, dict) for entry in history)):
        raise RunFileError(f"{state_file} is damaged (its log_history is not a list of logged entries)")
    return RunResult(folder, flatten(config), metrics, [entry for entry in history if "eval_S" in entry])


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """The finished run folders under ``paths`` (see the module docstring), in order."""
    found: list[Path] = []
    for path in paths:
        if (path / METRICS_FILE).is_file():
            found.append(path)
        elif (path / SWEEP_FILE).is_file():
            names = read_run_file(path / SWEEP_FILE).get("runs")
            if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
                raise RunFileError(f"{path / SWEEP_FILE} is damaged (no list of run names under 'runs')")
            found.extend(path / name for name in names if (path / name / METRICS_FILE).is_file())
        else:
            found.extend(sorted(file.parent for file in path.glob(f"*/{METRICS_FILE}")))
    return found


@dataclass(frozen=True)
class Row:
    """Runs of one setting (the values of the keys that tell rows apart), one per seed."""

    setting: dict[str, Any]
    runs: list[RunResult]
    method: str = ""  # ``lora + mft (tau 0.25)``: see :func:`method_labels`
    label: str = ""  # the method, then any other key that tells this row apart (plots' legends)

    def values(self, key: str) -> list[float]:
        return [run.metrics[key] for run in self.runs if run.metrics.get(key) is not None]


def _given(value: Any) -> bool:
    return value is not None and value != ""  # results.csv writes None as ''


def _strategy(name: Any, params: dict[str, Any]) -> str:
    shown = ", ".join(f"{key} {value}" for key, value in params.items() if _given(value))
    return f"{name} ({shown})" if shown else str(name)


def is_method_key(key: str) -> bool:
    """The keys :func:`method_labels` names: the objective's and the mitigations'."""
    return key.split(".", 1)[0] in (OBJECTIVE, MITIGATIONS)


def _params(run: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """A strategy's parameters: the keys under ``prefix`` (``objective.``) but its name."""
    return {key[len(prefix) :]: value for key, value in run.items() if key.startswith(prefix) and key != f"{prefix}name"}


def method_parts(settings: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Each run's mitigations in their order, then its objective, as the paper's tables name them.

    ``settings``: flat dotted keys (:func:`flatten`), one mapping per run. The objective comes with
    its parameters (``mft (tau 0.25)``); a mitigation with only the parameters that differ between
    runs of that mitigation (``replay (ratio 0.25)`` in a ratio sweep), so that lora's defaults do
    not crowd every label.
    """
    parts = []
    for run in settings:
        labels = []
        for index in itertools.takewhile(lambda i: _given(run.get(f"{MITIGATIONS}.{i}.name")), itertools.count()):
            prefix = f"{MITIGATIONS}.{index}."
            name = run[f"{prefix}name"]
            peers = [_params(other, prefix) for other in settings if other.get(f"{prefix}name") == name]
            varying = {k: v for k, v in _params(run, prefix).items() if len({_hashable(p.get(k)) for p in peers}) > 1}
            labels.append(_strategy(name, varying))
        parts.append([*labels, _strategy(run.get(f"{OBJECTIVE}.name", "?"), _params(run, f"{OBJECTIVE}."))])
    return parts


def method_labels(settings: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each run's method: ``lora + mft (tau 0.25)`` (:func:`method_parts` joined)."""
    return [" + ".join(parts) for parts in method_parts(settings)]


def shown_keys(keys: Sequence[str], settings: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys besides the method that tell rows apart, one of each group that varies together
    (``datasets.0.path`` stands for ``test_datasets.0.path`` when they change in step)."""
    shown, partitions = [], set()
    for key in keys:
        values = [_hashable(run.get(key) if _given(run.get(key)) else None) for run in settings]
        partition = tuple(values.index(value) for value in values)
        if is_method_key(key) or len(set(values)) < 2 or partition in partitions:
            continue
        shown.append(key)
        partitions.add(partition)
    return shown


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
    grouped = list(rows.values())
    methods = method_labels([row.runs[0].settings for row in grouped])
    others = shown_keys(keys, [row.setting for row in grouped])
    return keys, [
        replace(row, method=method, label=", ".join([method, *(f"{key}={row.setting[key]}" for key in others)]))
        for row, method in zip(grouped, methods)
    ]


def mean_and_spread(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value, or any infinite DG/S)."""
    mean = statistics.fmean(values)
    finite = all(math.isfinite(value) for value in values)
    return mean, statistics.stdev(values) if len(values) > 1 and finite else None
