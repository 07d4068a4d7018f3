"""``mft-run``: train from a YAML, validate it, or list the registered strategies.

    mft-run config.yml [--set objective.tau=0.5 ...]   train
    mft-run config.yml --validate                      validate and print the resolved config
    mft-run config.yml --num-processes 2               train on 2 processes (accelerate launch)
    mft-run --list                                     every strategy, its plugin and parameters
    mft-run sweep config.yml [--grid KEY=[V1,V2] ...]  train a grid of runs, then tabulate them (mft_plugin.sweep)
    mft-run report OUTPUT_DIR...                       tables and plots from finished runs (mft_plugin.report)
    mft-run axolotl CONFIG.yml [ARGS...]               `axolotl train` that fails unless the MFT plugin loads (mft_plugin.axolotl.command)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from mft_plugin.config.schema import MFTConfigBase
    from mft_plugin.registry import Registry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mft-run", description="Minifinetuning on the Hugging Face stack.")
    parser.add_argument("config", nargs="?", help="YAML config (Axolotl-style keys + objective/mitigations)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set objective.tau=0.5 --set seed=2 (repeatable)",
    )
    parser.add_argument("--validate", action="store_true", help="only validate; print the resolved config")
    parser.add_argument(
        "--num-processes", type=int, default=1, metavar="N",
        help="train on N local processes (GPUs, or CPU processes without one) through `accelerate launch`",
    )
    parser.add_argument("--list", action="store_true", help="list registered strategies and plugin problems")
    return parser


def print_listing(registry: Registry) -> None:
    from mft_plugin.registry import strategy_listing

    for row in strategy_listing(registry):
        params = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in row["params"].items()) or "-"
        print(f"{row['kind']:<11} {row['name']:<20} {row['distribution']:<24} {params}")
    for (kind, name), distributions in sorted(registry.conflicts.items()):
        print(f"CONFLICT    {kind} {name!r} is claimed by {' and '.join(distributions)}: unusable until one is removed")
    for problem in registry.problems:
        print(f"BROKEN      plugin {problem.distribution}: {problem.message}")


def print_run_summary(output_dir: Path) -> None:
    """A finished run in words (metrics.json keeps the numbers), with its table and plots beside it."""
    from mft_plugin.report.results import load_run
    from mft_plugin.report.summary import run_summary
    from mft_plugin.report.tables import RESULTS_CSV, RESULTS_MD, write_report

    written = write_report([output_dir], output_dir)
    plots = [path for path in written if path.name not in (RESULTS_MD, RESULTS_CSV)]
    print(run_summary(load_run(output_dir), plots))


def main(argv: Sequence[str] | None = None, registry: Registry | None = None) -> int:
    """The console script; ``registry`` (default: the installed plugins) is for embedding and tests."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        from mft_plugin import sweep

        return sweep.main(argv[1:], registry)
    if argv[:1] == ["report"]:
        from mft_plugin.report import tables as report

        return report.main(argv[1:])
    if argv[:1] == ["axolotl"]:
        from mft_plugin.axolotl import command

        return command.main(argv[1:])
    args = build_parser().parse_args(argv)
    from mft_plugin.config.errors import ConfigError, load_config
    from mft_plugin.registry import default_registry

    registry = registry or default_registry()
    if args.list:
        print_listing(registry)
        return 0
    if not args.config:
        build_parser().error("a config file is required (or --list)")
    if args.num_processes < 1:
        build_parser().error(f"--num-processes: must be at least 1 (got {args.num_processes})")
    try:
        config = load_config(args.config, args.overrides, registry)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    from mft_plugin.train.console import quiet_unused_libraries

    quiet_unused_libraries([config])  # before preflight imports transformers (and, through it, them)
    try:
        from mft_plugin.train.preflight import preflight

        preflight(config, args.config, args.overrides)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    if args.validate:
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    if config.sweep:
        print(f"{args.config}: sweep: a grid of runs; train it with `mft-run sweep {args.config}`", file=sys.stderr)
        return 2
    from mft_plugin.train.launch import launch

    if args.num_processes > 1:
        return launch(args.config, args.overrides, args.num_processes)
    return train(config, registry)


def train(config: MFTConfigBase, registry: Registry) -> int:
    """Run the recipe; every failure the user can act on becomes one message and an exit code.

    2: refused before training (the folder is taken, a resume does not match its checkpoint, the
    data contradicts the config, the model would let packed records attend to each other); 1: failed (non-finite loss or weights, unloadable model files, a
    full disk); 128 + N: stopped by signal N after saving a checkpoint.
    """
    from mft_plugin.config.errors import ConfigError
    from mft_plugin.models.attention import PackingLeakError
    from mft_plugin.models.loading import ModelLoadError
    from mft_plugin.models.heads import UnfusableError
    from mft_plugin.train.checkpoints import CheckpointError
    from mft_plugin.data.documents import DataError
    from mft_plugin.train.launch import is_main_process
    from mft_plugin.files import RunFileError
    from mft_plugin.train.outputs import OutputDirError, describe_write_failure
    from mft_plugin.train.recipe import run
    from mft_plugin.train.safety import NonFiniteError
    from mft_plugin.train.signals import TrainingInterrupted

    try:  # the summary is read while the run still holds its folder: another run cannot clear it in between
        run(config, registry, then=print_run_summary if is_main_process() else None)
    except TrainingInterrupted as stopped:  # SIGINT/SIGTERM: a checkpoint was saved
        print(stopped, file=sys.stderr)
        return stopped.exit_code
    except (ConfigError, OutputDirError, CheckpointError, PackingLeakError, RunFileError) as error:
        print(error, file=sys.stderr)
        return 2
    except UnfusableError as error:  # loss_impl: chunked or teacher_cache on a model the probe forward refused
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DataError as error:  # bad data, named by file and record, found before any model is loaded
        print(f"bad data: {error}", file=sys.stderr)
        return 2
    except (NonFiniteError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as error:
        message = describe_write_failure(error, config.output_dir)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # how `accelerate launch`/torchrun start each process of a run
    from mft_plugin.train.launch import leave_process_group

    exit_code = main()
    leave_process_group()
    sys.exit(exit_code)
