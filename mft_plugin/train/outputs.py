"""The output folder: refusing to clobber another run, the base-perplexity cache, the best eval, metrics.json."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from datasets import Dataset

import filelock

from mft_plugin.config.schema import MFTConfigBase
from mft_plugin.digest import cache_key
from mft_plugin.eval.metrics import SPEC
from mft_plugin.files import RunFileError, atomic_write_text, read_run_file
from mft_plugin.train.checkpoints import RUN_CONFIG, check_resume_config, config_differences, record_run_config, resume_checkpoint
from mft_plugin.train.launch import is_main_process
from mft_plugin.train.safety import SKIPPED_KEY, skipped_steps

if TYPE_CHECKING:
    from mft_plugin.train.trainer import MFTTrainer

logger = logging.getLogger(__name__)
BASE_PPL_FILE = "base_perplexity.json"
METRICS_FILE = "metrics.json"  # written last and atomically: a run with it is finished
DG_OVER_S = "eval_DG/S"
LOCK_FILE, HOLDER_FILE = ".mft-run.lock", ".mft-run.holder.json"  # a run holds output_dir while it runs
# What a run leaves in output_dir, removed by overwrite_output_dir (metrics first: the folder never
# looks finished while half cleared). Caches keyed by content (base_perplexity.json) stay.
RESULTS = (
    METRICS_FILE, "config.yml", RUN_CONFIG, "trainer_state.json", "training_args.bin", "merged", "checkpoint-*",
    "incomplete-*", "config.json", "generation_config.json", "model*.safetensors*", "pytorch_model*.bin*",
    "adapter_config.json", "adapter_model.*",
)  # fmt: skip
CONFIG_FILE = "config.yml"  # the resolved config, beside metrics.json
SPEC_METRIC = f"eval_{SPEC}_ppl"  # the best checkpoint has the least specialized perplexity (paper Sec. 3.1)


class OutputDirError(RuntimeError):
    pass


def prepare_output_dir(config: MFTConfigBase, create: bool = True) -> Path:
    """Create ``output_dir``; refuse one holding checkpoints unless resuming or overwriting.

    ``overwrite_output_dir`` (without resuming) removes the old run's results first, so that a new
    run killed early never leaves a folder that looks finished with the old run's metrics.
    """
    output_dir = Path(config.output_dir)
    _check_writable(output_dir)
    has_checkpoints = any(output_dir.glob("checkpoint-*"))
    if has_checkpoints and not (config.resume_from_checkpoint or config.overwrite_output_dir):
        raise OutputDirError(
            f"output_dir: {output_dir} already holds checkpoints of another run; set "
            "resume_from_checkpoint: true to continue it, overwrite_output_dir: true to start over, "
            "or choose another output_dir"
        )
    resuming = resume_checkpoint(config.resume_from_checkpoint, output_dir) is not None  # checked against its own config
    if not (config.overwrite_output_dir or resuming) and (problem := _other_config_problem(config, output_dir)):
        raise OutputDirError(problem)
    if not create:
        return output_dir
    starting_over = config.overwrite_output_dir and not config.resume_from_checkpoint
    if starting_over and is_main_process():  # one rank deletes: several at once trip over each other
        clear_results(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def _other_config_problem(config: MFTConfigBase, output_dir: Path) -> str | None:
    """Why ``output_dir`` holds another config's run (started, killed or finished), or None.

    A run records its config (``mft_run_config.json``) before anything else; one with other settings
    in the same folder would replace that run's model and metrics, or clear them while it reads them.
    The same config (a rerun, a resume) may go on.
    """
    try:
        recorded = read_run_file(output_dir / RUN_CONFIG) if (output_dir / RUN_CONFIG).is_file() else None
    except RunFileError as error:
        return f"output_dir: {output_dir} holds a run whose config record is unusable ({error})" + _ELSEWHERE
    differences = config_differences(recorded, config.model_dump(mode="json")) if recorded is not None else []
    if not differences:
        return None
    shown = ", ".join(differences[:6]) + (f" and {len(differences) - 6} more" if len(differences) > 6 else "")
    return f"output_dir: {output_dir} holds a run of another config ({shown} differ)" + _ELSEWHERE


_ELSEWHERE = "; choose another output_dir, or set overwrite_output_dir: true to replace that run"


@contextlib.contextmanager
def exclusive_output_dir(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``output_dir`` for the life of a run (main process only).

    Two runs writing one folder would leave one run's model beside the other's metrics. The lock
    is ``filelock``'s ``flock``: the system releases it when its process dies, so a killed run's
    lock never blocks the next one. The holder's pid, host and start time are written beside it
    for the message of a run that finds the folder taken.
    """
    if not is_main_process():  # rank 0 holds it for the launched run
        yield
        return
    _check_writable(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(output_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise OutputDirError(
            f"output_dir: {output_dir} is in use by another run ({_holder(output_dir)}); wait for it to "
            "finish, or choose another output_dir"
        ) from None
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        atomic_write_text(output_dir / HOLDER_FILE, json.dumps(holder))
        yield
    finally:
        lock.release()


def _holder(output_dir: Path) -> str:
    try:
        holder = json.loads((output_dir / HOLDER_FILE).read_text(encoding="utf-8"))
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written it yet
        return "holder not yet recorded"


def begin_run(config: MFTConfigBase, output_dir: Path) -> dict[str, Any] | None:
    """Check a resume against the config its checkpoint was made with, and record this run's config.

    Returns the metrics of a run that had finished already (resuming it has nothing to do, and its
    correct ``metrics.json`` is kept), else None: train.
    """
    resolved = config.model_dump(mode="json")
    checkpoint = resume_checkpoint(config.resume_from_checkpoint, output_dir)
    if checkpoint is not None:
        check_resume_config(checkpoint, resolved)
    if config.resume_from_checkpoint and (output_dir / METRICS_FILE).is_file():
        logger.warning("%s finished already (%s is written); nothing to resume", output_dir, METRICS_FILE)
        return read_metrics(output_dir)
    if is_main_process():
        record_run_config(output_dir, resolved)
    return None


def describe_write_failure(error: BaseException, output_dir: str | Path) -> str | None:
    """A message for a failed write of the run's files (a full disk above all), or None if it is not one.

    torch reports a full disk during ``torch.save`` as ``[enforce fail at inline_container.cc] ...
    file write failed``; safetensors and plain writes as ``OSError(ENOSPC)``.
    """
    text = " ".join(str(error).split())
    no_space = isinstance(error, OSError) and error.errno == errno.ENOSPC
    torch_write = isinstance(error, RuntimeError) and any(m in text for m in ("inline_container", "file write failed"))
    if not (no_space or torch_write):
        return None
    free = f"{shutil.disk_usage(_nearest_existing(Path(output_dir))).free / 2**20:.0f} MiB free there now"
    what = getattr(error, "filename", None) or f"under {Path(output_dir)}"
    cause = "no space left on device" if no_space else f"disk full? {text[:200]}"
    return (
        f"could not write {what} ({cause}; {free}). Free some space, then rerun with "
        "resume_from_checkpoint: true: the last complete checkpoint is kept"
    )


def clear_results(output_dir: Path) -> None:
    """Remove what an earlier run wrote in ``output_dir`` (:data:`RESULTS`), ``metrics.json`` first."""
    for pattern in RESULTS:
        for path in sorted(output_dir.glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (what a later ``mkdir -p`` would write into)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(output_dir: Path) -> None:
    """Refuse an ``output_dir`` that is a file, lies under one, or cannot be written (read-only, no permission)."""
    existing = _nearest_existing(output_dir)
    if existing.is_file():
        where = "is a file" if existing == output_dir.absolute() else f"lies under {existing}, which is a file"
        raise OutputDirError(f"output_dir: {output_dir} {where}, not a folder; choose a folder")
    try:  # a probe, not os.access: root passes permission checks, and only a write tells a read-only mount
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as error:
        raise OutputDirError(f"output_dir: cannot write in {existing} ({error.strerror}); choose a writable folder") from None


def base_key(config: MFTConfigBase, eval_sets: Mapping[str, Dataset]) -> str:
    """The key of the base perplexities: the evaluation rows themselves and the base model as it is held
    and computed (:func:`mft_plugin.digest.cache_key`), plus the loss path the evaluation shares.

    Hashing the rows, not the keys that make them, means that every key that changes a validation row
    (``train_on_inputs``, packing, added tokens, the split, the data files) gives a new key without
    being named, and runs whose rows are equal (a seed sweep with ``test_datasets``) share one measurement.
    """
    names = sorted(eval_sets)
    rows = [eval_sets[name] for name in names]
    return cache_key("base perplexities", config, rows=rows, settings={"sets": names, "loss_impl": config.loss_impl})


def _measured(file: Path) -> dict[str, Any]:
    """The measurements a base-perplexity file holds, by key ({} when absent; damaged ones are logged)."""
    if not file.is_file():
        return {}
    try:
        measured = json.loads(file.read_text(encoding="utf-8")).get("measured")
        if not isinstance(measured, dict):
            raise ValueError(f"'measured' is {measured!r}, not an object")
        return measured
    except (OSError, ValueError, AttributeError) as error:  # truncated, not text, not an object
        logger.warning("%s is damaged (%s); measuring the base perplexities again", file, error)
        return {}


def load_base_perplexities(output_dir: Path, config: MFTConfigBase, eval_sets: Mapping[str, Dataset]) -> dict[str, float] | None:
    """The cached base perplexities if they were measured on these very rows with this base.

    None (measured again) when absent, stale, or damaged: unreadable, or not one finite perplexity
    (>= 1) for each of ``eval_sets``; a damaged file is logged.
    """
    file = output_dir / BASE_PPL_FILE
    measured, key = _measured(file), base_key(config, eval_sets)
    if key not in measured:
        return None  # another base or other rows: stale, so measured again
    perplexities = measured[key]
    if not _valid_perplexities(perplexities, set(eval_sets)):
        logger.warning("%s holds %r, not a finite perplexity for each of %s; measuring them again",
                       file, perplexities, sorted(eval_sets))  # fmt: skip
        return None
    return {k: float(v) for k, v in perplexities.items()}


def _valid_perplexities(perplexities: Any, names: set[str]) -> bool:
    return (
        isinstance(perplexities, dict)
        and set(perplexities) == names
        and all(type(v) in (int, float) and math.isfinite(v) and v >= 1.0 for v in perplexities.values())
    )


def gather_base_perplexities(output_dir: Path, siblings: Sequence[Path]) -> None:
    """Add the measurements found in ``siblings`` (the other runs of a sweep) to ``output_dir``'s file.

    The sweep cannot tell which one fits a run (its key needs the run's rows); the run picks the one
    whose key matches when it has built them (:func:`load_base_perplexities`).
    """
    measured = {key: value for folder in siblings if folder != output_dir for key, value in _measured(folder / BASE_PPL_FILE).items()}
    own = _measured(output_dir / BASE_PPL_FILE)
    if set(measured) - set(own):
        atomic_write_text(output_dir / BASE_PPL_FILE, json.dumps({"measured": {**measured, **own}}))


def metrics_json(metrics: dict[str, Any]) -> str:
    """``metrics`` as standard JSON: a non-finite number (DG/S when S <= 0) is written ``null``.

    DG/S is undefined when the model did not specialize (S <= 0); :func:`read_metrics` reads that
    ``null`` back as +inf, the value the paper's comparison gives it (worst).
    """
    finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    return json.dumps(finite, indent=2, sort_keys=True, allow_nan=False) + "\n"


def read_metrics(folder: Path) -> dict[str, Any]:
    """A finished run's ``metrics.json``, with an undefined DG/S (``null``, S <= 0) as +inf."""
    metrics = read_run_file(folder / METRICS_FILE)  # RunFileError naming the file if missing or damaged
    if DG_OVER_S in metrics and metrics[DG_OVER_S] is None and (metrics.get("eval_S") or 0.0) <= 0:
        metrics[DG_OVER_S] = math.inf
    return metrics


def save_base_perplexities(
    output_dir: Path, config: MFTConfigBase, eval_sets: Mapping[str, Dataset], perplexities: dict[str, float]
) -> None:
    """Store ``perplexities`` under the key of these rows (:func:`base_key`), beside the file's other measurements."""
    measured = {**_measured(output_dir / BASE_PPL_FILE), base_key(config, eval_sets): perplexities}
    atomic_write_text(output_dir / BASE_PPL_FILE, json.dumps({"measured": measured}))


def best_evaluation(log_history: list[dict[str, Any]], best_model_checkpoint: str | None) -> dict[str, Any] | None:
    """The logged evaluation of the checkpoint the Trainer loaded as best (``checkpoint-<step>``).

    Read off the checkpoint actually kept, not recomputed as the least logged perplexity, so that
    ``metrics.json`` always describes the saved model (the paper's choice, Sec. 3.1, within the
    degeneralization budget of ``mft_plugin.train.budget``). None when no checkpoint was selected.
    """
    if best_model_checkpoint is None:
        return None
    step = int(Path(best_model_checkpoint).name.rsplit("-", 1)[1])
    evaluations = [entry for entry in log_history if entry.get("step") == step and any(k.startswith("eval_") for k in entry)]
    return {k: v for k, v in evaluations[-1].items() if k.startswith("eval_") or k == "step"} if evaluations else None


def final_metrics(trainer: MFTTrainer, train_metrics: dict[str, float]) -> dict[str, Any]:
    """Base perplexities, the selected (best) evaluation with its S/DG/DG/S, and training stats.

    What ``metrics.json`` holds, for ``mft-run`` and ``axolotl train`` with the plugin alike.
    """
    metrics: dict[str, Any] = {f"base_{k}_ppl": v for k, v in trainer.base_perplexities.items()}
    metrics.update(train_metrics)
    metrics[SKIPPED_KEY] = skipped_steps(trainer.state.log_history)
    best = best_evaluation(trainer.state.log_history, trainer.state.best_model_checkpoint)
    if best is None and trainer.eval_sets:  # no evaluation, or none within the budget: the final model's
        best = trainer.paper_evaluation()
    metrics.update(best or {})
    evaluations = [entry for entry in trainer.state.log_history if SPEC_METRIC in entry]
    stopped_early = trainer.state.global_step < trainer.state.max_steps
    if evaluations and stopped_early and (reason := trainer.budget.stop_reason(evaluations[-1])):
        metrics["stopped_by"] = reason  # max_degeneralization or target_specialization
    if best and trainer.budget.max_degeneralization is not None:
        metrics["within_budget"] = trainer.budget.admits(best)
    return metrics


def write_run_files(output_dir: Path, resolved_config: dict[str, Any], metrics: dict[str, Any]) -> None:
    """``config.yml`` then ``metrics.json`` (last: a folder with it holds a finished run), as ``mft-run report`` reads them."""
    atomic_write_text(output_dir / CONFIG_FILE, yaml.safe_dump(resolved_config, sort_keys=False))
    atomic_write_text(output_dir / METRICS_FILE, metrics_json(metrics))
