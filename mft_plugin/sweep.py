"""Grids of runs from one config: the paper's ablation (Table 3), its tau sweep (Table 8), Figure 2.

A sweep is one validated base config plus a grid ``{dotted key: [values]}``: the config's ``sweep:``
block, and ``--grid KEY=[v1, v2]`` on the command line. Every point of the grid's Cartesian product
is the base config with those keys overridden exactly as ``--set`` would
(:func:`mft_plugin.config.errors.apply_override`), trained in its own folder
``<output_dir>/<key=value,...>``. Every run is validated before the first one trains.

A run is finished when its ``metrics.json`` exists (the recipe writes it last, atomically). Starting
a sweep again skips the finished runs, resumes an interrupted one from its newest complete
checkpoint (as ``resume_from_checkpoint: true`` would) and trains the rest; a finished run whose saved config
differs from the planned one is an error, so results of other settings are never mixed in. A run
reuses the base perplexities a sibling already measured on the same base and evaluation rows: the
siblings' measurements are gathered into its folder, and the run reads the one whose key (a hash of
its rows and base, :func:`mft_plugin.train.outputs.base_key`) matches once it has built its rows.

The runs train one after another in this process (:func:`mft_plugin.train.recipe.run`): each builds its own
``TrainingArguments`` (which resets accelerate's process state), Trainer, model and seed, so the only
thing left over from one run to the next is an open wandb run, which is finished between runs. Staying
in one process saves the imports of every run and lets a registry given to the sweep reach each run.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.config.errors import (
    ConfigError,
    apply_override,
    load_config,
    parse_override,
    read_yaml,
    validate_config,
)
from mft_plugin.files import RunFileError, atomic_write_text, read_run_file
from mft_plugin.train.console import quiet_unused_libraries

# Nothing that imports torch, transformers or peft at module level: they come after quiet_unused_libraries
# (main), which must see the runs' configs before bitsandbytes or DeepSpeed print their import-time lines.

if TYPE_CHECKING:
    from mft_plugin.registry import Registry

logger = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^\w.+=-]")  # kept out of folder names
RESUME = "resume_from_checkpoint"


class SweepError(RuntimeError):
    """A finished run that no longer matches the sweep's config."""


@dataclass(frozen=True)
class SweepRun:
    name: str  # the folder name, made of the grid point's overrides
    config: MFTConfigBase

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def finished(self) -> bool:
        from mft_plugin.train.outputs import METRICS_FILE

        return (self.output_dir / METRICS_FILE).is_file()


@dataclass(frozen=True)
class Sweep:
    folder: Path  # the base config's output_dir: one subfolder per run, the tables and plots
    runs: list[SweepRun]


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first key varying slowest."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def _label(value: Any) -> str:
    """A value as it reads in a folder name: ``mft(tau=0.5)`` for a strategy mapping, ``none`` for []."""
    if isinstance(value, dict):
        params = ",".join(f"{key}={_label(item)}" for key, item in value.items() if key != "name")
        name = _label(value.get("name", ""))
        return f"{name}({params})" if params else name
    if isinstance(value, list):
        return "+".join(_label(item) for item in value) or "none"
    return _UNSAFE.sub("_", str(value))


def run_name(point: Mapping[str, Any]) -> str:
    """``objective=mft,objective.tau=0.25,seed=1``: the folder of one grid point."""
    return ",".join(f"{key}={_label(value)}" for key, value in point.items()) or "base"


def plan_sweep(
    path: str | Path, grid: Sequence[str] = (), overrides: Sequence[str] = (), registry: Registry | None = None
) -> Sweep:
    """The validated runs of a sweep config; :class:`ConfigError` lists every bad run at once.

    ``grid``: ``KEY=[v1, v2]`` strings added to (or replacing a key of) the ``sweep:`` block;
    ``overrides``: ``--set KEY=VALUE`` strings applied to every run.
    """
    base = load_config(path, list(overrides), registry)  # the errors of the base, with their YAML lines
    points = grid_points({**(base.sweep or {}), **_grid_options(grid)})
    if any("output_dir" in point for point in points):
        raise ConfigError([f"{path}: sweep.output_dir: each run's folder is made from the sweep's output_dir"])
    data, _ = read_yaml(path)  # overridden as written, before validation rewrites any key (Axolotl's lora_r)
    for text in overrides:
        apply_override(data, *parse_override(text))
    data.pop("sweep", None)
    runs, problems = [], []
    for point in points:
        name = run_name(point)
        run_data = copy.deepcopy(data)
        for key, value in point.items():
            apply_override(run_data, key.split("."), value)
        run_data["output_dir"] = str(Path(base.output_dir) / name)
        if base.wandb_project:  # one wandb run per grid point, named after it
            run_data["wandb_name"] = f"{base.wandb_name}/{name}" if base.wandb_name else name
        try:
            runs.append(SweepRun(name, validate_config(run_data, registry, f"{path} (sweep run {name})")))
        except ConfigError as error:
            problems.extend(error.problems)
    duplicates = sorted({run.name for run in runs if [r.name for r in runs].count(run.name) > 1})
    problems.extend(f"{path}: sweep: two runs would share the folder {name!r}" for name in duplicates)
    if problems:
        raise ConfigError(problems)
    return Sweep(Path(base.output_dir), runs)


def _grid_options(grid: Sequence[str]) -> dict[str, list[Any]]:
    """``--grid objective.tau=[0, 0.5]`` -> {"objective.tau": [0, 0.5]}."""
    parsed = {}
    for text in grid:
        key_path, values = parse_override(text, "--grid")
        if not (isinstance(values, list) and values):
            raise ConfigError([f"--grid {text!r}: expected KEY=[VALUE, ...], e.g. --grid objective.tau=[0, 0.25, 1]"])
        parsed[".".join(key_path)] = values
    return parsed


def check_finished(sweep: Sweep, registry: Registry | None = None) -> None:
    """Refuse finished runs trained with another config than the one planned for them now.

    The saved ``config.yml`` is validated again, so that a key added to the schema since (with its
    default) is no difference, while a key set otherwise is.
    """
    for run in sweep.runs:
        if not run.finished:
            continue
        saved_file = run.output_dir / "config.yml"
        try:
            saved = validate_config(read_run_file(saved_file, "yaml"), registry, str(saved_file))
        except (ConfigError, RunFileError) as error:
            raise SweepError(f"{run.output_dir}: finished, but {error}\ndelete the folder to train it again") from None
        saved_keys, planned = saved.model_dump(mode="json"), run.config.model_dump(mode="json")
        changed = sorted(key for key in {*saved_keys, *planned} - {RESUME} if saved_keys.get(key) != planned.get(key))
        if changed:
            raise SweepError(
                f"{run.output_dir}: finished with another config ({', '.join(changed)} differ); delete the folder "
                "to train it again, or give the sweep another output_dir"
            )


def _finish_wandb_run() -> None:
    """End the wandb run a run opened, so that the next one is logged as a run of its own."""
    wandb = sys.modules.get("wandb")  # imported only if a run reported to it
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def config_to_train(run: SweepRun) -> MFTConfigBase:
    """The run's config; an interrupted run (it has checkpoints) goes on from its newest complete one."""
    if any(run.output_dir.glob("checkpoint-*")):
        return run.config.model_copy(update={RESUME: True})
    return run.config


def run_sweep(sweep: Sweep, registry: Registry | None = None) -> dict[str, Exception]:
    """Train every unfinished run in order; the runs that failed, by name, with their error.

    A failing run does not stop the others; a signal (``TrainingInterrupted``) or Ctrl-C stops the
    sweep: starting it again resumes where it stopped.
    """
    from mft_plugin.report.results import SWEEP_FILE, load_run
    from mft_plugin.report.summary import run_summary
    from mft_plugin.train import recipe
    from mft_plugin.train.outputs import gather_base_perplexities
    from mft_plugin.train.signals import TrainingInterrupted

    runs = sweep.runs
    check_finished(sweep, registry)
    atomic_write_text(sweep.folder / SWEEP_FILE, json.dumps({"runs": [run.name for run in runs]}, indent=1) + "\n")
    failures: dict[str, Exception] = {}
    for index, run in enumerate(runs, 1):
        if run.finished:
            logger.warning("sweep [%d/%d] %s: finished, skipped", index, len(runs), run.name)
            continue
        logger.warning("sweep [%d/%d] %s: training", index, len(runs), run.name)
        gather_base_perplexities(run.output_dir, [sibling.output_dir for sibling in runs])  # the run picks the one of its rows
        try:
            recipe.run(config_to_train(run), registry)
            print(run_summary(load_run(run.output_dir)))  # the run in words; the table comes at the end
        except TrainingInterrupted:
            raise
        except Exception as error:  # noqa: BLE001 (recorded and reported at the end; the other runs go on)
            logger.error("sweep [%d/%d] %s failed: %s: %s", index, len(runs), run.name, type(error).__name__, error)
            failures[run.name] = error
        finally:
            _finish_wandb_run()
    return failures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mft-run sweep", description="Train a grid of runs, then tabulate and plot them.")
    parser.add_argument("config", help="YAML config with a `sweep:` block (dotted key -> list of values)")
    parser.add_argument(
        "--grid", action="append", default=[], metavar="KEY=[V1, V2]",
        help="sweep a key over values, e.g. --grid objective.tau=[0,0.25,1] (repeatable; added to `sweep:`)",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key in every run, e.g. --set max_steps=20 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--validate", action="store_true", help="only validate every run; list them and their folders")
    return parser


def preflight_runs(sweep: Sweep) -> None:
    """``mft-run``'s checks before any weights load (:mod:`mft_plugin.train.preflight`), for every run to train."""
    from mft_plugin.train.preflight import preflight

    problems = []
    for run in sweep.runs:
        if run.finished:
            continue
        try:
            preflight(config_to_train(run))
        except ConfigError as error:
            problems.extend(f"sweep run {run.name}: {problem}" for problem in error.problems)
    if problems:
        raise ConfigError(problems)


def main(argv: Sequence[str], registry: Registry | None = None) -> int:
    """``mft-run sweep``: 0 when every run finished, 1 when some failed, 2 for a bad config."""
    args = build_parser().parse_args(argv)
    try:
        sweep = plan_sweep(args.config, args.grid, args.overrides, registry)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    quiet_unused_libraries([run.config for run in sweep.runs])  # before anything imports transformers
    from mft_plugin.train.signals import TrainingInterrupted

    try:
        preflight_runs(sweep)
        if args.validate:
            check_finished(sweep, registry)
            for run in sweep.runs:
                print(f"{'finished' if run.finished else 'to train':<9} {run.output_dir}")
            return 0
        failures = run_sweep(sweep, registry)
    except (ConfigError, SweepError) as error:
        print(error, file=sys.stderr)
        return 2
    except TrainingInterrupted as stopped:  # a checkpoint was saved: the same command resumes
        print(stopped, file=sys.stderr)
        return stopped.exit_code
    from mft_plugin.report import tables as report

    reported = report.main([str(sweep.folder)]) if any(run.finished for run in sweep.runs) else 0
    for name, error in failures.items():
        print(f"run {name} failed: {type(error).__name__}: {error}", file=sys.stderr)
    return 1 if failures else reported
